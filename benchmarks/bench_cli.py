"""How long a refused flag takes: `python -m benchmarks.bench_cli`.

Each command runs as a user types it (`smids-ml ...`, a fresh process), a few times; the table gives the median wall
time beside the baseline in the same run, `smids-ml --help`, which loads neither torch nor MLflow. A flag of `train`,
`cv` or `tune` is checked before those libraries load (`smids_ml.commands`), so its refusal costs about the
baseline.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine, table

BASELINE = ["--help"]
COMMANDS = [["train", "--lr", "nan"], ["train", "--dropout-rate", "2"], ["train", "--help"], ["cv", "--folds", "1"],
            ["tune", "--timeout", "nan"], ["tune", "--budget", "inf"]]
REPEATS = 3


def smids_ml() -> list[str]:
    """The console script beside this interpreter, as a user runs it; else the same module through `-m`."""
    script = Path(sys.executable).with_name("smids-ml")
    return [str(script)] if script.exists() else [sys.executable, "-m", "smids_ml.cli"]


def wall_seconds(args: list[str]) -> float:
    """The median wall time of `smids-ml ARGS` over REPEATS fresh processes."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([*smids_ml(), *args], capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"bench_cli: wall time of a refused flag, median of {REPEATS} fresh processes; {machine()}", flush=True)
    base = wall_seconds(BASELINE)
    rows = [["smids-ml " + " ".join(BASELINE), base, "1.00x"]]
    for args in COMMANDS:
        seconds = wall_seconds(args)
        rows.append(["smids-ml " + " ".join(args), seconds, f"{seconds / base:.2f}x"])
    print(table(["command", "wall seconds", "vs --help"], rows))


if __name__ == "__main__":
    main()
