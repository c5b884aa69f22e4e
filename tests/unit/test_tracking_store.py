"""A new workspace's MLflow store, copied from an empty one made once per MLflow version
(tuneline.workspace.seed_tracking_store) instead of migrated from nothing in every workspace."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tuneline.workspace import TRACKING_URI_ENV, Workspace, seed_tracking_store


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    return tmp_path / "cache" / "tuneline"


def _schema(db: Path) -> set[tuple[str, str]]:
    with sqlite3.connect(db) as c:
        return set(c.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))


def test_a_new_workspace_gets_a_working_store_with_mlflows_own_schema(tmp_path: Path, cache: Path):
    from mlflow import MlflowClient

    first, second = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    for ws in (first, second):
        assert not (ws.root / "mlflow.db").exists()
        uri = ws.tracking_uri
        assert (ws.root / "mlflow.db").is_file()
        client = MlflowClient(uri)
        [default] = client.search_experiments()
        assert default.name == "Default" and default.artifact_location == str((ws.root / "mlartifacts" / "0").resolve())
        run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri()))
        client.log_metric(run.info.run_id, "accuracy", 0.75)
        assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.75}
    assert len(list(cache.glob("mlflow-*.db"))) == 1  # made once, copied twice
    # the schema MLflow makes itself for a store of its own, table for table, index for index
    MlflowClient(f"sqlite:///{tmp_path / 'own.db'}").search_experiments()
    assert _schema(first.root / "mlflow.db") == _schema(tmp_path / "own.db")
    with sqlite3.connect(first.root / "mlflow.db") as a, sqlite3.connect(tmp_path / "own.db") as b:
        assert a.execute("SELECT * FROM alembic_version").fetchall() == b.execute("SELECT * FROM alembic_version").fetchall()


def test_an_existing_store_is_never_replaced_and_a_team_server_gets_none_here(tmp_path: Path, cache: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    store = tmp_path / "ws" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"runs of a year")
    assert not seed_tracking_store(store, tmp_path / "ws" / "mlartifacts")
    assert store.read_bytes() == b"runs of a year"
    monkeypatch.setenv(TRACKING_URI_ENV, "http://mlflow.example.internal:5000")
    team = Workspace(tmp_path / "team")
    assert team.tracking_uri == "http://mlflow.example.internal:5000"
    assert not (team.root / "mlflow.db").exists()


def test_a_cached_store_without_mlflows_default_experiment_is_not_copied_but_made_again(tmp_path: Path, cache: Path):
    from mlflow import MlflowClient

    ws = Workspace(tmp_path / "ws")
    ws.tracking_uri  # noqa: B018 (makes the cached empty store)
    [template] = cache.glob("mlflow-*.db")
    with sqlite3.connect(template) as c:  # a store without MLflow's Default experiment
        c.execute("DELETE FROM experiments")
    other = Workspace(tmp_path / "other")
    assert not seed_tracking_store(other.root / "mlflow.db", other.artifact_root)
    assert not template.exists() and not (other.root / "mlflow.db").exists()
    assert [e.name for e in MlflowClient(other.tracking_uri).search_experiments()] == ["Default"]
    assert template.exists()  # made again for that workspace
