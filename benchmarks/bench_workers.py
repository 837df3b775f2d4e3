"""Wall time of one small grid study run by 1, 2 and 3 tuning workers: `python -m benchmarks.bench_workers`.

The same 6-point grid (improved_cnn, 48 px, 4 epochs, 300 synthetic crops) is run three times
against one `smids-ml server` (SQLite backend, proxied artifacts), each time as a fresh study in
a fresh journal file, by N workers started together. The table gives each wall time and its
ratio to one worker. On a machine with fewer cores than workers, more workers share the same
cores: the ratio shows the coordination overhead, not a speed-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import free_port, machine, synthetic_set, table

GRID = "fixed: {model: improved_cnn}\nparams:\n  lr: [0.0005, 0.001, 0.002]\n  dropout_rate: [0.2, 0.4]\n"
FLAGS = ["--image-size", "48", "--epochs", "4", "--batch", "32", "--patience", "0", "--pruner", "none",
         "--num-threads", "1", "--finalists", "0"]  # the search's throughput alone


def wait_for(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("smids-ml server exited before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


def study(workers: int, data: Path, home: Path, url: str) -> float:
    space = home / "grid.yaml"
    space.write_text(GRID)
    command = [sys.executable, "-m", "smids_ml.tune", "--data", str(data), "--experiment", f"workers-{workers}",
               "--storage", str(home / f"study-{workers}.journal"), "--study-name", f"bench-{workers}",
               "--sampler", "grid", "--space", str(space), "--register-as", "", *FLAGS]
    env = dict(os.environ, MLFLOW_TRACKING_URI=url)
    start = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(workers)]
    codes = [p.wait() for p in processes]
    if any(codes):
        raise RuntimeError(f"a worker failed: exit statuses {codes}")
    return time.perf_counter() - start


def main() -> None:
    print(f"bench_workers: a 6-point grid study by 1, 2 and 3 workers; {machine()}", flush=True)
    data = synthetic_set(300)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        home, port = Path(tmp), free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "smids-ml"), "server", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--artifacts-destination",
                                   f"{tmp}/artifacts"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{url}/health", server)
            seconds = {n: study(n, data, home, url) for n in (1, 2, 3)}
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(table(["workers", "wall seconds", "vs 1 worker"], [[n, s, f"{s / seconds[1]:.2f}x"] for n, s in seconds.items()]))


if __name__ == "__main__":
    main()
