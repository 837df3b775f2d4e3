"""From a folder of class folders, or a folder and a table of labels, to batches of tensors.

scan (folders or table → path, label) → check (decode, hash, find duplicates) → split (stratified,
seeded, duplicates kept together; or the table's own) → manifest CSV → cache (decode + resize once
into uint8 tensors) → batches (augmented on tensors).

Labels come from the folder or from a table, never from the file name: real copies of SMIDS have file
names that disagree with their folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from smids_ml import SmidsError
from smids_ml.config import TrainConfig
from smids_ml.console import progress

SMIDS_CLASSES = ("Abnormal_Sperm", "Non-Sperm", "Normal_Sperm")
CLASS_ALIASES = {"Non_Sperm": "Non-Sperm", "Non Sperm": "Non-Sperm", "NonSperm": "Non-Sperm"}
IMAGE_EXTENSIONS = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif"}
MAX_PIXELS = 40_000_000  # per image; larger ones are refused before decoding (decompression bombs)
MANIFEST_COLUMNS = ["path", "label", "hash", "width", "height", "bytes", "split"]
SPLITS = ("train", "valid", "test")
CACHE_FORMAT = 1  # bump when prepare_image changes, so stale caches are rebuilt


class ImageError(ValueError):
    """An input that cannot be used as an image; the message says why."""


# --------------------------------------------------------------------------- images


def open_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image fully (path or bytes), refusing empty, truncated, non-image and oversized input;
    pixels wider than 8 bits come back as 8-bit with their full range (`to_8bit`). What the data report should
    say about a conversion is in `image.info["note"]`."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("empty input (0 bytes)")
        stream = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise ImageError("empty file (0 bytes)")
        except OSError as exc:  # a symbolic-link loop, a dangling link, no permission
            raise ImageError(f"cannot be read ({exc.strerror or exc})") from None
        stream = source
    try:
        image = Image.open(stream)
        if image.width * image.height > max_pixels:
            raise ImageError(f"{image.width}x{image.height} pixels is over the limit of {max_pixels:,}")
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"over the pixel limit ({exc})") from None
    except UnidentifiedImageError:
        if tiff_tag(source, 284) == 2:  # PlanarConfiguration: each channel its own plane
            raise ImageError("a TIFF with its channels in separate planes, which cannot be read; save it with "
                             "interleaved channels") from None
        raise ImageError("not an image in a readable format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"truncated or corrupt image ({exc})") from None
    return to_8bit(image)


def tiff_tag(source: str | os.PathLike | bytes, tag: int):
    """A tag of the first directory of a TIFF that Pillow cannot open as an image; None for anything else."""
    from PIL import TiffImagePlugin

    try:
        with (io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")) as stream:
            directory = TiffImagePlugin.ImageFileDirectory_v2(stream.read(8))
            stream.seek(directory.next)
            directory.load(stream)
        return directory.get(tag)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return None


# Modes Pillow converts to L/RGB without losing range: 8-bit channels, palettes, bilevel.
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def to_8bit(image: Image.Image) -> Image.Image:
    """8-bit pixels with the full range of wider ones (Pillow's own convert clips 16-bit grey to white), with a
    note for the data report (`info["note"]`) wherever the reading is not the obvious one:
    16-bit grey scaled by the bits its values use (12, as microscope cameras write them, or 16); signed 8-bit
    TIFF shifted by 128 (Pillow reads it as unsigned: -57 would be 199); 32-bit integers by the depth their values
    use (8 or 16 bits), else by their own range (signed 16-bit TIFFs too); floats in [0, 1] by 255, other
    floats by their own range; of a multi-page or two-channel TIFF (or an animated GIF) only the first page or
    channel. 16-bit RGB TIFFs arrive
    here as 8-bit already (Pillow keeps their high bytes)."""
    notes = []
    tags = getattr(image, "tag_v2", {})  # TIFF only
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"the first of its {image.n_frames} {'frames' if image.format == 'GIF' else 'pages'} is used")
    if tags.get(277) == 2:  # SamplesPerPixel
        notes.append("the first of its 2 channels is used")
    if image.mode == "L" and 2 in np.atleast_1d(tags.get(339, 1)):  # SampleFormat 2: signed integers
        converted = Image.fromarray(np.asarray(image) ^ np.uint8(0x80), "L")  # two's complement: -128..127 → 0..255
        notes.append("signed 8-bit pixels shifted by 128 to 0-255")
    elif image.mode in EIGHT_BIT_MODES:
        converted = image
    elif image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        bits = 12 if values.size and values.max() < 4096 else 16
        if bits == 12:
            notes.append("12-bit values in a 16-bit image, scaled by 12 bits")
        converted = Image.fromarray(np.rint(values * (255 / (2 ** bits - 1))).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all():
            raise ImageError(f"{image.mode} pixels hold NaN or infinite values")
        if image.mode == "F" and low >= 0 and high <= 1:
            values = values * 255
        elif image.mode == "I" and low >= 0 and high <= 255:
            pass
        elif image.mode == "I" and low >= 0 and high <= 65535:
            values = values / 257
        else:
            bits, signed = np.atleast_1d(tags.get(258, 32))[0], 2 in np.atleast_1d(tags.get(339, 1))
            kind = "float" if image.mode == "F" else f"{'signed ' if signed else ''}{bits}-bit integer"
            values = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
            notes.append(f"scaled by its own range ({kind} pixels {low:g} to {high:g})")
        converted = Image.fromarray(np.rint(values).astype(np.uint8), "L")
    else:
        raise ImageError(f"pixel mode {image.mode} cannot be converted to 8-bit colour faithfully")
    if notes:
        converted.info["note"] = "; ".join(notes)
    return converted


def pixel_hash(image: Image.Image) -> str:
    """Hash of the decoded RGB pixels: the same picture saved as bmp and png hashes the same."""
    rgb = image.convert("RGB")
    digest = hashlib.blake2b(f"{rgb.width}x{rgb.height}".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def padded_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Where a width×height crop lies (left, top, right, bottom) inside the size×size input of `--resize pad`:
    scaled to fit, centred. Overlays use it to map a map over the input back onto the crop."""
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    left, top = (size - inner[0]) // 2, (size - inner[1]) // 2
    return left, top, left + inner[0], top + inner[1]


def prepare_image(image: Image.Image, size: int, channels: int, resize: str) -> torch.Tensor:
    """The evaluation preprocessing, shared by training, evaluation and serving: uint8 C×size×size."""
    image = image.convert("L" if channels == 1 else "RGB")
    if resize == "stretch":
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    else:  # pad: keep the aspect ratio, fill with the crop's own border colour
        left, top, right, bottom = padded_box(image.width, image.height, size)
        resized = image.resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        pixels = np.asarray(image)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        fill = tuple(int(v) for v in np.atleast_1d(np.median(border, axis=0)))
        image = Image.new(image.mode, (size, size), fill if channels == 3 else fill[0])
        image.paste(resized, (left, top))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] → float in [-1, 1] (mean 0.5, std 0.5, as the original study)."""
    return images.float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- scanning


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) shown as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def escaped(name: str) -> str:
    """A file name for a one-line entry of the data report: as `printable`, and a newline or another control
    character as its escape (\\n, \\x1b), so that one entry stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in printable(name))


def canonical_class(name: str) -> str:
    return CLASS_ALIASES.get(name, name)


def files_under(folder: Path, extensions=IMAGE_EXTENSIONS, recursive: bool = True) -> list[Path]:
    """Files by extension, sorted; links that lead nowhere or loop are listed too, so whoever reads them reports
    them (the data report, an error row of `predict` or `report`) instead of losing them without a word."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if (p.is_file() or p.is_symlink()) and p.suffix.lower() in extensions)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Sub-folders of `folder` that hold image files, by canonical class name: two spellings of one class
    (`Non-Sperm/` and `Non_Sperm/`) are one class with both folders."""
    found: dict[str, list[Path]] = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in child.iterdir() if p.is_file()):
            found.setdefault(canonical_class(child.name), []).append(child)
    return found


def find_class_root(root: str | os.PathLike, classes: list[str] | None = None) -> Path:
    """The folder whose sub-folders are the classes: `root` itself or one or two levels below it.

    Archives often unpack as `SMIDS/SMIDS/<Class>/`. The shallowest level with class folders wins
    (the folder with the wanted classes, or without --classes the most SMIDS classes); two equally
    good folders at that level (real data beside a synthetic set, say) are an error, not a guess.
    """
    root = data_folder(root)
    wanted = {canonical_class(c) for c in classes} if classes else None
    levels = [[root]]
    levels += [[p for p in sorted(root.iterdir()) if p.is_dir()]]
    levels += [[q for p in levels[1] for q in sorted(p.iterdir()) if q.is_dir()]]
    for level in levels:  # the shallowest level with class folders wins
        scores = {}
        for folder in level:
            names = set(_class_folders(folder))
            scores[folder] = len(names & wanted) if wanted else len(names & set(SMIDS_CLASSES)) * 100 + len(names)
        best = max(scores.values(), default=0)
        if best:
            tied = [folder for folder, score in scores.items() if score == best]
            if len(tied) > 1:
                raise SmidsError(f"{root} holds several data sets ({', '.join(str(t) for t in tied)}); "
                                 "point --data at one of them")
            return tied[0]
    seen = ", ".join(sorted(p.name for p in root.iterdir())) or "nothing"
    raise SmidsError(f"no class folder with images under {root} (found: {seen}); "
                     f"expected one folder per class such as {', '.join(SMIDS_CLASSES)}")


def scan(root: str | os.PathLike, classes: list[str] | None = None, labels: str | os.PathLike | None = None,
         label_column: str | None = None, split_column: str | None = None) -> tuple[Path, pd.DataFrame]:
    """List (path relative to the returned root, label) for every image: from class folders, or with
    `labels` from that table (`read_table`, which adds the table's `split` with `split_column`)."""
    if labels:
        return read_table(root, labels, label_column, split_column, classes)
    class_root = find_class_root(root, classes)
    folders = _class_folders(class_root)
    if classes:
        missing = [c for c in classes if canonical_class(c) not in folders]
        if missing:
            raise SmidsError(f"class folder(s) {', '.join(missing)} not found in {class_root} "
                             f"(found: {', '.join(folders) or 'none'})")
        folders = {canonical_class(c): folders[canonical_class(c)] for c in classes}
    rows = []
    for label, spellings in folders.items():
        for file in (f for folder in spellings for f in files_under(folder)):
            rel = file.relative_to(class_root).as_posix()
            if printable(rel) != rel:  # bytes the file system could not decode: no manifest can hold the name
                click.echo(f"skipped {printable(rel)}: the file name is not valid UTF-8; rename the file to use it", err=True)
                continue
            rows.append((rel, label))
    return class_root, pd.DataFrame(rows, columns=["path", "label"])


def data_folder(root: str | os.PathLike) -> Path:
    """`root` as an absolute Path (what a run records, so `evaluate` finds it from any directory), or one line
    saying it is missing or not a folder."""
    root = Path(root)
    if not root.exists():
        raise SmidsError(f"data root {root} does not exist")
    if not root.is_dir():
        raise SmidsError(f"data root {root} is not a folder")
    return root.absolute()


def read_csv(path: Path, what: str, **options) -> pd.DataFrame:
    """A CSV file, or one line saying why it cannot be read."""
    try:
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError:
        raise SmidsError(f"{what} {path} is empty") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SmidsError(f"cannot read {what} {path}: {exc}") from None


def read_table(root: str | os.PathLike, table: str | os.PathLike, column: str | None, split_column: str | None = None,
               classes: list[str] | None = None) -> tuple[Path, pd.DataFrame]:
    """(root, path + label [+ split]) from a CSV table whose `path` column is relative to `root` and whose
    `column` holds the labels (a data set's own table, an annotation tool's export, a lab's spreadsheet).

    What would make the data a lie is refused in one line naming the table, its line and the path, before
    anything runs: an unknown column, a path that leaves the root or names no file, a row listed twice, one
    image with two labels, a split that is not train/valid/test. Rows with an empty label are left out (a
    table with several label columns may not fill them all) and counted. Unreadable images are `check`'s."""
    root, table = data_folder(root), Path(table)
    # every cell as text (a label "NA" stays "NA"); blank lines kept, so that index + 2 is the CSV line
    frame = read_csv(table, "labels table", dtype=str, keep_default_na=False, skip_blank_lines=False)
    wanted = {"path": "the image paths", column or "": "--label-column"}
    if split_column:
        wanted[split_column] = "--split-column"
    for name, role in wanted.items():
        if name not in frame.columns:
            raise SmidsError(f"labels table {table}, line 1: no column {name!r} for {role} (its columns: "
                             f"{', '.join(frame.columns)})")
    stripped = {name: frame[name].str.strip() for name in (column, split_column) if name}  # as people type them
    frame = frame[(frame != "").any(axis=1)].assign(**stripped)  # blank lines out
    if frame.empty:
        raise SmidsError(f"labels table {table} lists no images (a header and no rows)")

    def refuse(index, reason):
        raise SmidsError(f"labels table {table}, line {index + 2} ({frame.at[index, 'path']}): {reason}")

    seen: dict[str, int] = {}
    for index, path in frame["path"].items():
        if not path:
            refuse(index, "no path")
        rel = Path(path)
        if rel.is_absolute() or ".." in rel.parts:
            refuse(index, f"the path leaves the data root {root} (absolute or '..'); paths are relative to it")
        if not (root / rel).is_file():
            refuse(index, f"no such file under {root}")
        key = rel.as_posix()
        if key in seen:
            first = seen[key]
            labels = frame.at[first, column], frame.at[index, column]
            refuse(index, f"listed twice (also line {first + 2})" if labels[0] == labels[1] else
                   f"one image with two labels, {labels[0]!r} (line {first + 2}) and {labels[1]!r}")
        seen[key] = index
        if split_column and frame.at[index, split_column] not in SPLITS:
            refuse(index, f"{split_column} {frame.at[index, split_column]!r} is not one of {', '.join(SPLITS)}")
    out = pd.DataFrame({"path": [Path(p).as_posix() for p in frame["path"]], "label": frame[column]})
    if split_column:
        out["split"] = frame[split_column].to_numpy()
    unlabelled = out["label"] == ""
    if unlabelled.any():
        click.echo(f"left out {unlabelled.sum()} row(s) of {table} with no {column} label", err=True)
    out = out[~unlabelled]
    spellings = out.groupby(out["label"].str.casefold())["label"].unique()
    for variants in spellings[spellings.map(len) > 1]:
        lines = [f"line {out.index[out['label'] == v][0] + 2}" for v in variants]
        spelled = " and ".join(map(repr, variants))
        raise SmidsError(f"labels table {table}: column {column!r} spells one class as {spelled} ({', '.join(lines)}); "
                         "write it one way (classes are case-sensitive)")
    if classes:
        missing = [c for c in classes if c not in set(out["label"])]
        if missing:
            raise SmidsError(f"class(es) {', '.join(missing)} not in column {column!r} of {table} "
                             f"(found: {', '.join(sorted(set(out['label'])))})")
        out = out[out["label"].isin(classes)]
    return root, out.reset_index(drop=True)


# --------------------------------------------------------------------------- checking


@dataclass
class CheckReport:
    """What check() found: usable rows, skipped files and duplicate groups."""

    frame: pd.DataFrame
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[list[str]] = field(default_factory=list)  # same-label groups of paths
    conflicts: list[list[str]] = field(default_factory=list)  # groups spanning several labels
    notes: list[str] = field(default_factory=list)  # merged class folders, images scaled by their own range

    def lines(self) -> list[str]:
        out = [f"skipped {escaped(path)}: {reason}" for path, reason in self.problems] + self.notes
        out += [f"duplicates (kept in one split): {', '.join(map(escaped, g))}" for g in self.duplicates]
        out += [f"label conflict (excluded): {', '.join(map(escaped, g))}" for g in self.conflicts]
        return out


def describe_file(path: Path) -> dict:
    """Decode one file and describe it; raises ImageError."""
    image = open_image(path)
    return {"hash": pixel_hash(image), "width": image.width, "height": image.height,
            "bytes": path.stat().st_size, **({"note": image.info["note"]} if "note" in image.info else {})}


def check(class_root: Path, frame: pd.DataFrame, strict: bool = False) -> CheckReport:
    """Decode every image, hash its pixels, skip (or with strict, refuse) what cannot be read. A table's
    own `split` column, when the frame has one, is carried along."""
    rows, problems, notes = [], [], []
    for label, paths in frame.groupby("label")["path"]:
        spellings = sorted({f for f in paths.str.split("/").str[0] if canonical_class(f) == label})  # class folders
        if len(spellings) > 1:
            notes.append(f"merged {', '.join(f + '/' for f in spellings)} as one class, {label}")
    with progress(list(frame.itertuples(index=False)), "Checking images") as items:
        for row in items:
            try:
                described = describe_file(class_root / row.path)
            except ImageError as exc:
                problems.append((row.path, str(exc)))
                continue
            if "note" in described:
                notes.append(f"{described.pop('note')}: {escaped(row.path)}")
            rows.append({**row._asdict(), **described})
    if problems and strict:
        path, reason = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SmidsError(f"{class_root / path}: {reason}{more}; drop --strict to skip unreadable files")
    checked = pd.DataFrame(rows, columns=MANIFEST_COLUMNS[:-1] + (["split"] if "split" in frame else []))
    duplicates, conflicts = [], []
    for _, group in checked.groupby("hash", sort=False):
        if len(group) > 1:
            paths = sorted(group["path"])
            (conflicts if group["label"].nunique() > 1 else duplicates).append(paths)
    excluded = {p for g in conflicts for p in g}
    checked = checked[~checked["path"].isin(excluded)].reset_index(drop=True)
    return CheckReport(checked, problems, duplicates, conflicts, notes)


# --------------------------------------------------------------------------- splitting


def stratified_groups(frame: pd.DataFrame, seed: int):
    """(label, its unique content hashes in a seeded random order) per class: the unit every split,
    fold and validation carve-out works on, so duplicates always move together."""
    groups = frame.drop_duplicates("hash")[["hash", "label"]].sort_values("hash")
    rng = np.random.default_rng(seed)
    for label, members in groups.groupby("label", sort=True):
        hashes = members["hash"].to_numpy()
        yield label, hashes[rng.permutation(len(hashes))]


def split(frame: pd.DataFrame, valid_frac: float = 0.15, test_frac: float = 0.15, seed: int = 42) -> pd.DataFrame:
    """Stratified, seeded train/valid/test split by unique content: duplicates share one split.
    `valid_frac` 0 gives no valid part (training keeps the last epoch)."""
    assignment = {}
    for label, hashes in stratified_groups(frame, seed):
        needed = 3 if valid_frac > 0 else 2
        if len(hashes) < needed:
            raise SmidsError(f"class {label} has {len(hashes)} distinct readable image(s); at least {needed} are needed "
                             f"to give {'train, valid and test' if valid_frac > 0 else 'train and test'} one each")
        n_test = min(max(1, round(len(hashes) * test_frac)), len(hashes) - needed + 1)
        n_valid = min(max(1, round(len(hashes) * valid_frac)), len(hashes) - n_test - 1) if valid_frac > 0 else 0
        for i, h in enumerate(hashes):
            assignment[h] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    out = frame.copy()
    out["split"] = out["hash"].map(assignment)
    return out


def carve_valid(frame: pd.DataFrame, fraction: float, seed: int) -> pd.Series:
    """True for a stratified, seeded `fraction` of the rows, by unique content (duplicates together).

    Each class keeps at least one training image; a class with two or more keeps at least one for
    validation. `fraction` 0 carves nothing (training runs its whole schedule and keeps the last epoch).
    """
    if fraction == 0:
        return pd.Series(False, index=frame.index)
    chosen = []
    for _, hashes in stratified_groups(frame, seed):
        n = min(max(1, round(len(hashes) * fraction)), len(hashes) - 1)
        chosen.extend(hashes[:n])
    return frame["hash"].isin(chosen)


def table_split(frame: pd.DataFrame, table: Path, valid_frac: float = 0.0, seed: int = 42) -> pd.DataFrame:
    """A data set's own split (a table's split column), honoured: its test rows are the test part. A table
    without test rows (MHSMA's train/valid: its test part is published apart) has its valid rows scored as the
    test part, since they are the held-out part it gives. With a validation part asked for (`valid_frac` > 0) it
    is the table's valid rows where they are not the test part, else carved from its train rows; with
    `valid_frac` 0 the table's valid rows train, as --valid-frac 0 means no validation part. The same image
    (by pixels) in two of its parts is leakage and refused."""
    given = frame["split"]
    spread = frame.groupby("hash")["split"].nunique()
    leaked = frame[frame["hash"].isin(spread[spread > 1].index)]
    if not leaked.empty:
        same = leaked[leaked["hash"] == leaked["hash"].iloc[0]]
        raise SmidsError(f"labels table {table}: the same image (pixel hash) is in its splits "
                         f"{', '.join(sorted(set(same['split'])))} ({', '.join(same['path'])}); that is leakage between splits")
    valid_becomes = ("valid" if valid_frac else "train") if (given == "test").any() else "test"
    out = frame.assign(split=given.replace({"valid": valid_becomes}))
    if valid_frac and not (out["split"] == "valid").any():
        train = out[out["split"] == "train"]
        out.loc[train.index[carve_valid(train, valid_frac, seed).to_numpy()], "split"] = "valid"
    for part in ("train", "test"):
        if not (out["split"] == part).any():
            raise SmidsError(f"labels table {table}: its split column leaves no {part} images"
                             + (" (test: its test rows, or else its valid rows)" if part == "test" else ""))
    check_every_class_trains(out, f"labels table {table}")
    return out


def check_every_class_trains(manifest: pd.DataFrame, where: str) -> None:
    """Refuse a split in which a class has no training rows: its model could never predict that class, and its
    test rows would only count as misses."""
    untrained = sorted(set(manifest["label"]) - set(manifest.loc[manifest["split"] == "train", "label"]))
    if untrained:
        parts = sorted(set(manifest.loc[manifest["label"] == untrained[0], "split"]))
        raise SmidsError(f"{where}: class {untrained[0]} has no train rows (only {', '.join(parts)}); a model "
                         "trained on this split could never predict it")


def assign_folds(frame: pd.DataFrame, folds: int, seed: int = 42) -> pd.Series:
    """Stratified k-fold assignment by unique content (duplicates share a fold)."""
    fold_of = {}
    for label, hashes in stratified_groups(frame, seed):
        if len(hashes) < folds:
            raise SmidsError(f"class {label} has {len(hashes)} distinct images, fewer than {folds} folds")
        for i, h in enumerate(hashes):
            fold_of[h] = i % folds
    return frame["hash"].map(fold_of)


# --------------------------------------------------------------------------- manifest


@dataclass
class Dataset:
    """A checked, split data set: where it lives, its manifest rows and its class names."""

    root: Path
    manifest: pd.DataFrame
    classes: list[str]
    report: CheckReport | None = None
    table: Path | None = None  # the labels table, when labels do not come from class folders
    label_column: str | None = None

    def part(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name]

    def with_manifest(self, manifest: pd.DataFrame, classes: list[str] | None = None) -> "Dataset":
        """The same data (root, labels table) with other rows or splits: a fold, a held-out part."""
        return dataclasses.replace(self, manifest=manifest, classes=classes or self.classes, report=None)

    @property
    def name(self) -> str:
        """What the data is called in MLflow, short enough for the runs table's Dataset column (`source` has the
        full path): the data root's folder, or the table with its folder, and its label column."""
        if self.table:
            table = self.table.resolve()
            return f"{table.parent.name}/{table.name}:{self.label_column}"
        return self.root.resolve().name

    @property
    def source(self) -> Path:
        """Where the labels come from: the class folders' root, or the table."""
        return (self.table or self.root).resolve()

    def fingerprint(self) -> str:
        """One hash naming the exact images, labels and split."""
        text = self.manifest[["path", "label", "hash", "split"]].to_csv(index=False)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def counts(self) -> pd.DataFrame:
        return self.manifest.groupby(["label", "split"]).size().unstack(fill_value=0)


def build_dataset(root, classes=None, valid_frac=0.15, test_frac=0.15, seed=42, strict=False, labels=None,
                  label_column=None, split_column=None) -> Dataset:
    """Scan (folders, or the `labels` table), check and split a data root (with `split_column`, the table's split)."""
    class_root, frame = scan(root, classes, labels, label_column, split_column)
    report = check(class_root, frame, strict=strict)
    found = sorted(set(frame["label"]))
    for label in found:
        if not (report.frame["label"] == label).any():
            raise SmidsError(f"class {label} in {labels or class_root} has no readable image")
    if split_column:
        manifest = table_split(report.frame, Path(labels), valid_frac, seed)
    else:
        manifest = split(report.frame, valid_frac, test_frac, seed)
    names = list(classes and [c if labels else canonical_class(c) for c in classes] or found)
    return Dataset(class_root, manifest.sort_values("path").reset_index(drop=True), names, report,
                   Path(labels) if labels else None, label_column if labels else None)


def prepare_data(cfg: TrainConfig) -> Dataset:
    """The checked, split data set: from --split-manifest when given (verified), else split anew."""
    if len(cfg.label_columns) > 1:
        raise SmidsError(f"--label-column {cfg.label_column}: several label columns train one model each with `train`; "
                         "this command takes one")
    if cfg.split_manifest:
        needed = SPLITS if cfg.valid_frac > 0 else ("train", "test")
        dataset = load_manifest(cfg.split_manifest, cfg.data, cfg.class_list, needed, cfg.labels, cfg.label_column)
    else:
        dataset = build_dataset(cfg.data, cfg.class_list, cfg.valid_frac, cfg.test_frac, cfg.seed, cfg.strict,
                                cfg.labels, cfg.label_column, cfg.split_column)
        for line in dataset.report.lines():
            click.echo(line, err=True)
    if len(dataset.classes) < 2:
        where = f"column {cfg.label_column!r} of {cfg.labels}" if cfg.labels else str(dataset.root)
        found = f"only class {dataset.classes[0]}" if dataset.classes else "no class with a readable image"
        raise SmidsError(f"{where} has {found}; a classifier needs at least two "
                         f"{'classes' if cfg.labels else 'class folders'}")
    return dataset


def write_manifest(dataset: Dataset, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.manifest[MANIFEST_COLUMNS].to_csv(path, index=False)
    return path



def check_manifest_rows(manifest: pd.DataFrame, path: Path, required_splits: tuple[str, ...],
                        table: tuple[Path, dict[str, str]] | None = None) -> None:
    """Refuse, naming the row (CSV line number) and the reason, what would make the split a lie:
    paths leaving the data root, unknown splits, labels that are not the file's folder (or, for data
    labelled by a `table`, (its path, {path: label}), not the table's label), repeated rows, one image
    (by pixels) in two splits, and a missing split that is needed."""
    def refuse(index, reason):
        raise SmidsError(f"manifest {path}, line {index + 2} ({manifest.at[index, 'path']}): {reason}")

    for index, row in manifest.iterrows():
        if not isinstance(row["path"], str) or not row["path"]:
            refuse(index, "no path")
        rel = Path(row["path"])
        if rel.is_absolute() or ".." in rel.parts:
            refuse(index, "the path leaves the data root (absolute or '..'); manifest paths are relative to it")
        if row["split"] not in SPLITS:
            refuse(index, f"split {row['split']!r} is not one of {', '.join(SPLITS)}")
        if table is not None:
            if table[1].get(rel.as_posix()) != row["label"]:
                given = table[1].get(rel.as_posix())
                refuse(index, f"label {row['label']!r} is not the one labels table {table[0]} gives "
                              f"({'none: the table does not list it' if given is None else repr(given)})")
        elif len(rel.parts) < 2 or canonical_class(rel.parts[0]) != row["label"]:
            refuse(index, f"label {row['label']!r} is not the file's class folder (labels come from folders)")
    repeated = manifest["path"].duplicated()
    if repeated.any():
        refuse(manifest.index[repeated][0], "listed twice")
    spread = manifest.groupby("hash")["split"].nunique()
    leaked = manifest["hash"].isin(spread[spread > 1].index)
    if leaked.any():
        first = manifest[leaked].iloc[0]
        others = manifest[leaked & (manifest["hash"] == first["hash"])]
        refuse(others.index[-1], f"the same image (pixel hash) is in splits {', '.join(sorted(set(others['split'])))}; "
                                 "that is leakage between splits")
    missing = [s for s in required_splits if not (manifest["split"] == s).any()]
    if missing:
        raise SmidsError(f"manifest {path} has no {' or '.join(missing)} rows; training needs {' and '.join(required_splits)}")
    if "train" in required_splits:
        check_every_class_trains(manifest, f"manifest {path}")


def load_manifest(path: str | os.PathLike, root: str | os.PathLike, classes: list[str] | None = None,
                  required_splits: tuple[str, ...] = (), labels: str | os.PathLike | None = None,
                  label_column: str | None = None, name: str | None = None) -> Dataset:
    """Reuse a manifest's split; refuse it when a row is inconsistent (check_manifest_rows), any
    listed file is missing, or its pixels changed. Training requires all three splits. With `labels`
    (a table and its `label_column`) the paths are relative to `root` and the labels are the table's. `name` is what
    the messages call it (a run's artifact, not the temporary file it was downloaded to)."""
    path = Path(path)
    shown = name or path
    manifest = read_csv(path, "manifest", dtype={"hash": str, "path": str, "label": str, "split": str})
    missing_columns = set(MANIFEST_COLUMNS) - set(manifest.columns)
    if missing_columns:
        raise SmidsError(f"{shown} is not a split manifest (missing columns: {', '.join(sorted(missing_columns))})")
    if manifest.empty:
        raise SmidsError(f"manifest {shown} lists no images")
    table = None
    if labels:
        class_root, listed = read_table(root, labels, label_column)
        table = (Path(labels), dict(zip(listed["path"], listed["label"])))
    check_manifest_rows(manifest, shown, required_splits, table)
    if not labels:
        class_root = find_class_root(root, sorted(set(manifest["label"])))
    with progress(list(manifest.itertuples(index=False)), "Verifying manifest") as rows:
        for row in rows:
            file = class_root / row.path
            if not file.is_file():
                raise SmidsError(f"manifest {shown} lists {file}, which does not exist")
            try:
                current = describe_file(file)["hash"]
            except ImageError as exc:
                raise SmidsError(f"manifest {shown} lists {file}, which is no longer readable: {exc}") from None
            if current != row.hash:
                raise SmidsError(f"{file} changed since manifest {shown} was written (hash {row.hash} → {current})")
    names = [c if labels else canonical_class(c) for c in classes] if classes else sorted(set(manifest["label"]))
    manifest = manifest[manifest["label"].isin(names)]
    return Dataset(class_root, manifest.sort_values("path").reset_index(drop=True), names,
                   table=Path(labels) if labels else None, label_column=label_column if labels else None)


# --------------------------------------------------------------------------- tensor cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMIDS_ML_CACHE", Path.home() / ".cache" / "smids-ml"))


def cache_file(dataset: Dataset, size: int, channels: int, resize: str, cache_dir: Path | None = None) -> Path:
    """Where the decoded tensors of this exact image list and preprocessing live."""
    key = json.dumps({"hashes": list(dataset.manifest["hash"]), "size": size, "channels": channels,
                      "resize": resize, "format": CACHE_FORMAT})
    name = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return Path(cache_dir or default_cache_dir()) / f"images-{size}px-{channels}ch-{resize}-{name}.pt"


def load_tensors(dataset: Dataset, size: int, channels: int, resize: str, cache_dir: Path | None = None) -> torch.Tensor:
    """uint8 N×C×size×size in manifest order: decoded and resized once, then read from the cache."""
    path = cache_file(dataset, size, channels, resize, cache_dir)
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a torn or foreign file: rebuild it
            path.unlink(missing_ok=True)
    out = torch.empty((len(dataset.manifest), channels, size, size), dtype=torch.uint8)
    with progress(list(dataset.manifest["path"]), f"Caching images at {size}px") as paths:
        for i, rel in enumerate(paths):
            out[i] = prepare_image(open_image(dataset.root / rel), size, channels, resize)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------- batches


def augment_batch(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0, rotation: float = 180.0,
                  scale_shift: float = 0.1, size: int | None = None, turns: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 batch → a normalised float batch in [-1, 1] (as `normalize`), each image with its own
    random rotation (up to ±`rotation` degrees; 180: any angle, as cells lie in every orientation),
    mirror flip, scale and shift (±`scale_shift` × strength), brightness, contrast and colour
    balance: one grid_sample call and one multiply-add. `size` resamples to a smaller side in the same
    call (progressive resizing). `turns` (0-7 per image: quarter turns, mirrored from 4 on) chooses each
    image's element of the square's symmetry group instead of drawing it; a random angle within ±45°
    is added, so the angles are spread as evenly as when drawn (orientation cycling)."""
    n = images.shape[0]

    def uniform(low, high):
        return torch.rand(n, generator=generator) * (high - low) + low

    if turns is None:
        angle = uniform(-torch.pi * rotation / 180, torch.pi * rotation / 180)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    else:
        angle = (turns % 4) * (torch.pi / 2) + uniform(-torch.pi / 4, torch.pi / 4)
        flip = torch.where(turns >= 4, -1.0, 1.0)
    reach = scale_shift * strength
    scale = uniform(1 - reach, 1 + reach)
    shift_x, shift_y = uniform(-reach, reach), uniform(-reach, reach)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1)
    pixels = images.float()  # 0..255; grid_sample is linear, so the scaling folds into the last step
    side = size or pixels.shape[-1]
    grid = F.affine_grid(theta.to(images.device), [n, pixels.shape[1], side, side], align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(1 - 0.2 * strength, 1 + 0.2 * strength).view(n, 1, 1, 1).to(images.device)
    contrast = uniform(1 - 0.2 * strength, 1 + 0.2 * strength).view(n, 1, 1, 1).to(images.device)
    # per-channel gain: the colour balance of stain and lamp differs between smears and microscopes
    colour = (torch.rand((n, pixels.shape[1], 1, 1), generator=generator) * 0.2 - 0.1) * strength + 1
    brightness = brightness * colour.to(images.device)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    # ((x - mean) * contrast + mean) * brightness / 127.5 - 1, as one multiply-add
    gain = contrast * brightness / 127.5
    return out.mul_(gain).add_(mean * brightness * (1 - contrast) / 127.5 - 1).clamp_(-1, 1)


class Batches:
    """Batches of (normalised float images, labels) from cached uint8 tensors; reshuffled each pass.

    Augmentation happens here, on whole batches, only when `augment` is set (the training split).
    `size`, when set (progressive resizing), is the side the batches are resampled to. With `cycle`,
    each image turns through the 8 orientations of the square, one per pass, from a random start.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, shuffle: bool = False,
                 augment: bool = False, strength: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                 rotation: float = 180.0, scale_shift: float = 0.1, cycle: bool = False):
        self.images, self.labels = images, labels
        self.batch, self.shuffle, self.augment, self.strength = batch, shuffle, augment, strength
        self.rotation, self.scale_shift = rotation, scale_shift
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.size: int | None = None
        self.passes = 0
        self.start_turns = torch.randint(0, 8, (len(labels),), generator=self.generator) if cycle else None

    def turns(self, index: torch.Tensor) -> torch.Tensor | None:
        """The orientation (0-7) of each indexed image in the current pass, when cycling."""
        return None if self.start_turns is None else (self.start_turns[index] + self.passes) % 8

    def __len__(self) -> int:
        return (len(self.labels) + self.batch - 1) // self.batch

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch):
            index = order[start:start + self.batch]
            x = self.images[index].to(self.device, non_blocking=True)
            if self.augment:
                x = augment_batch(x, self.generator, self.strength, self.rotation, self.scale_shift, self.size,
                                  self.turns(index))
            else:
                x = normalize(x)
                if self.size and self.size != x.shape[-1]:
                    x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            yield x, self.labels[index].to(self.device, non_blocking=True)
        self.passes += 1


def make_batches(dataset: Dataset, images: torch.Tensor, batch: int, augment: bool, strength: float,
                 seed: int, device, rotation: float = 180.0, scale_shift: float = 0.1,
                 cycle: bool = False) -> dict[str, Batches]:
    """One Batches per split; only train is shuffled and augmented."""
    index = {c: i for i, c in enumerate(dataset.classes)}
    labels = torch.tensor([index[c] for c in dataset.manifest["label"]], dtype=torch.long)
    out = {}
    for part in ("train", "valid", "test"):
        rows = torch.from_numpy(np.flatnonzero(dataset.manifest["split"].to_numpy() == part))
        training = part == "train"
        out[part] = Batches(images[rows], labels[rows], batch, shuffle=training, augment=training and augment,
                            strength=strength, seed=seed, device=device, rotation=rotation, scale_shift=scale_shift,
                            cycle=training and cycle)
    return out
