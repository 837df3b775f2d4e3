"""The synthetic generator: SMIDS layout and naming, varied resolutions, deterministic for a seed."""

from __future__ import annotations

import hashlib

from PIL import Image

from smids_ml.data import scan
from smids_ml.synth import CLASSES, generate
from tests.helpers import invoke, make_dataset


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.bmp"))}


def test_layout_names_and_sizes(tmp_path):
    counts = generate(tmp_path, per_class=4, seed=3)
    assert counts == {c: 4 for c in CLASSES}
    assert (tmp_path / "Non-Sperm" / "Non-Sperm (4).bmp").is_file()
    _, frame = scan(tmp_path)
    assert sorted(frame["label"].unique()) == list(CLASSES)
    sizes = [Image.open(tmp_path / p).size for p in frame["path"]]
    assert all(70 <= side <= 280 for size in sizes for side in size)
    assert len(set(sizes)) > 6  # many different resolutions, as in SMIDS
    assert all(Image.open(tmp_path / p).mode == "RGB" for p in frame["path"])


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    generate(tmp_path / "a", per_class=3, seed=11)
    generate(tmp_path / "b", per_class=3, seed=11)
    generate(tmp_path / "c", per_class=3, seed=12)
    generate(tmp_path / "d", per_class=5, seed=11)
    a, b, c, d = (digest(tmp_path / x) for x in "abcd")
    assert a == b
    assert not set(a.values()) & set(c.values())
    assert {k: d[k] for k in a} == a  # image k does not depend on how many were asked for


def test_cli(tmp_path):
    result = invoke(["synth", str(tmp_path / "out"), "--per-class", "2", "--seed", "5", "--format", "png"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*.png"))) == 6


def test_data_or_synthetic_falls_back_only_without_class_folders(tmp_path):
    from smids_ml.synth import data_or_synthetic

    root, synthetic = data_or_synthetic(tmp_path / "empty", per_class=2)
    assert synthetic and root == (tmp_path / "empty" / "synthetic").resolve()
    assert len(list(root.rglob("*.bmp"))) == 6
    assert data_or_synthetic(tmp_path / "empty", per_class=2) == (root, True)  # found again, not regenerated
    make_dataset(tmp_path / "real", per_class=1)
    assert data_or_synthetic(tmp_path / "real") == ((tmp_path / "real").resolve(), False)
