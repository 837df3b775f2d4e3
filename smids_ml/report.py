"""From crops to a sample: `smids-ml report MODEL FOLDER` counts the classes of each sample's crops and
estimates the share of normal forms among the sperm cells, with intervals.

Two things stand between per-crop labels and a sample's figure. A share from n crops has sampling
error: the report gives a Wilson score interval. And the classifier's own errors bias the count (a model
that calls 8% of abnormal cells normal turns 4% normal forms into about 11% observed): the adjusted
estimate inverts the model's confusion matrix from its latest test evaluation (adjusted classify-and-count,
Forman 2008: observed predicted shares = Cᵀ · true shares, solved on the simplex), with a bootstrap
interval that resamples both the sample's crops and the evaluation's images. The adjustment assumes what
the evaluation measured holds in the sample: the model errs on each true class at the rates it did there.

Outputs (in --out and as artifacts of an MLflow `report` run naming the model version): report.json,
predictions.csv, and report.html, one self-contained page with the crops flagged for review and a gallery
of crops per class with Grad-CAM overlays (`smids_ml.explain`). A research tool, not a diagnostic one.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image
from scipy.optimize import nnls

from smids_ml import SmidsError, plots
from smids_ml.config import FiniteFloat
from smids_ml.console import Command
from smids_ml.data import IMAGE_EXTENSIONS, files_under, open_image, printable
from smids_ml.evaluate import latest_evaluation
from smids_ml.explain import explain
from smids_ml.predict import predict_inputs
from smids_ml.serving import load_classifier, one_line
from smids_ml.tracking import ModelSource, resolve_model, use_experiment

DEFAULT_EXPERIMENT = "smids-ml-report"
REPORT_FILES = ("report.json", "predictions.csv", "report.html")
Z95 = 1.959964
BOOTSTRAP_RESAMPLES = 2000
DISCLAIMER = ("A research tool, not a diagnostic one: its classes follow the labels of the model's training data "
              "(for SMIDS, the data set's own annotation, not the WHO strict criteria), and its figures are "
              "estimates from the crops given.")


# --------------------------------------------------------------------------- the numbers


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (sound at small n and near 0 or 1, unlike k/n ± z·se)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))  # exact ends


def confusion_counts(predictions: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """K×K counts of an evaluation's predictions.csv: rows the true class, columns the predicted one."""
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)))
    for true, predicted in zip(predictions["label"], predictions["predicted"]):
        if true in index and predicted in index:
            counts[index[true], index[predicted]] += 1
    return counts


def rates(counts: np.ndarray) -> np.ndarray:
    """Row-normalised confusion (P(predicted | true)); a class the evaluation never saw is taken as always right."""
    out = np.eye(len(counts))
    seen = counts.sum(1) > 0
    out[seen] = counts[seen] / counts[seen].sum(1, keepdims=True)
    return out


def adjust(observed: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """True class shares whose predicted shares under `confusion` (rates) best match `observed`, on the simplex:
    non-negative least squares with the sum-to-one row weighted heavily."""
    weight = 1e3
    system = np.vstack([confusion.T, weight * np.ones(len(observed))])
    shares, _ = nnls(system, np.append(observed, weight))
    return shares / shares.sum()


@dataclass
class Roles:
    """Which classes count as normal forms, and which are not sperm cells at all (left out of the fraction)."""

    normal: str | None
    excluded: list[str]

    @classmethod
    def infer(cls, classes: list[str], normal: str | None = None) -> "Roles":
        """`Normal_Sperm` is normal and `Non-Sperm` is excluded by their names; `normal` names the class
        when the names do not tell."""
        if normal is not None and normal not in classes:
            raise SmidsError(f"--normal-class {normal!r} is not a class of the model ({', '.join(classes)})")
        squash = {c: re.sub(r"[^a-z]", "", c.lower()) for c in classes}
        excluded = [c for c in classes if squash[c].startswith("non") and c != normal]
        if normal is None:
            candidates = [c for c in classes if squash[c].startswith("normal")]
            normal = candidates[0] if len(candidates) == 1 else None
        return cls(normal, excluded)

    def fraction(self, shares: np.ndarray, classes: list[str]) -> float:
        """Share of the normal class among the cells (the excluded classes left out)."""
        cells = [i for i, c in enumerate(classes) if c not in self.excluded]
        total = shares[cells].sum()
        return float(shares[classes.index(self.normal)] / total) if total > 0 else float("nan")


@dataclass
class Adjustment:
    """The evaluation whose confusion matrix corrects the counts."""

    run_id: str
    counts: np.ndarray

    def describe(self) -> dict:
        return {"method": "adjusted classify-and-count (Forman 2008) with the model's confusion matrix",
                "evaluation_run_id": self.run_id, "evaluation_images": int(self.counts.sum()),
                "confusion_matrix": self.counts.astype(int).tolist()}


def sample_figures(predicted: pd.Series, classes: list[str], roles: Roles, adjustment: Adjustment | None,
                   rng: np.random.Generator) -> dict:
    """The numbers of one sample from its crops' predicted labels."""
    n = len(predicted)
    counts = np.array([(predicted == c).sum() for c in classes], dtype=float)
    observed = counts / n
    out = {"n_crops": n, "counts": dict(zip(classes, counts.astype(int).tolist())),
           "shares": dict(zip(classes, observed.round(6).tolist()))}
    adjusted = adjust(observed, rates(adjustment.counts)) if adjustment else None
    if adjusted is not None:
        out["shares_adjusted"] = dict(zip(classes, adjusted.round(6).tolist()))
    if roles.normal is None:
        return out
    cells = int(sum(counts[i] for i, c in enumerate(classes) if c not in roles.excluded))
    normal = int(counts[classes.index(roles.normal)])
    out.update(n_cells=cells, normal_fraction=normal / cells if cells else None,
               normal_fraction_ci=list(wilson(normal, cells)) if cells else None)
    if adjusted is not None:
        point = roles.fraction(adjusted, classes)
        out["normal_fraction_adjusted"] = None if np.isnan(point) else point
        draws = []
        for _ in range(BOOTSTRAP_RESAMPLES):  # the sample's crops and the evaluation's images, both resampled
            seen = rng.multinomial(n, observed) / n
            table = np.array([rng.multinomial(int(row.sum()), row / row.sum()) if row.sum() else row
                              for row in adjustment.counts])
            draws.append(roles.fraction(adjust(seen, rates(table)), classes))
        draws = np.array(draws)[~np.isnan(draws)]
        if len(draws) and not np.isnan(point):  # on few crops the draws may all fall to one side of the estimate
            low, high = np.percentile(draws, [2.5, 97.5])
            out["normal_fraction_adjusted_ci"] = [float(min(low, point)), float(max(high, point))]
    return out


# --------------------------------------------------------------------------- samples and their crops


def find_samples(folder: Path, one_sample: bool = False) -> dict[str, list[Path]]:
    """Sample name → its crop files: one sample per sub-folder (crops found recursively), and the crops lying
    directly in FOLDER as one sample named after it (`NAME (top level)` when a sub-folder has that name too); with
    `one_sample`, everything under FOLDER is one sample. Dangling and looping links are listed: their rows say why."""
    if not folder.is_dir():
        raise SmidsError(f"{folder}: no such folder")

    name = folder.resolve().name
    if one_sample:
        samples = {name: files_under(folder)}
    else:
        samples = {printable(sub.name): files_under(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()}
        loose = f"{name} (top level)" if name in samples else name  # a sub-folder named like FOLDER keeps its name
        samples = {loose: files_under(folder, recursive=False), **samples}
    samples = {name: files for name, files in samples.items() if files}
    if not samples:
        raise SmidsError(f"{folder}: holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                         "neither directly nor in sub-folders")
    return samples


def find_adjustment(source: ModelSource, classes: list[str], run_id: str | None, workdir: str) -> tuple[Adjustment | None, str]:
    """The confusion counts of `run_id`'s predictions.csv, or of the model's latest test evaluation; without a
    usable one, None and the reason (the report then gives the counted figures only)."""
    try:
        if run_id is None:
            run = latest_evaluation(source)
            if run is None:
                return None, f"no test evaluation of {source.uri} was found; run `smids-ml evaluate {source.uri}` first"
            run_id = run["run_id"]
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.csv", dst_path=workdir)
        counts = confusion_counts(pd.read_csv(path), classes)
    except (MlflowException, OSError, KeyError, ValueError) as exc:
        raise SmidsError(f"evaluation run {run_id}: no usable predictions.csv ({one_line(exc)})") from None
    if not counts.sum():
        raise SmidsError(f"evaluation run {run_id}: its predictions.csv has none of the model's classes")
    if np.linalg.matrix_rank(rates(counts)) < len(classes):
        return None, (f"the confusion matrix of evaluation run {run_id} is singular (the model could not tell some "
                      "classes apart there), so the true shares cannot be recovered from the predicted ones")
    return Adjustment(run_id, counts), ""


# --------------------------------------------------------------------------- the page


def _png(figure_or_image) -> str:
    """A data: URI of a PNG, so the page stands alone."""
    buffer = io.BytesIO()
    if isinstance(figure_or_image, Image.Image):
        figure_or_image.save(buffer, format="PNG")
    else:
        figure_or_image.savefig(buffer, format="png", dpi=100)
        plots.close(figure_or_image)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _percent(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}%"
    return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _tile(crop: Image.Image, heat: Image.Image, caption: str) -> str:
    """A crop and its Grad-CAM overlay side by side, captioned once."""
    text = html.escape(caption)
    return (f'<figure><span><img src="{_png(crop)}" alt="{text}"><img src="{_png(heat)}" alt="Grad-CAM of {text}">'
            f"</span><figcaption>{text}</figcaption></figure>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: .3em .6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: .3em; text-align: center; font-size: .8em; }}
figure img {{ max-width: 112px; max-height: 112px; margin: 1px; vertical-align: middle; }}
.note {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>{title}</h1>
<p class="note">{meta}</p>
<table id="summary"><tr>{header}</tr>{rows}</table>
<p class="note">{method}</p>
{sections}
<p class="note">{disclaimer}</p>
</body></html>
"""


def render_html(report: dict, galleries: dict[str, str]) -> str:
    classes, normal = report["classes"], report["normal_class"]
    header = ["sample", "crops", "unreadable", *classes]
    if normal:
        header += ["normal among cells (95% CI)", "adjusted (95% CI)"]
    header.append("for review")
    rows = []
    for i, s in enumerate(report["samples"]):
        cells = [s["sample"], s["n_crops"], *(s["counts"][c] for c in classes)]
        if normal:
            cells += [_percent(s.get("normal_fraction"), s.get("normal_fraction_ci")),
                      _percent(s.get("normal_fraction_adjusted"), s.get("normal_fraction_adjusted_ci"))]
        cells.append(len(s["review"]))
        cells = [f"<td>{html.escape(str(c))}</td>" for c in cells]
        unreadable = s["n_unreadable"]
        cells.insert(2, f'<td><a href="#unreadable-{i}">{unreadable}</a></td>' if unreadable else "<td>0</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    adjustment = report["adjustment"]
    method = (f"Intervals: {report['interval']}. Adjusted: {report['adjusted_interval']}, with the confusion matrix "
              f"of evaluation run {adjustment['evaluation_run_id']} ({adjustment['evaluation_images']} images)."
              if adjustment else f"Not adjusted: {report['adjustment_note']}")
    sections = "".join(f'<section id="sample-{i}"><h2>{html.escape(s["sample"])}</h2>{unreadable_list(s, i)}'
                       f'{galleries[s["sample"]]}</section>' for i, s in enumerate(report["samples"]))
    meta = (f"Model {report['model']} ({report['model_version']}); classes {', '.join(classes)}; "
            + (f"normal forms: {normal}, left out as not cells: {', '.join(report['excluded_classes']) or 'none'}; "
               if normal else "no class of normal forms: class shares only; ")
            + f"crops below {report['review_below']:.2f} confidence are listed for review.")
    return PAGE.format(title=html.escape(f"Morphology report: {report['folder']}"), meta=html.escape(meta),
                       header="".join(f"<th>{html.escape(h)}</th>" for h in header), rows="".join(rows),
                       method=html.escape(method), sections=sections, disclaimer=html.escape(report["disclaimer"]))


def unreadable_list(sample: dict, index: int) -> str:
    """The crops of a sample that could not be read, with why: where the page's count of them links to."""
    if not sample["unreadable"]:
        return ""
    items = "".join(f"<li>{html.escape(row['path'])}: {html.escape(row['error'])}</li>" for row in sample["unreadable"])
    return (f'<h3 id="unreadable-{index}">could not be read: {len(sample["unreadable"])} (not counted above; also in '
            f'<a href="predictions.csv">predictions.csv</a>)</h3><ul>{items}</ul>')


def sample_section(model, sample: dict, table: pd.DataFrame, roles: Roles, review_below: float, per_class: int) -> str:
    """A sample's plot, its crops for review and a gallery per predicted class, each crop with the overlay of the
    class it was given (`table`: its readable rows of predictions.csv)."""
    figure = plots.sample_shares(sample, model.classes, roles.normal)
    parts = [f'<img class="plot" src="{_png(figure)}" alt="class shares of {html.escape(sample["sample"])}">']
    flagged = table[table["confidence"] < review_below]
    review = flagged.nsmallest(per_class * 3, "confidence")
    shown = {f"for review: {len(flagged)}" + (f", the {len(review)} least confident shown" if len(review) < len(flagged)
                                              else ", least confident first"): review}
    for name in model.classes:
        rows = table[table["label"] == name]
        shown[f"predicted {name}: {len(rows)}, the {min(per_class, len(rows))} most confident shown"] = \
            rows.nlargest(per_class, "confidence")
    for heading, rows in shown.items():
        crops = [open_image(path) for path in rows["path"]]
        overlays = explain(model, crops, rows[model.classes].to_numpy().argmax(1).tolist()) if crops else []
        captions = [f"{Path(p).name}: {label} {conf:.2f}" for p, label, conf in zip(rows["path"], rows["label"],
                                                                                    rows["confidence"])]
        tiles = "".join(_tile(c, o, caption) for c, o, caption in zip(crops, overlays, captions))
        parts.append(f"<h3>{html.escape(heading)}</h3><div>{tiles or '<p>none</p>'}</div>")
    return "".join(parts)


# --------------------------------------------------------------------------- the command


def make_report(model_uri: str, folder: Path, out: Path, one_sample: bool = False, review_below: float = 0.6,
                normal_class: str | None = None, evaluation_run: str | None = None, per_class: int = 6,
                batch: int = 64, seed: int = 0) -> dict:
    """Everything `report` does: predict each sample's crops, compute its figures, write the three files."""
    samples = find_samples(folder, one_sample)
    model = load_classifier(model_uri)
    classes = list(model.classes)
    roles = Roles.infer(classes, normal_class)
    source = resolve_model(model_uri)
    with tempfile.TemporaryDirectory() as workdir:
        adjustment, why_not = find_adjustment(source, classes, evaluation_run, workdir)
    tables, figures = [], []
    rng = np.random.default_rng(seed)
    for name, files in samples.items():
        table = predict_inputs(model, [str(f) for f in files], batch)
        table.insert(0, "sample", name)
        tables.append(table)
        good = table[table["error"].isna()]
        if good.empty:
            raise SmidsError(f"sample {name}: none of its {len(table)} crops could be read "
                             f"(first: {table['path'].iloc[0]}: {table['error'].iloc[0]})")
        bad = table[table["error"].notna()]
        figure = {"sample": name, "n_unreadable": len(bad),
                  "unreadable": [{"path": p, "error": e} for p, e in zip(bad["path"], bad["error"])],
                  **sample_figures(good["label"], classes, roles, adjustment, rng)}
        review = good[good["confidence"] < review_below].sort_values("confidence")
        figure["review"] = [{"path": p, "predicted": label, "confidence": round(float(c), 4)}
                            for p, label, c in zip(review["path"], review["label"], review["confidence"])]
        figures.append(figure)
    report = {"model": model_uri, "model_version": source.canonical, "folder": printable(str(folder)),
              "classes": classes, "normal_class": roles.normal, "excluded_classes": roles.excluded,
              "interval": "Wilson score 95%", "review_below": review_below,
              "adjusted_interval": f"percentile bootstrap 95% ({BOOTSTRAP_RESAMPLES} resamples of the sample's crops "
                                   "and of the evaluation's images), widened to the estimate where it lies outside",
              "adjustment": adjustment.describe() if adjustment else None,
              "adjustment_note": why_not or None,
              "disclaimer": DISCLAIMER, "samples": figures}
    predictions = pd.concat(tables, ignore_index=True)
    readable = predictions[predictions["error"].isna()]
    galleries = {s["sample"]: sample_section(model, s, readable[readable["sample"] == s["sample"]], roles,
                                             review_below, per_class) for s in figures}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        predictions.to_csv(out / "predictions.csv", index=False)
        (out / "report.html").write_text(render_html(report, galleries))
    except OSError as exc:
        raise SmidsError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return report


@click.command("report", cls=Command)
@click.argument("model_uri")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("report"), show_default=True,
              help="Folder for report.json, predictions.csv and report.html.")
@click.option("--one-sample", is_flag=True, help="Treat every crop under FOLDER as one sample (default: one sample "
                                                 "per sub-folder, and the crops directly in FOLDER as one more).")
@click.option("--review-below", type=FiniteFloat(0, 1), default=0.6, show_default=True,
              help="List crops whose top probability is below this for review by eye.")
@click.option("--normal-class", default=None, help="The class of normal forms (default: the class named Normal…).")
@click.option("--evaluation-run", default=None, help="Correct with this evaluation run's confusion matrix "
                                                     "(default: the model's latest test evaluation).")
@click.option("--gallery", "per_class", type=click.IntRange(min=0), default=6, show_default=True,
              help="Crops shown per predicted class and sample, with their Grad-CAM overlays.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment for the run.")
def main(model_uri, folder, out, one_sample, review_below, normal_class, evaluation_run, per_class, experiment):
    """Per-sample morphology report of the crops in FOLDER with the model at MODEL_URI: counts, the share of
    normal forms among the cells with its 95% interval, the same corrected by the model's confusion matrix,
    crops for review and Grad-CAM galleries. Empty options (as `mlflow run` passes them) mean "not given"."""
    report = make_report(model_uri, folder, out, one_sample, review_below, normal_class or None,
                         evaluation_run or None, per_class)
    use_experiment(experiment)
    with mlflow.start_run(run_name=f"report {report['model_version']} {folder.resolve().name}") as run:
        mlflow.set_tags({"reported_model": report["model_version"], "reported_model_uri": model_uri})
        mlflow.log_params({"model_uri": model_uri, "folder": str(folder.resolve()), "samples": len(report["samples"]),
                           "review_below": review_below,
                           "evaluation_run_id": (report["adjustment"] or {}).get("evaluation_run_id", "")})
        for name in REPORT_FILES:  # only the report's own files: --out may be a folder that holds others
            mlflow.log_artifact(str(out / name))
    for s in report["samples"]:
        line = f"{s['sample']}: {s['n_crops']} crops"
        if s["n_unreadable"]:
            line += f" ({s['n_unreadable']} more could not be read: listed in predictions.csv and report.html)"
        if report["normal_class"]:
            line += f", normal among cells {_percent(s.get('normal_fraction'), s.get('normal_fraction_ci'))}"
            if "normal_fraction_adjusted" in s:
                line += f", adjusted {_percent(s['normal_fraction_adjusted'], s.get('normal_fraction_adjusted_ci'))}"
        else:
            line += ", " + ", ".join(f"{c} {_percent(v)}" for c, v in s["shares"].items())
        click.echo(line + (f", {len(s['review'])} for review" if s["review"] else ""))
    if not report["adjustment"]:
        click.echo(f"not adjusted: {report['adjustment_note']}", err=True)
    click.echo(f"wrote {out / 'report.html'}, report.json and predictions.csv; MLflow run {run.info.run_id}", err=True)


if __name__ == "__main__":
    main()
