"""Classify images and videos with a logged model: `python -m smids_ml.predict models:/best@champion crops/`.

The model comes from any MLflow model URI and brings its own preprocessing
(`SmidsClassifier.preprocess`), so a file predicted here gets exactly the probabilities the served
model gives for the same bytes. INPUTs are image files, folders (searched recursively), glob
patterns and videos (every Nth frame). A bad input gets a row with its error and never stops the
others; the exit status is 1 when any input failed.
"""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import av
import click
import numpy as np
import pandas as pd
import torch
from PIL import Image

from smids_ml import SmidsError
from smids_ml.config import FiniteFloat
from smids_ml.console import Command, progress
from smids_ml.data import IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, escaped, files_under, open_image, printable
from smids_ml.serving import load_classifier

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv"}
OUTPUT_FORMATS = (".csv", ".json")
UNCERTAIN = "uncertain"
TEXT_COLUMNS = ("path", "frame", "label", "error")


@dataclass
class Sample:
    """One image to classify (a file or a video frame) or the reason it could not be read."""

    path: str
    frame: int | None = None
    image: torch.Tensor | None = None  # preprocessed uint8 C×H×W, dropped once classified
    error: str | None = None
    probs: np.ndarray | None = None


def expand(inputs: Iterable[str]) -> list[tuple[str, str | None]]:
    """Each INPUT → (file, None) per file to read, or (input, reason) when it names nothing usable.

    A literal path wins over a glob reading, so file names with brackets still work. Folders and
    globs yield the same kinds of file: images and videos.
    """
    wanted = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    out: list[tuple[str, str | None]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            out += [(str(p), None) for p in files_under(path, wanted)] or [(text, "folder holds no image or video files")]
        elif path.exists():
            out.append((text, None))
        elif any(ch in text for ch in "*?["):
            files = sorted(p for p in glob.glob(text, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in wanted)
            out += [(p, None) for p in files] or [(text, "no image or video file matches this pattern")]
        else:
            out.append((text, "no such file or folder"))
    return list(dict.fromkeys(out))  # a file named twice is predicted once


def video_frames(path: str, every: int) -> Iterator[tuple[int, Image.Image]]:
    """(index, RGB image) for every `every`-th decoded frame; ImageError when the video cannot be read."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageError("no video stream (not a video, or a truncated file)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                if frame.width * frame.height > MAX_PIXELS:
                    raise ImageError(f"{frame.width}x{frame.height} frames are over the limit of {MAX_PIXELS:,} pixels")
                yield index, frame.to_image()
    except av.error.FFmpegError as exc:
        raise ImageError(f"cannot decode video ({exc.strerror or exc})") from None


def read(files: list[tuple[str, str | None]], every: int, preprocess) -> Iterator[Sample]:
    """Preprocessed samples in input order; a file that fails ends with one error sample (a video
    may have yielded good frames before it)."""
    for path, problem in files:
        if problem:
            yield Sample(path, error=problem)
            continue
        try:
            if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
                for index, image in video_frames(path, every):
                    yield Sample(path, index, preprocess(image))
            else:
                yield Sample(path, image=preprocess(open_image(path)))
        except ImageError as exc:
            yield Sample(path, error=str(exc))
        except OSError as exc:  # vanished or unreadable after expand()
            yield Sample(path, error=exc.strerror or str(exc))


def classify(model, samples: Iterable[Sample], batch: int) -> Iterator[Sample]:
    """Samples in input order with probabilities filled in, `batch` readable images per network call."""
    pending: list[Sample] = []
    readable = 0
    for sample in samples:
        pending.append(sample)
        readable += sample.error is None
        if readable == batch:
            yield from _run(model, pending)
            pending, readable = [], 0
    yield from _run(model, pending)


def _run(model, pending: list[Sample]) -> list[Sample]:
    good = [s for s in pending if s.error is None]
    if good:
        for sample, probs in zip(good, model.probabilities(torch.stack([s.image for s in good]))):
            sample.image = None
            if np.isfinite(probs).all():
                sample.probs = probs
            else:  # weights that diverged to NaN: no label, and the exit status says it failed
                sample.error = "the model's output is not a number (NaN): its weights are not finite"
    return pending


def to_table(model, samples: list[Sample], min_confidence: float) -> pd.DataFrame:
    """path, frame, label, confidence, one probability column per class, error: one row per sample."""
    good = [i for i, s in enumerate(samples) if s.error is None]
    probs = np.stack([samples[i].probs for i in good]) if good else np.zeros((0, len(model.classes)), np.float32)
    predicted = model.to_frame(probs).set_axis(good)
    table = pd.DataFrame({"path": [printable(s.path) for s in samples],
                          "frame": pd.array([s.frame for s in samples], dtype="Int64")}).join(predicted)
    table.loc[table["confidence"] < min_confidence, "label"] = UNCERTAIN
    table["error"] = [s.error for s in samples]
    return table


def predict_inputs(model, inputs: Iterable[str], batch: int = 64, every: int = 30,
                   min_confidence: float = 0.0) -> pd.DataFrame:
    """Everything `predict` does between loading the model and writing the table."""
    files = expand(inputs)
    with progress(files, "Predicting") as bar:
        samples = list(classify(model, read(bar, every, model.preprocess), batch))
    return to_table(model, samples, min_confidence)


def per_label(models: list, inputs: Iterable[str], batch: int = 64, every: int = 30,
              min_confidence: float = 0.0) -> pd.DataFrame:
    """Several models (one per label, as `train --label-column a,b` registers them) on the same inputs: path, frame,
    then each model's label and confidence in columns named by its label column (or its position), and error."""
    names = [m.config.label_column or f"model{i + 1}" for i, m in enumerate(models)]
    if len(set(names)) < len(names):
        names = [f"model{i + 1}" for i in range(len(models))]
    tables = [predict_inputs(model, inputs, batch, every, min_confidence) for model in models]
    out = tables[0][["path", "frame"]].copy()
    for name, table in zip(names, tables):
        out[name], out[f"{name}_confidence"] = table["label"], table["confidence"]
    out["error"] = tables[0]["error"]
    return out


def write_overlays(model, table: pd.DataFrame, folder: Path, batch: int = 32) -> int:
    """One PNG per image file that was read (video frames are not explained): the crop at its own size with the
    Grad-CAM map of its predicted class over it, named after the file (`-2`, `-3`... when names repeat)."""
    from smids_ml.explain import explain  # matplotlib: only --explain needs it

    rows = table[table["error"].isna() & table["frame"].isna()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmidsError(f"--explain {folder}: {exc.strerror or exc}") from None
    taken: set[str] = set()
    with progress(None, "Explaining", length=len(rows)) as bar:
        for start in range(0, len(rows), batch):
            chunk = rows.iloc[start:start + batch]
            targets = chunk[model.classes].to_numpy().argmax(1).tolist()  # the top class, "uncertain" or not
            crops = [open_image(path) for path in chunk["path"]]
            for path, image in zip(chunk["path"], explain(model, crops, targets)):
                stem, n = Path(path).stem, 1
                while (name := f"{stem}{f'-{n}' if n > 1 else ''}.png") in taken:
                    n += 1
                taken.add(name)
                image.save(folder / name)
            bar.update(len(chunk))
    return len(rows)


def render(table: pd.DataFrame) -> str:
    """Aligned columns for the terminal: text left (a newline or other control character in a file name or an error
    as its escape, so that a row stays one line), numbers right with 3 decimals, blanks for missing."""
    columns = [c for c in table.columns if c != "error" or table["error"].notna().any()]
    text = {c for c in columns if c in TEXT_COLUMNS or not pd.api.types.is_numeric_dtype(table[c])}  # labels per model
    cells = [list(columns)]
    for row in table[columns].itertuples(index=False):
        cells.append(["" if pd.isna(v) else escaped(str(v)) if c in text else f"{v:.3f}" for c, v in zip(columns, row)])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    right = [c not in text or c == "frame" for c in columns]
    return "\n".join("  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(line, widths, right)).rstrip()
                     for line in cells)


def write(table: pd.DataFrame, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".csv":
            table.to_csv(path, index=False)
        else:  # through json, which leaves "/" in paths unescaped, unlike pandas
            records = json.loads(table.to_json(orient="records", double_precision=15))
            path.write_text(json.dumps(records, indent=2) + "\n")
    except OSError as exc:
        raise SmidsError(f"cannot write {path}: {exc.strerror or exc}") from None


@click.command("predict", cls=Command)
@click.argument("model_uri")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", default=None, help="Also write the predictions to this .csv or .json file.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="Images per network call.")
@click.option("--every", default=30, show_default=True, type=click.IntRange(min=1),
              help="Classify every Nth frame of a video.")
@click.option("--explain", "explain_dir", default=None, type=click.Path(path_type=Path),
              help="Also write one overlay PNG per input image into this folder: where the model looked for the "
                   "class it predicted (Grad-CAM on its last convolutional stage).")
@click.option("--min-confidence", default=0.0, show_default=True, type=FiniteFloat(0, 1),
              help=f"Label predictions whose top probability is below this {UNCERTAIN!r}.")
def main(model_uri, inputs, output, batch, every, explain_dir, min_confidence):
    """Classify INPUTs (image files, folders, glob patterns, .mp4/.avi/.mov/.mkv videos) with the
    MLflow model at MODEL_URI (models:/name/1, models:/name@alias, runs:/<id>/model). Several comma-separated
    models (one per label, e.g. models:/m-acrosome/1,models:/m-head/1) give one label and confidence column each."""
    output = Path(output) if output else None
    if output is not None:
        if output.suffix.lower() not in OUTPUT_FORMATS:
            raise SmidsError(f"--output {output}: unknown format; use a .csv or .json file name")
        if output.parent.exists() and not output.parent.is_dir():
            raise SmidsError(f"--output {output}: {output.parent} is not a folder")
    models = [load_classifier(uri.strip()) for uri in model_uri.split(",") if uri.strip()]
    if len(models) > 1 and explain_dir is not None:
        raise SmidsError("--explain shows where one model looked: give one MODEL_URI")
    if len(models) > 1:
        table = per_label(models, inputs, batch, every, min_confidence)
    else:
        model = models[0]
        table = predict_inputs(model, inputs, batch, every, min_confidence)
    click.echo(render(table))
    if output is not None:
        write(table, output)
    if explain_dir is not None:
        count = write_overlays(model, table, explain_dir)
        click.echo(f"wrote {count} overlays to {explain_dir}", err=True)
    failed = int(table["error"].notna().sum())
    uncertain = int(table.isin([UNCERTAIN]).any(axis=1).sum())
    click.echo(f"{len(table) - failed} predicted" + (f" ({uncertain} {UNCERTAIN})" if uncertain else "")
               + f", {failed} failed" + (f"; written to {output}" if output else ""), err=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
