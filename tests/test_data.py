"""The data layer: scanning, checking, duplicates, splitting, manifests, the tensor cache and batches."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from smids_ml import SmidsError
from smids_ml.data import (Batches, build_dataset, cache_file, check, find_class_root, load_manifest, load_tensors,
                           make_batches, scan, split, write_manifest)
from tests.helpers import assert_one_line_error, invoke, make_dataset, write_image


def test_scan_accepts_both_non_sperm_spellings_and_mixed_extensions(tmp_path):
    write_image(tmp_path / "Abnormal_Sperm" / "a.BMP", fmt="BMP")
    write_image(tmp_path / "Non_Sperm" / "b.png", seed=1)
    write_image(tmp_path / "Normal_Sperm" / "c.JPG", seed=2, fmt="JPEG")
    write_image(tmp_path / "Normal_Sperm" / "d.tiff", seed=3, fmt="TIFF")
    write_image(tmp_path / "Normal_Sperm" / "e.Jpeg", seed=4, fmt="JPEG")
    (tmp_path / "Normal_Sperm" / "notes.txt").write_text("not an image")
    root, frame = scan(tmp_path)
    assert root == tmp_path
    assert sorted(frame["label"].unique()) == ["Abnormal_Sperm", "Non-Sperm", "Normal_Sperm"]
    assert sorted(frame["path"]) == ["Abnormal_Sperm/a.BMP", "Non_Sperm/b.png", "Normal_Sperm/c.JPG",
                                     "Normal_Sperm/d.tiff", "Normal_Sperm/e.Jpeg"]


def test_labels_come_from_folders_not_file_names(tmp_path):
    write_image(tmp_path / "Normal_Sperm" / "Abnormal_Sperm (3).bmp", fmt="BMP")
    write_image(tmp_path / "Abnormal_Sperm" / "Normal_Sperm (9).bmp", seed=1, fmt="BMP")
    _, frame = scan(tmp_path)
    labels = dict(zip(frame["path"], frame["label"]))
    assert labels == {"Normal_Sperm/Abnormal_Sperm (3).bmp": "Normal_Sperm",
                      "Abnormal_Sperm/Normal_Sperm (9).bmp": "Abnormal_Sperm"}


@pytest.mark.parametrize("depth", [1, 2])
def test_class_folders_are_found_below_the_root(tmp_path, depth):
    inner = tmp_path.joinpath(*["SMIDS"] * depth)
    make_dataset(inner, per_class=2)
    (tmp_path / "README.txt").write_text("archive notes")
    assert find_class_root(tmp_path) == inner
    _, frame = scan(tmp_path)
    assert len(frame) == 6


def test_other_class_sets_and_classes_option(tmp_path):
    hushem = ("01_Normal", "02_Tapered", "03_Pyriform", "04_Amorphous")
    make_dataset(tmp_path, classes=hushem, per_class=3)
    _, frame = scan(tmp_path)
    assert sorted(frame["label"].unique()) == list(hushem)
    _, some = scan(tmp_path, ["02_Tapered", "04_Amorphous"])
    assert sorted(some["label"].unique()) == ["02_Tapered", "04_Amorphous"]
    with pytest.raises(SmidsError, match="05_Other"):
        scan(tmp_path, ["01_Normal", "05_Other"])


def test_check_reports_and_skips_unreadable_files(tmp_path):
    make_dataset(tmp_path, per_class=3)
    bad = tmp_path / "Normal_Sperm"
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("hello, not a png")
    full = (bad / "Normal_Sperm (1).png").read_bytes()
    (bad / "truncated.png").write_bytes(full[: len(full) // 2])
    root, frame = scan(tmp_path)
    report = check(root, frame)
    reasons = dict(report.problems)
    assert set(reasons) == {"Normal_Sperm/empty.png", "Normal_Sperm/text.png", "Normal_Sperm/truncated.png"}
    assert "empty" in reasons["Normal_Sperm/empty.png"]
    assert "not an image" in reasons["Normal_Sperm/text.png"]
    assert "truncated" in reasons["Normal_Sperm/truncated.png"]
    assert len(report.frame) == 9
    with pytest.raises(SmidsError, match="empty.png.*drop --strict"):
        check(root, frame, strict=True)


def test_duplicates_share_a_split_and_cross_class_duplicates_are_conflicts(tmp_path):
    make_dataset(tmp_path, per_class=8)
    normal = tmp_path / "Normal_Sperm"
    # the same picture twice in one class, once as bmp: same pixels, different bytes
    Image.open(normal / "Normal_Sperm (1).png").save(normal / "copy.bmp")
    shutil.copy(normal / "Normal_Sperm (2).png", normal / "copy2.png")
    # the same picture in two classes: a label conflict
    shutil.copy(normal / "Normal_Sperm (3).png", tmp_path / "Abnormal_Sperm" / "conflict.png")
    dataset = build_dataset(tmp_path, seed=7)
    manifest = dataset.manifest.set_index("path")
    assert manifest.loc["Normal_Sperm/copy.bmp", "split"] == manifest.loc["Normal_Sperm/Normal_Sperm (1).png", "split"]
    assert manifest.loc["Normal_Sperm/copy2.png", "split"] == manifest.loc["Normal_Sperm/Normal_Sperm (2).png", "split"]
    assert sorted(map(sorted, dataset.report.duplicates)) == [
        ["Normal_Sperm/Normal_Sperm (1).png", "Normal_Sperm/copy.bmp"],
        ["Normal_Sperm/Normal_Sperm (2).png", "Normal_Sperm/copy2.png"]]
    assert dataset.report.conflicts == [["Abnormal_Sperm/conflict.png", "Normal_Sperm/Normal_Sperm (3).png"]]
    assert "Abnormal_Sperm/conflict.png" not in manifest.index
    # duplicates never straddle splits, whatever the seed
    for seed in range(10):
        parts = split(dataset.manifest.drop(columns="split"), seed=seed).groupby("hash")["split"].nunique()
        assert parts.max() == 1


def test_split_is_stratified_and_reproducible(tmp_path):
    make_dataset(tmp_path, per_class=20)
    a = build_dataset(tmp_path, seed=3).manifest
    b = build_dataset(tmp_path, seed=3).manifest
    c = build_dataset(tmp_path, seed=4).manifest
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    counts = a.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == 14).all() and (counts["valid"] == 3).all() and (counts["test"] == 3).all()


def test_manifest_round_trip_and_changed_file_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    dataset = build_dataset(data)
    manifest = write_manifest(dataset, tmp_path / "manifest.csv")
    again = load_manifest(manifest, data)
    pd.testing.assert_frame_equal(again.manifest[["path", "label", "hash", "split"]],
                                  dataset.manifest[["path", "label", "hash", "split"]])
    write_image(data / "Normal_Sperm" / "Normal_Sperm (2).png", seed=999)
    with pytest.raises(SmidsError, match=r"Normal_Sperm \(2\).png changed since manifest"):
        load_manifest(manifest, data)
    result = invoke(["train", "--data", str(data), "--split-manifest", str(manifest), "--epochs", "1"])
    assert_one_line_error(result, "Normal_Sperm (2).png changed since manifest")
    (data / "Normal_Sperm" / "Normal_Sperm (2).png").unlink()
    with pytest.raises(SmidsError, match="does not exist"):
        load_manifest(manifest, data)
    (tmp_path / "not-a-manifest.csv").write_text("a,b\n1,2\n")
    assert_one_line_error(invoke(["train", "--data", str(data), "--split-manifest", str(tmp_path / "not-a-manifest.csv")]),
                          "is not a split manifest")


def test_tensor_cache_is_reused_and_rebuilt_when_a_key_changes(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    dataset = build_dataset(data)
    cache = tmp_path / "cache"
    first = load_tensors(dataset, 32, 3, "pad", cache)
    path = cache_file(dataset, 32, 3, "pad", cache)
    assert path.exists() and first.shape == (9, 3, 32, 32) and first.dtype == torch.uint8
    stamp = path.stat().st_mtime_ns
    assert torch.equal(load_tensors(dataset, 32, 3, "pad", cache), first)
    assert path.stat().st_mtime_ns == stamp  # read, not rebuilt
    others = {cache_file(dataset, 40, 3, "pad", cache), cache_file(dataset, 32, 1, "pad", cache),
              cache_file(dataset, 32, 3, "stretch", cache)}
    assert path not in others and len(others) == 3
    assert load_tensors(dataset, 32, 1, "stretch", cache).shape == (9, 1, 32, 32)
    write_image(data / "Normal_Sperm" / "Normal_Sperm (1).png", seed=4242)
    changed = build_dataset(data)
    assert cache_file(changed, 32, 3, "pad", cache) != path


def test_pad_keeps_aspect_ratio_and_stretch_fills(tmp_path):
    from smids_ml.data import prepare_image

    image = Image.new("RGB", (100, 50), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 100, 50))
    padded = prepare_image(image, 32, 3, "pad")
    stretched = prepare_image(image, 32, 3, "stretch")
    assert padded.shape == stretched.shape == (3, 32, 32)
    assert stretched.float().mean() == 0  # all black
    assert padded[:, 16, :].float().mean() == 0 and padded[:, 0, :].float().mean() == 0  # border colour is black too
    gray = prepare_image(image, 32, 1, "pad")
    assert gray.shape == (1, 32, 32)


def test_only_training_batches_are_augmented(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=10)
    dataset = build_dataset(data)
    images = load_tensors(dataset, 32, 3, "pad", tmp_path / "cache")
    batches = make_batches(dataset, images, batch=64, augment=True, strength=1.0, seed=0, device="cpu")
    assert batches["train"].augment and not batches["valid"].augment and not batches["test"].augment
    valid_1 = torch.cat([x for x, _ in batches["valid"]])
    valid_2 = torch.cat([x for x, _ in batches["valid"]])
    assert torch.equal(valid_1, valid_2)
    train_1, labels_1 = next(iter(Batches(images[:8], torch.zeros(8, dtype=torch.long), 8, augment=True, seed=1)))
    plain, _ = next(iter(Batches(images[:8], torch.zeros(8, dtype=torch.long), 8)))
    assert not torch.equal(train_1, plain) and train_1.shape == plain.shape
    assert train_1.min() >= -1 and train_1.max() <= 1


def test_bad_data_roots_get_one_line_errors(tmp_path):
    assert_one_line_error(invoke(["explore", str(tmp_path / "missing")]), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke(["explore", str(tmp_path / "empty")]), "no class folder", "found: nothing")
    (tmp_path / "other" / "cats" / "notes").mkdir(parents=True)
    (tmp_path / "other" / "cats" / "notes" / "x.txt").write_text("no images here")
    (tmp_path / "other" / "dogs").mkdir()
    assert_one_line_error(invoke(["explore", str(tmp_path / "other")]), "no class folder", "found: cats")
    make_dataset(tmp_path / "one-bad-class", per_class=3)
    for file in (tmp_path / "one-bad-class" / "Non-Sperm").iterdir():
        file.write_bytes(b"corrupt")
    assert_one_line_error(invoke(["train", "--data", str(tmp_path / "one-bad-class"), "--epochs", "1"]),
                          "class Non-Sperm", "no readable image")
    make_dataset(tmp_path / "strict", per_class=3)
    (tmp_path / "strict" / "Normal_Sperm" / "broken.png").write_bytes(b"\x89PNG broken")
    assert_one_line_error(invoke(["train", "--data", str(tmp_path / "strict"), "--strict", "--epochs", "1"]),
                          "broken.png", "not an image")


def test_two_data_sets_side_by_side_are_ambiguous_but_the_root_level_wins(tmp_path):
    make_dataset(tmp_path / "SMIDS", per_class=1)
    make_dataset(tmp_path / "synthetic", per_class=1)
    with pytest.raises(SmidsError, match="holds several data sets.*point --data at one"):
        find_class_root(tmp_path)
    assert find_class_root(tmp_path / "SMIDS") == tmp_path / "SMIDS"
    make_dataset(tmp_path, per_class=1)  # class folders at the root itself: the shallowest level wins
    assert find_class_root(tmp_path) == tmp_path
