"""Adapters a server downloads are kept by their recorded tree hash: fetched once, reused by the
next process, and fetched again after a copy that failed verification was evicted."""

from __future__ import annotations

from pathlib import Path

from tuneline import registry
from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256, verify_tree
from tuneline.tracking import experiment_folder
from tuneline.workspace import Workspace


def test_a_download_is_cached_by_hash_and_fetched_again_once_evicted(tmp_path: Path):
    import mlflow

    ws = Workspace.at(tmp_path / "ws")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (adapter / "adapter_config.json").write_text("{}")
    sha = tree_sha256(adapter)
    mlflow.set_tracking_uri(ws.tracking_uri)
    exp = mlflow.create_experiment("cache", artifact_location=experiment_folder(ws, "cache").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(adapter), "adapter")
        source = mlflow.get_artifact_uri("adapter")
    version = registry.register_version(ws.tracking_uri, "cached", run.info.run_id, source, {ADAPTER_SHA_TAG: sha})
    info = registry.get_version(ws.tracking_uri, "cached", version)

    first = registry.download_adapter(ws.tracking_uri, info, ws.adapters_dir)
    assert first == ws.adapters_dir / sha and tree_sha256(first) == sha
    (first / "adapter_model.safetensors").write_bytes(b"changed")  # the cached copy is damaged
    assert registry.download_adapter(ws.tracking_uri, info, ws.adapters_dir) == first  # reused as it is...
    assert tree_sha256(first) != sha  # ...so the caller's verification refuses it, and then:
    registry.evict_download(ws.adapters_dir, info)
    again = registry.download_adapter(ws.tracking_uri, info, ws.adapters_dir)
    verify_tree(again, sha)  # fetched again, intact
    assert [p.name for p in ws.adapters_dir.iterdir()] == [sha]  # no partial download left behind
