"""The README and the documentation site say what runs: the site builds strictly and renders in a real headless
Chromium, the README stays a user's page, and its commands run on synthetic data."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from smids_ml.cli import COMMANDS
from tests.conftest import BIN, ROOT
from tests.helpers import chromium, console_errors, not_blank

README = ROOT / "README.md"


def readme_section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def shell_commands(markdown: str) -> list[str]:
    """The command lines of a section's bash blocks: comments dropped, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def nav_pages() -> dict[str, str]:
    """mkdocs.yml's navigation: {title: page file}."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return {title: page for entry in nav for title, page in entry.items()}


# --------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`mkdocs build --strict` (what `make docs-build` and CI run) into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on loopback, as `mkdocs serve` or any static server would give it."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def page_url(base: str, page: str) -> str:
    return f"{base}/" if page == "index.md" else f"{base}/{page.removesuffix('.md')}/"


def test_every_page_is_in_the_navigation_and_nothing_else():
    pages = set(nav_pages().values())
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == on_disk


def test_site_renders_in_headless_chromium_with_every_page_in_its_navigation(served, tmp_path):
    """The home page and an inner page load without console errors, draw something (screenshots), and the
    navigation lists every page of mkdocs.yml."""
    pages = nav_pages()
    with chromium(window="1400,1000") as driver:
        driver.get(page_url(served, "index.md"))
        home = driver.find_element("tag name", "body").text
        links = driver.execute_script(
            "return Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link'))"
            ".map(a => [a.href, a.textContent.trim()])")
        home_errors = console_errors(driver)
        driver.save_screenshot(str(tmp_path / "home.png"))

        driver.get(page_url(served, "architecture.md"))
        inner = driver.find_element("tag name", "body").text
        inner_errors = console_errors(driver)
        driver.save_screenshot(str(tmp_path / "architecture.png"))
    assert home_errors == [] and inner_errors == []
    assert "Quick start" in home and "make demo" in home
    assert "Who calls whom" in inner and "The path of one crop" in inner
    hrefs = {href.split("#")[0] for href, _ in links}
    titles = {title for _, title in links}
    for title, page in pages.items():
        assert page_url(served, page) in hrefs, page
        assert title in titles, title
    assert not_blank(tmp_path / "home.png") and not_blank(tmp_path / "architecture.png")


def test_cli_reference_is_generated_from_the_commands(site):
    """Every command of the `smids-ml` group, with its options, comes from click, not from a copy."""
    html = (site / "cli" / "index.html").read_text()
    for name in COMMANDS:
        assert f'id="smids-ml-{name}"' in html, name
    for option in ("--label-column", "--split-column", "--budget", "--finalists", "--review-below", "--fix-stale"):
        assert option in html, option


# --------------------------------------------------------------------------- the README


def test_readme_is_a_users_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for lab_note in ("session 2", "¹", "² ", "³", "(below)", "(above)"):
        assert lab_note not in text, lab_note
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()  # the README's test command is CI's
    assert "make docs-build" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_command_table_says_what_help_says():
    """A `smids-ml` row of the README's table is the group's own one-line help for that command."""
    rows = re.findall(r"^\| `smids-ml (\w+)` \| (.*) \|$", readme_section("Main commands"), re.M)
    assert {name for name, _ in rows} >= {"train", "cv", "tune", "evaluate", "predict", "report", "server"}
    for name, text in rows:
        assert text == COMMANDS[name][2], name


def test_readme_links_lead_to_pages_and_anchors_of_the_site(site):
    """Every relative link of the README names a file that exists, and a link into docs/ with an anchor names a
    heading the built site has."""
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            page = Path(path).relative_to("docs")
            html = site / ("index.html" if page.name == "index.md" else page.with_suffix("") / "index.html")
            assert f'id="{anchor}"' in html.read_text(), target


# --------------------------------------------------------------------------- the README's commands, run


def run(command: str, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(shlex.split(command) if isinstance(command, str) else command, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def own_tracking_env(cwd: Path) -> dict:
    """The environment of a user's shell in `cwd`: its own ./mlflow.db, not the suite's server."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}


# Training commands of the README train the full default recipe (155 epochs or more at 96 px); run here they get
# these flags appended, which the README says any flag may do ("any flag you give wins"), so they take seconds.
SMALL = ["--epochs", "1", "--image-size", "32", "--num-threads", "1"]


def test_your_own_data_commands_run_as_written_on_synthetic_crops(tmp_path):
    """The README's "Your own data" commands, run in order in a folder where `my-crops/` is synthetic crops in
    class folders beside a labels table, and `new-crops/` three more crops; training commands get SMALL."""
    from smids_ml.synth import generate

    crops = tmp_path / "my-crops"
    generate(crops, per_class=8, seed=3)
    files = sorted(p.relative_to(crops).as_posix() for p in crops.rglob("*.bmp"))
    table = pd.DataFrame({"path": files, "morphology": [f.split("/")[0] for f in files],
                          "split": ["test" if i % 4 == 0 else "train" for i in range(len(files))]})
    table.to_csv(crops / "labels.csv", index=False)
    (tmp_path / "new-crops").mkdir()
    for file in files[::9]:
        shutil.copy(crops / file, tmp_path / "new-crops" / Path(file).name)

    commands = shell_commands(readme_section("Your own data"))
    assert [c.split()[:2] for c in commands] == [["smids-ml", "explore"], ["smids-ml", "cv"], ["smids-ml", "train"],
                                                ["smids-ml", "train"], ["smids-ml", "predict"]]
    env = own_tracking_env(tmp_path)
    outputs = []
    for command in commands:
        argv = shlex.split(command) + (SMALL if command.split()[1] in ("train", "cv") else [])
        outputs.append(run(argv, tmp_path, env))
    assert "from the data:" in outputs[0].stdout + outputs[0].stderr
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == len(files[::9]) and predictions["error"].isna().all()
    assert set(predictions["label"]) <= set(table["morphology"]) | {"uncertain"}


def test_quick_start_demo_runs_on_a_few_synthetic_images(tmp_path):
    """`make demo` is `scripts/demo.sh` in the project's environment (the Makefile says so); here it runs in a
    fresh copy of the working tree, as in a new clone, with DEMO_PER_CLASS=8, DEMO_EPOCHS=2 and DEMO_IMAGE_SIZE=32
    (the full demo trains 600 images for up to 15 epochs): the same steps, from synthetic data to a registered
    champion, its evaluation and three predictions. `make test` is what .ci/run calls (above) and runs this suite."""
    assert shell_commands(readme_section("Quick start")) == ["make demo", "make test"]
    make = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert "bash scripts/demo.sh" in make.stdout.splitlines()

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    clone = tmp_path / "clone"
    for name in listed:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    env |= {"DEMO_PER_CLASS": "8", "DEMO_EPOCHS": "2", "DEMO_IMAGE_SIZE": "32"}
    done = run(["bash", "scripts/demo.sh"], clone, env, timeout=1500)
    assert "Done. Next:" in done.stdout
    assert (clone / "mlflow.db").exists() and (clone / "data" / "synthetic" / "Normal_Sperm").is_dir()
    predictions = pd.read_csv(clone / "outputs" / "demo_predictions.csv")
    assert len(predictions) == 3 and predictions["error"].isna().all()
