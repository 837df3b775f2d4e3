"""SYNTHETIC SMIDS-like sperm microscope crops, for tests and demos only.

The real SMIDS data set (about 3000 stained sperm crops, three classes) cannot be downloaded
here, so this module draws look-alike crops procedurally: a pale, unevenly lit background, a
purple-blue stained cell drawn from simple shapes, focus blur and sensor noise. The folder
layout and file names match SMIDS (``Normal_Sperm/Normal_Sperm (12).bmp``), so the whole
pipeline can run end to end, and the task is tuned to be neither trivial nor impossible.

It is NOT a substitute for real SMIDS. A model's score on these images says nothing about its
score on real crops: the shapes, stains and defects are a caricature. It cannot tell you about
real stain and scanner variability, real debris and overlapping cells, real borderline
morphology, or the label noise of real expert annotations. It also has shortcuts real data
lacks: here every clearly abnormal cell has a vacuolated head (see `sperm_spec`).

Difficulty, as measured when this was written: the study's small CNN (16/32/64 conv + BN, 128
hidden, dropout 0.35), 15 epochs at 64x64 px on 300 images a class (70/15 stratified split,
flips and 90-degree rotations), reaches a best validation accuracy of about 87-91%, most errors
between normal and abnormal sperm. 900 images take about 5 s to draw on 2 CPU cores.
"""

from __future__ import annotations

import math
import pathlib
import sys

import click
import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from smids_ml import SmidsError
from smids_ml.console import Command

CLASSES = ("Abnormal_Sperm", "Non-Sperm", "Normal_Sperm")

# Share of abnormal cells with a single, weak defect: these make normal vs abnormal genuinely hard.
# Tuned by measurement: 0 gives ~94% for the reference CNN, 0.05 ~89%, 0.1 ~87%, 0.25 ~79%.
MILD_SHARE = 0.05
# Per-channel absorbance (R, G, B) at full density: a haematoxylin-like purple-blue for nuclei
# and an eosin-like pink for midpiece, tail and cytoplasm (Beer-Lambert: pixel = light * e^-A).
NUCLEAR_ABSORBANCE = np.array([0.95, 1.15, 0.45])
EOSIN_ABSORBANCE = np.array([0.20, 0.60, 0.30])


class _Canvas:
    """Two stain-density layers (nuclear, eosin) drawn in the local frame of one object at a time.

    Each object is drawn on fresh layers and merged with a per-pixel maximum, so a later object's
    pale parts never erase an earlier object's dark ones.
    """

    def __init__(self, w: int, h: int):
        self.size = (w, h)
        self.nuc, self.eos = Image.new("L", self.size), Image.new("L", self.size)
        self._obj = None

    def begin(self, centre, angle: float) -> None:
        """Start a new object centred at `centre` (px) with its local +x axis rotated by `angle`."""
        self._flush()
        self._obj = (Image.new("L", self.size), Image.new("L", self.size))
        self._draw = tuple(ImageDraw.Draw(im) for im in self._obj)
        c, s = math.cos(angle), math.sin(angle)
        self._m = np.array([[c, -s], [s, c]])
        self._t = np.asarray(centre, dtype=float)

    def _flush(self) -> None:
        if self._obj is not None:
            self.nuc = ImageChops.lighter(self.nuc, self._obj[0])
            self.eos = ImageChops.lighter(self.eos, self._obj[1])
            self._obj = None

    def _xy(self, pts) -> list:
        return [tuple(p) for p in np.asarray(pts, dtype=float) @ self._m.T + self._t]

    def _paint(self, nuc: float, eos: float, fn) -> None:
        for draw, d in zip(self._draw, (nuc, eos)):
            if d > 0:
                fn(draw, int(round(255 * min(d, 1.0))))

    def polygon(self, pts, nuc: float = 0.0, eos: float = 0.0) -> None:
        xy = self._xy(pts)
        self._paint(nuc, eos, lambda d, v: d.polygon(xy, fill=v))

    def line(self, pts, width: float, nuc: float = 0.0, eos: float = 0.0) -> None:
        xy, wpx = self._xy(pts), max(1, int(round(width)))
        self._paint(nuc, eos, lambda d, v: d.line(xy, fill=v, width=wpx, joint="curve"))

    def disc(self, centre, r: float, nuc: float = 0.0, eos: float = 0.0) -> None:
        (x, y), r = self._xy([centre])[0], max(r, 0.5)
        self._paint(nuc, eos, lambda d, v: d.ellipse((x - r, y - r, x + r, y + r), fill=v))

    def layers(self):
        self._flush()
        return self.nuc, self.eos


def _rot(pts, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.asarray(pts) @ np.array([[c, s], [-s, c]])


def _blob(rng, rx: float, ry: float, wobble: float, taper: float = 0.0, n: int = 40) -> np.ndarray:
    """Closed contour of an ellipse with low-frequency radial wobble; apex at +x, neck at -x.

    `taper` > 0 widens the apex and narrows the neck (pear shape); a big `wobble` is amorphous.
    """
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4, 5):  # low harmonics only: lumpy, not jagged
        r += rng.normal(0, 2 * wobble / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return np.stack([rx * np.cos(t) * r, ry * np.sin(t) * r * (1 + taper * np.cos(t))], axis=1)


def head(cv: _Canvas, rng, length: float, width: float, sp: dict, dens: float,
         offset=(0, 0), tilt: float = 0.0) -> np.ndarray:
    """Stained nucleus with a paler acrosome cap over its apex; returns the neck point.

    sp["cap"] sets where the cap starts (cosine of the contour angle): about 0 covers half the
    head, near 1 leaves almost none (a small or missing acrosome is itself a defect)."""
    pts = _rot(_blob(rng, length / 2, width / 2, sp["wobble"], sp["taper"]), tilt) + offset
    cv.polygon(pts, nuc=dens)
    front = np.cos(np.linspace(0, 2 * np.pi, len(pts), endpoint=False)) > sp["cap"]
    half = len(pts) // 2  # roll so the cap's arc is contiguous
    if front.sum() >= 3:
        cv.polygon(np.roll(pts, half, axis=0)[np.roll(front, half)], nuc=dens * rng.uniform(0.5, 0.7))
    for _ in range(sp.get("vacuoles", 0)):  # pale holes in the chromatin
        spot = _rot(rng.uniform(-0.3, 0.3, 2) * (length, width), tilt) + offset
        cv.disc(spot, rng.uniform(0.07, 0.13) * length, nuc=dens * rng.uniform(0.2, 0.4))
    return pts[half]


def flagellum(rng, start, length: float, unit: float, bend=(0.0, 0.0), coil=(0.0, 0.0)) -> np.ndarray:
    """Centre line of midpiece + tail leaving the neck along -x: a gently curving random path.

    bend = (angle in radians, where in head lengths) adds a sharp kink; coil = (curvature per
    head length, where) curls the rest of the tail into loops."""
    step = max(unit / 8, 1.0)
    s = np.arange(max(int(length / step), 3)) * step
    kappa = rng.normal(0, 0.04) / unit + rng.uniform(0, 0.12) / unit * np.sin(
        2 * np.pi * s / (rng.uniform(3, 6) * unit) + rng.uniform(0, 2 * np.pi))
    kappa += np.where(s > coil[1] * unit, coil[0] / unit, 0.0)
    heading = np.pi + rng.normal(0, 0.06) + np.cumsum(kappa * step)
    heading[s > bend[1] * unit] += bend[0]
    steps = step * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def midpiece_and_tail(cv: _Canvas, rng, path: np.ndarray, unit: float, dens: float) -> None:
    """Short thick midpiece, then a thin tail that tapers and fades towards its end."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1).mean()
    m = max(int(rng.uniform(0.9, 1.3) * unit / seg), 2)
    cv.line(path[: m + 1], width=rng.uniform(0.13, 0.18) * unit, nuc=0.35 * dens, eos=dens)
    chunks = np.array_split(np.arange(m, len(path)), 8)
    w0 = rng.uniform(0.07, 0.1) * unit
    for k, idx in enumerate(c for c in chunks if len(c)):
        f = 1 - k / len(chunks)
        cv.line(path[idx[0]: idx[-1] + 2], width=max(w0 * f, 1), eos=dens * (0.45 + 0.4 * f))


def _mild_defect(rng, sign: int) -> dict:
    """One weak defect, within reach of normal variability: the genuinely hard abnormal cells."""
    kind = rng.choice(["tapered", "pyriform", "amorphous", "big", "small", "cap", "vacuole", "bent"])
    if kind == "tapered":
        return dict(ratio=rng.uniform(1.85, 2.1))
    if kind == "pyriform":
        return dict(taper=rng.uniform(0.15, 0.28))
    if kind == "amorphous":
        return dict(wobble=rng.uniform(0.06, 0.09))
    if kind in ("big", "small"):
        return dict(scale=rng.uniform(1.18, 1.3) if kind == "big" else rng.uniform(0.74, 0.84))
    if kind == "cap":
        return dict(cap=rng.uniform(0.4, 0.6))
    if kind == "vacuole":
        return dict(vacuoles=1)
    return dict(bend=(sign * rng.uniform(0.5, 0.9), rng.uniform(0.6, 1.4)))


def _head_defect(rng) -> dict:
    """A clearly misshapen head; most also lose their acrosome."""
    kind = rng.choice(["amorphous", "tapered", "pyriform", "double", "big", "small"])
    if kind == "amorphous":
        sp = dict(wobble=rng.uniform(0.3, 0.45), ratio=rng.uniform(1.0, 1.6), scale=rng.uniform(1.0, 1.4))
    elif kind == "tapered":
        sp = dict(ratio=rng.uniform(2.6, 3.6))
    elif kind == "pyriform":
        sp = dict(taper=rng.uniform(0.7, 1.0), ratio=rng.uniform(1.6, 2.0))
    elif kind == "double":
        sp = dict(double=True)
    else:
        sp = dict(scale=rng.uniform(1.5, 1.9) if kind == "big" else rng.uniform(0.45, 0.62))
    if rng.random() < 0.7:
        sp["cap"] = rng.uniform(0.6, 1.1)  # small or missing acrosome
    return sp


def _tail_defect(rng, sign: int) -> dict:
    """A sharp bend near the neck, a tail coiled into loops, or a stump."""
    kind = rng.choice(["bent", "coiled", "short"])
    if kind == "bent":
        return dict(bend=(sign * rng.uniform(1.8, 3.0), rng.uniform(0.3, 1.0)))
    if kind == "coiled":
        return dict(coil=(sign / rng.uniform(0.25, 0.45), rng.uniform(0.3, 0.8)), tail_len=rng.uniform(3, 5))
    return dict(tail_len=rng.uniform(0.4, 1.2))


def sperm_spec(rng, abnormal: bool) -> dict:
    """Shape parameters of one sperm (lengths in head lengths of a normal cell).

    A share MILD_SHARE of abnormal cells get one weak defect only. The others get a head and/or
    a tail defect, and always vacuolated chromatin: a texture cue that a small CNN learns from a
    few hundred images, where outline shape alone is learnt far more slowly (measured: with shape
    defects alone, the reference CNN stayed below 80% validation accuracy)."""
    sp = dict(scale=rng.normal(1, 0.06), ratio=np.clip(rng.normal(1.6, 0.1), 1.38, 1.82),
              taper=rng.normal(0, 0.04), wobble=0.025, cap=rng.uniform(-0.15, 0.25), double=False,
              vacuoles=0, tail_len=rng.uniform(5, 8), bend=(0.0, 0.0), coil=(0.0, 0.0))
    if not abnormal:
        return sp
    sign = rng.choice([-1, 1])
    if rng.random() < MILD_SHARE:
        return {**sp, **_mild_defect(rng, sign)}
    sp["vacuoles"] = int(rng.integers(2, 5))
    head_defect, tail_defect = rng.random() < 0.9, rng.random() < 0.5
    if head_defect or not tail_defect:
        sp.update(_head_defect(rng))
    if tail_defect:
        sp.update(_tail_defect(rng, sign))
    return sp


def cell_sperm(cv: _Canvas, rng, unit: float, sp: dict, dens: float) -> None:
    """Head(s) at the local origin, flagellum leaving the neck along -x."""
    length = unit * sp["scale"]
    width = length / sp["ratio"]
    if sp["double"]:
        spread = rng.uniform(0.35, 0.55)
        for side in (-1, 1):
            neck = head(cv, rng, length, width, sp, dens, offset=(0, side * spread * width),
                        tilt=side * rng.uniform(0.1, 0.35))
        neck = np.array([neck[0], 0.0])
    else:
        neck = head(cv, rng, length, width, sp, dens)
    path = flagellum(rng, neck, sp["tail_len"] * unit, unit, sp["bend"], sp["coil"])
    midpiece_and_tail(cv, rng, path, unit, dens * rng.uniform(0.55, 0.8))


def cell_non_sperm(cv: _Canvas, rng, unit: float, dens: float) -> None:
    """A round cell (leukocyte-like or epithelial-ish), debris, or a tail-less head-like fragment."""
    kind = rng.choice(["leukocyte", "epithelial", "debris", "fragment"], p=[0.35, 0.15, 0.3, 0.2])
    if kind == "leukocyte":
        r = unit * rng.uniform(0.55, 0.85)
        cv.polygon(_blob(rng, r, r, 0.03), eos=dens * rng.uniform(0.2, 0.4))
        for _ in range(rng.integers(2, 5)):  # lobed nucleus
            c = rng.normal(0, 0.28 * r, 2)
            cv.disc(c, r * rng.uniform(0.25, 0.42), nuc=dens * rng.uniform(0.65, 0.95))
        for _ in range(rng.integers(0, 25)):  # granules
            cv.disc(rng.uniform(-0.7, 0.7, 2) * r, rng.uniform(0.6, 1.5), nuc=dens * 0.8)
    elif kind == "epithelial":
        r = unit * rng.uniform(1.1, 1.8)
        cv.polygon(_blob(rng, r, r * rng.uniform(0.6, 1), 0.12), eos=dens * rng.uniform(0.15, 0.3))
        cv.disc(rng.normal(0, 0.2 * r, 2), r * rng.uniform(0.12, 0.2), nuc=dens * rng.uniform(0.6, 0.9))
    elif kind == "debris":
        for _ in range(rng.integers(1, 5)):
            r = unit * rng.uniform(0.15, 0.6)
            pts = _rot(_blob(rng, r, r * rng.uniform(0.4, 1), 0.2), rng.uniform(0, 2 * np.pi))
            pts = pts + rng.normal(0, 0.4 * unit, 2)
            cv.polygon(pts, nuc=dens * rng.uniform(0.3, 0.9), eos=dens * rng.uniform(0, 0.5))
        if rng.random() < 0.25:  # a loose fibre, tail-like but headless
            cv.line(flagellum(rng, rng.normal(0, 0.5 * unit, 2), rng.uniform(1, 3) * unit, unit),
                    width=rng.uniform(1, 2), eos=dens * 0.5)
    else:
        length = unit * rng.uniform(0.7, 1.2)
        shape = dict(taper=rng.normal(0, 0.1), wobble=0.05, cap=rng.uniform(0, 1.1))
        head(cv, rng, length, length / rng.uniform(1.4, 2.4), shape, dens)
        if rng.random() < 0.4:  # a stub, never a real tail
            cv.line([(-length / 2, 0), (-length * rng.uniform(0.7, 0.9), rng.normal(0, 2))],
                    width=0.12 * unit, eos=dens * 0.5)


def debris_and_neighbours(cv: _Canvas, rng, unit: float, dens: float) -> None:
    """Background specks, and sometimes part of a neighbouring cell entering at an edge."""
    w, h = cv.size
    if rng.random() < 0.6:
        cv.begin((0, 0), 0.0)
        for _ in range(rng.poisson(4)):
            cv.disc(rng.uniform(0, 1, 2) * (w, h), rng.uniform(0.5, 2.5), nuc=dens * rng.uniform(0.2, 0.8))
    if rng.random() < 0.15:
        side = rng.integers(4)
        t = rng.uniform(0.1, 0.9)
        margin = unit * rng.uniform(0.5, 1.0)
        centre = [(t * w, -margin), (w + margin, t * h), (t * w, h + margin), (-margin, t * h)][side]
        cv.begin(centre, rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.5:
            cell_sperm(cv, rng, unit, sperm_spec(rng, rng.random() < 0.5), dens)
        else:
            cell_non_sperm(cv, rng, unit, dens)


def background(rng, w: int, h: int) -> np.ndarray:
    """Pale, slightly tinted brightfield with uneven illumination (gradient, vignette, blotches)."""
    colour = np.array([230.0, 227.0, 235.0]) + rng.normal(0, 4) + rng.normal(0, 5, 3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x / w - 0.5, y / h - 0.5
    a = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.1) * (np.cos(a) * x + np.sin(a) * y) - rng.uniform(0, 0.25) * (x * x + y * y)
    blotch = Image.fromarray(rng.normal(0, 1, (4, 4)).astype(np.float32)).resize((w, h), Image.BICUBIC)
    light += rng.uniform(0, 0.025) * np.asarray(blotch)
    return np.clip(light, 0.6, 1.1)[..., None] * np.clip(colour, 180, 250)


def draw_image(label: str, rng: np.random.Generator) -> Image.Image:
    """One RGB crop of the given class, random size roughly 80-260 px a side (width and height
    independent-ish), the cell near the centre at any orientation."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    base, aspect = rng.uniform(90, 240), math.exp(rng.normal(0, 0.12))
    w, h = (int(np.clip(base * aspect ** s, 80, 260)) for s in (0.5, -0.5))
    unit = min(w, h) * rng.uniform(0.3, 0.35)  # head length of a normal cell, px
    dens = rng.uniform(0.8, 1.0)  # how strongly this slide took the stain
    cv = _Canvas(w, h)
    debris_and_neighbours(cv, rng, unit, dens)
    cv.begin((w / 2 + rng.normal(0, 0.07 * w), h / 2 + rng.normal(0, 0.07 * h)), rng.uniform(0, 2 * np.pi))
    if label == "Non-Sperm":
        cell_non_sperm(cv, rng, unit, dens)
    else:
        cell_sperm(cv, rng, unit, sperm_spec(rng, label == "Abnormal_Sperm"), dens)

    blur = ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2) * min(w, h) / 120)  # focus varies per image
    nuc, eos = (np.asarray(im.filter(blur), dtype=np.float32)[..., None] / 255 for im in cv.layers())
    strength = rng.uniform(0.85, 1.1)
    a_nuc = np.clip(NUCLEAR_ABSORBANCE + rng.normal(0, 0.08, 3), 0.1, None) * strength
    a_eos = np.clip(EOSIN_ABSORBANCE + rng.normal(0, 0.06, 3), 0.05, None) * strength
    img = background(rng, w, h) * np.exp(-(nuc * a_nuc + eos * a_eos))
    img += rng.normal(0, rng.uniform(1.5, 6), img.shape)  # sensor noise
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def generate(out_dir, per_class: int = 100, seed: int = 0, fmt: str = "bmp",
             progress: bool | None = None) -> dict[str, int]:
    """Write out_dir/<Class>/<Class> (i).<fmt> for i in 1..per_class, for each class in CLASSES;
    return counts per class.

    Deterministic: image i of class c uses a generator seeded from SeedSequence([seed, c, i]),
    so a seed gives byte-identical files and image i does not depend on per_class.
    progress=None shows a bar only when stderr is a terminal.
    """
    if fmt not in ("bmp", "png"):
        raise ValueError(f"fmt must be 'bmp' or 'png', not {fmt!r}")
    if seed < 0 or per_class < 0:
        raise ValueError("seed and per_class must be >= 0")
    out = pathlib.Path(out_dir)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    jobs = [(ci, c, i) for ci, c in enumerate(CLASSES) for i in range(1, per_class + 1)]
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    with click.progressbar(jobs, label="synthesising", file=sys.stderr, hidden=not show) as bar:
        for ci, c, i in bar:
            rng = np.random.default_rng(np.random.SeedSequence([seed, ci, i]))
            draw_image(c, rng).save(out / c / f"{c} ({i}).{fmt}")
    return {c: per_class for c in CLASSES}


def data_or_synthetic(root, per_class: int = 100, seed: int = 0) -> tuple[pathlib.Path, bool]:
    """`root` when it holds class folders; otherwise a synthetic set made once in `root/synthetic`.

    Returns (data root, whether it is synthetic), so notebooks and demos can say so plainly.
    """
    from smids_ml.data import find_class_root  # loads torch, which the synth command itself never needs

    root = pathlib.Path(root).resolve()
    try:
        found = find_class_root(root)
        return found, "synthetic" in found.relative_to(root).parts
    except SmidsError:
        target = root / "synthetic"
        if not target.exists():
            generate(target, per_class=per_class, seed=seed)
        return target, True


@click.command("synth", cls=Command)
@click.argument("out", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--format", "fmt", type=click.Choice(["bmp", "png"]), default="bmp", show_default=True)
def main(out, per_class, seed, fmt):
    """Write a SYNTHETIC SMIDS-like data set (one folder per class) to OUT, for tests and demos.

    The images are procedurally drawn look-alikes, not real microscope data: never report
    results on them as results on SMIDS.
    """
    if seed < 0:
        raise click.BadParameter("must be >= 0", param_hint="'--seed'")
    counts = generate(out, per_class=per_class, seed=seed, fmt=fmt)
    summary = ", ".join(f"{c}: {n}" for c, n in counts.items())
    click.echo(f"Wrote {sum(counts.values())} synthetic images ({summary}) to {out}")


if __name__ == "__main__":
    main()
