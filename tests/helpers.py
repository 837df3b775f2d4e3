"""Small helpers the tests share: image files on disk, checking a command's one-line error, a headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import importlib.metadata
import tomllib

import numpy as np
from click.testing import CliRunner
from packaging.requirements import Requirement
from PIL import Image

from tests.conftest import ROOT


def write_image(path: Path, size=(60, 40), seed: int = 0, fmt: str | None = None) -> Path:
    """A random RGB image (distinct content per seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_dataset(root: Path, classes=("Abnormal_Sperm", "Non-Sperm", "Normal_Sperm"), per_class: int = 6,
                 ext: str = "png") -> Path:
    for c_index, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{name} ({i + 1}).{ext}", seed=1000 * c_index + i)
    return root


def write_wide_twins(folder: Path, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Images as cameras write them beside their 8-bit equivalents: {kind: (8-bit file, wide file)} for a
    16-bit grey PNG, a 16-bit RGB TIFF and a float TIFF in [0, 1]."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (44, 36), dtype=np.uint8)
    pairs = {"grey16": (Image.fromarray(grey), Image.fromarray(grey.astype(np.uint16) * 257)),
             "float": (Image.fromarray(grey), Image.fromarray(grey.astype(np.float32) / 255))}
    out = {}
    for kind, (narrow, wide) in pairs.items():
        out[kind] = (folder / f"{kind}-8bit.png", folder / f"{kind}.{'png' if kind == 'grey16' else 'tif'}")
        narrow.save(out[kind][0])
        wide.save(out[kind][1])
    out["rgb16"] = (folder / "rgb16-8bit.png", folder / "rgb16.tif")
    Image.fromarray(rgb).save(out["rgb16"][0])
    tifffile.imwrite(out["rgb16"][1], rgb.astype(np.uint16) * 257, photometric="rgb")
    return out


def make_colour_dataset(root: Path, per_class: int = 12) -> Path:
    """Three classes told apart by colour alone: any working training learns it in an epoch or two."""
    rng = np.random.default_rng(0)
    for name, colour in (("Abnormal_Sperm", (200, 40, 40)), ("Non-Sperm", (40, 200, 40)), ("Normal_Sperm", (40, 40, 200))):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40 + i, 48, 3)), 0, 255).astype(np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{name} ({i + 1}).png")
    return root


def mlflow_run(entry: str, experiment: str, params: dict, cwd: Path, env_manager: str = "local",
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`mlflow run <repo> -e ENTRY --env-manager local` with `-P` params; asserts it succeeded.

    set_experiment in this process exports MLFLOW_EXPERIMENT_ID, which `mlflow run` would reject
    beside --experiment-name, so the child does not inherit it.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"} | (extra_env or {})
    done = subprocess.run(["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", env_manager, "--experiment-name",
                           experiment, *[f"-P{k}={v}" for k, v in params.items()]],
                          capture_output=True, text=True, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def invoke(args: list[str]):
    from smids_ml.cli import main

    return CliRunner().invoke(main, args)


def assert_one_line_error(result, *fragments: str, exit_code: int = 1) -> str:
    """The command failed with a click error (not a traceback) naming every fragment."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), f"unexpected exception {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def grey_imbalanced_set(root, synth_data, side: int = 48, counts=(14, 6)):
    """Two classes of grey crops `side` px square, `counts` of each, drawn from the synthetic set."""
    sources = sorted(synth_data.rglob("*.bmp"))
    for name, count, offset in zip(("Abnormal", "Normal"), counts, (0, 20)):
        (root / name).mkdir(parents=True)
        for i, source in enumerate(sources[offset:offset + count]):
            Image.open(source).convert("L").resize((side, side)).save(root / name / f"{name}_{i}.png")
    return root


@contextmanager
def chromium(window: str = "1200,1600"):
    """Debian's Chromium (installed by `make system`), headless, through its chromedriver; the browser's console
    log is kept (`driver.get_log("browser")`), so a test can assert that a page made no errors."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={window}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:
    """The browser console's errors since the last call (the log is drained by reading it)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def not_blank(png: Path) -> bool:
    """A screenshot with contrast and many grey levels: a page was drawn, not an empty or error screen."""
    shot = np.asarray(Image.open(png).convert("L"), dtype=float)
    return shot.std() > 20 and len(np.unique(shot)) > 50


def direct_requirements(extras=("dev", "docs")) -> list[Requirement]:
    """pyproject's dependencies and the extras named (make setup installs dev and docs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(line for extra in extras for line in project["optional-dependencies"][extra])]
    return [Requirement(line) for line in lines]


def locked_versions(lock: Path | None = None) -> dict[str, str]:
    """The lock's pins that apply here (its markers evaluated for this Python and platform), by package name.
    The lock is constraints.txt, or the one SMIDS_ML_LOCK names (make test-latest, make test-lowest)."""
    lock = lock or Path(os.environ.get("SMIDS_ML_LOCK", ROOT / "constraints.txt"))
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[canonical(req.name)] = str(next(iter(req.specifier))).removeprefix("==")
    return pins


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def lock_mismatches(site_packages: list[str] | None = None, extras=("dev", "docs"), lock: Path | None = None
                    ) -> list[str]:
    """'NAME: installed X, the lock has Y' for each direct dependency (with these extras) installed in this
    environment, or in the site-packages folders given, at another version than the lock's (`locked_versions`)."""
    installed = {canonical(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions(**({"path": site_packages} if site_packages else {}))}
    pins = locked_versions(lock)
    return [f"{req.name}: installed {installed.get(canonical(req.name), 'nothing')}, the lock has "
            f"{pins.get(canonical(req.name), 'nothing')}"
            for req in direct_requirements(extras)
            if installed.get(canonical(req.name)) != pins.get(canonical(req.name))]
