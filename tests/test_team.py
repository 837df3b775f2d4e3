"""Team scale: several tuning workers on one PostgreSQL study behind one `smids-ml server`.

Every test gets a fresh PostgreSQL database for the study and its own tracking server (SQLite
backend, proxied artifacts), started with `smids-ml server` on loopback.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import BIN, TINY, free_port, stop, wait_for_http
from tests.helpers import assert_one_line_error, invoke

GRID = [0.001, 0.002, 0.003, 0.004]
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "epochs"] + ["--finalists=0", "--ranking=split"]


class Server:
    """`smids-ml server` on a fixed loopback port, so that it can be stopped and started again."""

    def __init__(self, home):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.process = subprocess.Popen(
            [str(BIN / "smids-ml"), "server", "--port", str(self.port), "--backend-store-uri",
             f"sqlite:///{self.home}/server.db", "--artifacts-destination", str(self.home / "artifacts")],
            cwd=self.home, env=env, stdout=open(self.home / "server.log", "a"), stderr=subprocess.STDOUT)
        wait_for_http(f"{self.url}/health", self.process)

    def stop(self):
        stop(self.process)


@pytest.fixture
def team(tmp_path, monkeypatch):
    previous = mlflow.get_tracking_uri()
    server = Server(tmp_path)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    yield server
    mlflow.set_tracking_uri(previous)
    server.stop()


def worker(team, synth_data, tmp_path, storage: str, study: str, epochs: int, *extra: str) -> subprocess.Popen:
    space = tmp_path / f"{study}.yaml"
    space.write_text(f"fixed: {{model: improved_cnn}}\nparams:\n  lr: {GRID}\n")
    command = [sys.executable, "-m", "smids_ml.tune", "--data", str(synth_data), "--experiment", "team",
               "--storage", storage, "--study-name", study, "--sampler", "grid", "--space", str(space),
               "--register-as", study, "--pruner", "none", "--heartbeat", "2", "--epochs", str(epochs), *FLAGS, *extra]
    log = open(tmp_path / f"worker-{time.monotonic_ns()}.log", "w+")
    process = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, MLFLOW_TRACKING_URI=team.url),
                               stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log
    return process


def finish(processes) -> list[tuple[int, str]]:
    """(exit status, the end of stderr without epoch lines) of each worker, once all have ended."""
    codes = [p.wait(timeout=600) for p in processes]
    tails = []
    for p in processes:
        p.log.seek(0)
        tails.append("".join(line for line in p.log if not line.startswith("epoch "))[-2000:])
    return list(zip(codes, tails))


def one_parent_and_its_children(study_name: str):
    runs = mlflow.search_runs(experiment_names=["team"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags
               and r.data.tags.get("optuna.study") == study_name]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def check_study(study: optuna.Study, study_name: str):
    """Every point completed exactly once; one trial, one child run; the alias on the best trial's version."""
    _, children = one_parent_and_its_children(study_name)
    assert len(study.trials) == len(children)
    completed = collections.Counter(t.params["lr"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert sorted(completed) == GRID and set(completed.values()) == {1}
    version = MlflowClient().get_model_version_by_alias(study_name, "champion")
    assert int(version.tags["trial"]) == study.best_trial.number
    return children


def test_three_workers_share_one_grid_study(team, synth_data, tmp_path, postgres_url):
    results = finish([worker(team, synth_data, tmp_path, postgres_url, "shared", epochs=2) for _ in range(3)])
    assert [code for code, _ in results] == [0, 0, 0], results
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert len(study.trials) == len(GRID)
    check_study(study, "shared")


def test_two_workers_share_the_rungs_of_one_study(team, synth_data, tmp_path, postgres_url):
    """Successive halving across workers: each point's first rung runs once, every rung-0 score is in the shared
    storage where the other worker's promotions read it, and exactly the promoted trials train the next rung."""
    results = finish([worker(team, synth_data, tmp_path, postgres_url, "rungs", 3, "--pruner=halving",
                             "--monitor=valid_loss") for _ in range(2)])
    assert [code for code, _ in results] == [0, 0], results
    study = optuna.load_study(study_name="rungs", storage=postgres_url)
    assert sorted(t.params["lr"] for t in study.trials) == GRID
    assert all("completed_rung_0" in t.system_attrs for t in study.trials)
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    _, children = one_parent_and_its_children("rungs")
    rungs = collections.Counter((r.data.tags["optuna.trial"], r.data.tags["smids_ml.rung"]) for r in children)
    assert set(rungs.values()) == {1}
    promoted = {r.data.tags["optuna.trial"] for r in children if r.data.tags["optuna.state"] == "PROMOTED"}
    assert promoted == {trial for trial, rung in rungs if rung == "1"}
    assert promoted == {str(t.number) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    with dashboard(postgres_url) as get:  # each trial's rungs are its intermediate values, at steps eta**rung
        [summary] = get("/api/studies")["study_summaries"]
        trials = get(f"/api/studies/{summary['study_id']}")["trials"]
    steps = {str(t["number"]): sorted(v["step"] for v in t["intermediate_values"]) for t in trials}
    assert steps == {str(t.number): ([1, 3] if str(t.number) in promoted else [1]) for t in study.trials}


def test_two_workers_score_the_finalists_and_refit_once(team, synth_data, tmp_path, postgres_url):
    results = finish([worker(team, synth_data, tmp_path, postgres_url, "final", 1, "--finalists=2", "--folds=2")
                      for _ in range(2)])
    assert [code for code, _ in results] == [0, 0], results
    assert sum("already scored" in tail for _, tail in results) == 1, results
    parent, children = one_parent_and_its_children("final")
    refits = [r for r in children if "smids_ml.refit_of" in r.data.tags]
    assert len(refits) == 1 and refits[0].info.status == "FINISHED"
    assert len([r for r in children if r.info.run_name.startswith("finalist ")]) == 2
    assert "finalists.csv" in {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    versions = MlflowClient().search_model_versions("name = 'final'")
    assert len(versions) == 1 and versions[0].tags["run_id"] == refits[0].info.run_id


def test_a_killed_workers_trial_fails_and_another_worker_reruns_it(team, synth_data, tmp_path, postgres_url):
    workers = [worker(team, synth_data, tmp_path, postgres_url, "killed", epochs=40) for _ in range(3)]
    deadline, victim = time.time() + 180, None
    while victim is None and time.time() < deadline:
        try:
            running = optuna.load_study(study_name="killed", storage=postgres_url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            running = []
        training = [t for t in running if t.intermediate_values and "smids_ml.pid" in t.user_attrs]
        if training:
            victim = training[0]
        time.sleep(0.2)
    assert victim is not None, "no trial started training"
    os.kill(int(victim.user_attrs["smids_ml.pid"]), signal.SIGKILL)
    results = finish(workers)
    assert sorted(code for code, _ in results) == [-signal.SIGKILL, 0, 0], results
    study = optuna.load_study(study_name="killed", storage=postgres_url)
    assert study.trials[victim.number].state == TrialState.FAIL
    assert MlflowClient().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    rerun = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params["lr"] == victim.params["lr"]]
    assert len(rerun) == 1 and rerun[0].number > victim.number
    check_study(study, "killed")


def test_a_restarted_tracking_server_loses_no_finished_trial(team, synth_data, tmp_path, postgres_url):
    workers = [worker(team, synth_data, tmp_path, postgres_url, "restart", epochs=15) for _ in range(2)]
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name="restart", storage=postgres_url)
            if study.get_trials(states=(TrialState.COMPLETE,)):
                break
        except KeyError:
            pass
        time.sleep(0.2)
    team.stop()
    time.sleep(3)
    team.start()
    results = finish(workers)
    assert [code for code, _ in results] == [0, 0], results
    study = optuna.load_study(study_name="restart", storage=postgres_url)
    children = check_study(study, "restart")
    assert {r.info.status for r in children} == {"FINISHED"}
    assert all(r.data.metrics.get("best_valid_f1") is not None for r in children)


def test_an_unreachable_study_storage_or_tracking_server_is_one_line(synth_data, tracking):
    url = "postgresql://postgres@127.0.0.1:1/nothing"
    result = invoke(["tune", "--data", str(synth_data), "--storage", url, "--sampler", "grid", "--space", "improved-grid"])
    assert_one_line_error(result, f"cannot reach Optuna storage {url}")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        result = invoke(["train", "--data", str(synth_data), "--epochs", "1"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert_one_line_error(result, "cannot reach the tracking server http://127.0.0.1:9")


def test_a_tracking_server_that_answered_is_not_asked_again():
    """tune checks the server before its study and again on choosing the experiment: one /health request."""
    from smids_ml.tracking import check_server

    asked = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        check_server()
        check_server()
    finally:
        mlflow.set_tracking_uri(previous)
        server.shutdown()
    assert asked == ["/health"]


@contextlib.contextmanager
def dashboard(storage: str):
    """A real optuna-dashboard on loopback; yields a function that GETs its JSON API."""
    port = free_port()
    process = subprocess.Popen([str(BIN / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.load(response)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", process, timeout=60)
        yield get
    finally:
        stop(process)


def test_optuna_dashboard_shows_the_shared_study(postgres_url):
    optuna.create_study(study_name="watched", storage=postgres_url).optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    with dashboard(postgres_url) as get:
        studies = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["watched"]
