"""Hyperparameter search on the tiny model: pruning, resume after a kill, the best values trained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import invoke_cli, search_spec
from ray_servers import RayCluster, ray_cluster

from tuneline.errors import TunelineError


def _study(ws: Path):
    import optuna

    storage = f"sqlite:///{ws / 'studies.db'}"
    names = optuna.study.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def test_search_prunes_and_run_trains_the_best(tmp_path: Path, tiny_model_dir: Path):
    import mlflow
    from rich.console import Console

    from tuneline.pipeline import run

    spec = search_spec(tmp_path, tiny_model_dir)
    ws = tmp_path / "ws"
    result = run(spec, workspace=ws, show_progress=False, console=Console(width=200))
    study = _study(ws)
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6, states
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert pruned, f"nothing was pruned: {[(t.params, t.intermediate_values) for t in trials]}"
    full = max(len(t.intermediate_values) for t in complete)
    # a pruned trial stopped early: fewer validations than a trial that ran to the end
    assert all(len(t.intermediate_values) < full for t in pruned)
    # trial 0 is the spec's own values (the hand-set default, measured beside the search's picks)
    assert trials[0].params == {"lr": 1.0e-2, "lora.r": 8} and trials[0].user_attrs.get("default") is True
    # the final run trained with the best trial's values
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    params = client.get_run(result.run_id).data.params
    best = study.best_trial
    assert float(params["search.best.lr"]) == pytest.approx(best.params["lr"])
    assert int(params["search.best.lora.r"]) == best.params["lora.r"]
    adapter_cfg = json.loads((Path(result.train.adapter_dir) / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == best.params["lora.r"]
    # each trial is an MLflow child run of the run
    children = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{result.run_id}'")
    assert len(children) == 6
    # `tuneline runs` lists the run, not its trials (unless --trials)
    from tuneline.tracking import list_runs
    from tuneline.workspace import Workspace

    assert [r["run_id"] for r in list_runs(Workspace.at(ws))] == [result.run_id]
    assert len(list_runs(Workspace.at(ws), include_trials=True)) == 7
    # the run's report shows the search: every trial, the best one, the two plots
    from tuneline.report import write_report

    page = write_report(result.run_id, ws).read_text()
    assert 'id="search"' in page and f"Best: trial {best.number}</strong>" in page
    assert page.count("(best)") == 1 and page.count("pruned") >= len(pruned)
    assert 'alt="optimization history"' in page and 'alt="parallel coordinates"' in page


def _finished(ws: Path) -> int:
    import sqlite3

    db = ws / "studies.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_search_resumes_after_a_kill_without_rerunning_finished_trials(tmp_path: Path, tiny_model_dir: Path):
    spec = search_spec(tmp_path, tiny_model_dir, extra="")
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "tuneline.cli", "tune", str(spec), "-w", str(ws), "--no-progress"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while _finished(ws) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.params, t.value, t.state.name) for t in _study(ws).get_trials()
              if t.state.name in ("COMPLETE", "PRUNED")}
    assert len(before) >= 2

    # the commands after the kill run in this process (its imports are loaded already)
    args = ["tune", str(spec), "-w", str(ws), "--no-progress"]
    again = invoke_cli(*args)  # not silently restarted: refused, with what to do (the error `main` prints)
    assert again.exit_code != 0 and isinstance(again.exception, TunelineError)
    assert "--resume" in again.exception.render()

    resumed = invoke_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    trials = _study(ws).get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6
    for t in trials:  # finished trials are untouched, not rerun
        if t.number in before:
            assert (t.params, t.value, t.state.name) == before[t.number]
    # only the missing trials ran in the second process: one "trial N:" line each
    ran = [line for line in resumed.stdout.splitlines() if line.startswith("trial ")]
    assert len(ran) == 6 - len(before), resumed.stdout
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    for t in interrupted:  # the trial that was running at the kill was queued again with its values
        assert any(r.user_attrs.get("retry_of") == t.number and r.params == t.params for r in trials)


def _trial_runs(ws: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, "tags.`tuneline.kind` = 'search-trial'", max_results=1000) if exps else []


def test_trials_run_in_parallel_worker_processes(tmp_path: Path, tiny_model_dir: Path):
    from rich.console import Console

    from tuneline.pipeline import tune

    spec = search_spec(tmp_path, tiny_model_dir, trials=4)
    ws = tmp_path / "ws"
    found = tune(spec, workspace=ws, workers=2, show_progress=False, console=Console(width=200))
    assert sum(1 for t in found.trials if t.state in ("complete", "pruned")) >= 4
    workers = {r.data.tags["tuneline.worker"] for r in _trial_runs(ws)}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers), workers
    assert found.best is not None and found.best.params == found.best_params


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    """A one-node Ray cluster of 2 CPUs with a token of its own (tests/ray_servers.py), stopped at the end."""
    with ray_cluster(num_cpus=2) as c:
        yield c


@pytest.mark.slow  # a Ray cluster started and a worker killed: ~75 s (`make test-slow`); the parallel-worker
# search above stays in the default run
def test_search_on_a_ray_cluster_survives_a_killed_trial_worker(tmp_path: Path, tiny_model_dir: Path,
                                                               cluster: RayCluster):
    spec = search_spec(tmp_path, tiny_model_dir, trials=4, extra=f"""
          backend: ray
          ray: {{address: "{cluster.address}", cpus_per_trial: 1, max_failures: 1}}
    """)
    spec.write_text(spec.read_text().replace("train: {method: lora, lr: 1.0e-2, lora: {r: 8}, epochs: 3,",
                                 "train: {method: lora, lr: 1.0e-2, lora: {r: 8}, epochs: 12,"))
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "tuneline.cli", "tune", str(spec), "-w", str(ws), "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, **cluster.env, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        # a trial folder exists only after the tracking store is set up: opening the store while the
        # driver still creates its tables would race its schema migration
        started = any((ws / "studies").glob("*/trial-*")) if (ws / "studies").is_dir() else False
        running = [r for r in _trial_runs(ws) if r.info.status == "RUNNING"] if started else []
        if running:  # a trial is training in a Ray worker: kill that process
            killed = running[0].data.tags["tuneline.worker"]
            os.kill(int(killed.rsplit(":", 1)[1]), signal.SIGKILL)
        time.sleep(0.3)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, out
    assert proc.returncode == 0, out
    study = _study(ws)
    trials = study.get_trials()
    assert len(trials) == 4
    # the attempt the kill interrupted (the worker may have moved on to another trial since it was seen)
    interrupted = [r for r in _trial_runs(ws) if r.data.tags.get("tuneline.trial_state") == "interrupted"]
    assert interrupted and {r.data.tags["tuneline.worker"] for r in interrupted} == {killed}, out
    for trial_id in {r.data.tags["tuneline.trial"] for r in interrupted}:
        victim = next(t for t in trials if t.user_attrs["ray_trial_id"] == trial_id)
        # the killed trial was retried (a second attempt) or recorded as failed; the search finished
        assert victim.user_attrs["attempts"] == 2 or victim.state.name == "FAIL", (victim.state, victim.user_attrs)
    assert sum(1 for t in trials if t.state.name in ("COMPLETE", "PRUNED")) >= 3
