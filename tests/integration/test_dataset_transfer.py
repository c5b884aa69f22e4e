"""A run logs its whole dataset version (splits, rejects, manifest, card) to the tracking store, so
another machine with the spec but not its data files trains on the same rows (`tuneline data pull`,
`tuneline run SPEC --dataset ID`), and an erasure there reaches every copy the store holds.

"Machine B" is a second workspace whose only link to machine A is A's tracking store (SQLite here;
tests/integration/test_team_mode.py does it through an MLflow server with an S3 store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import invoke_cli, tiny_lora_spec

import tuneline
from tuneline.workspace import TRACKING_URI_ENV, Workspace


def _logged_split(uri: str, run_id: str, split: str, dest: Path) -> list[dict]:
    import mlflow
    import pandas as pd

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"dataset/{split}.parquet",
                                               dst_path=str(dest), tracking_uri=uri)
    return pd.read_parquet(path).to_dict("records")


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_another_machine_trains_on_the_logged_version_and_an_erasure_reaches_its_copies(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    (tmp_path / "spec").mkdir()
    spec = tiny_lora_spec(tmp_path / "spec", tiny_model_dir, "transfer", extra="baseline: {enabled: false}")
    a = Workspace.at(tmp_path / "a")
    first = tuneline.run(spec, workspace=a, show_progress=False)
    client = MlflowClient(a.tracking_uri)
    vid = client.get_run(first.run_id).data.tags["tuneline.dataset_version"]

    # machine B: the spec without its data files, and A's tracking store
    for name in ("train.csv", "test.csv"):
        (spec.parent / name).unlink()
    monkeypatch.setenv(TRACKING_URI_ENV, a.tracking_uri)
    b = Workspace.at(tmp_path / "b")
    pulled = invoke_cli("data", "pull", vid, "-w", str(b.root), "--json")
    assert pulled.exit_code == 0, pulled.output
    got = json.loads(pulled.stdout)
    assert got["fetched"] and got["id"] == vid and got["counts"] == json.loads(
        (a.datasets_dir / vid / "manifest.json").read_text())["counts"]
    assert (b.datasets_dir / vid / "train.parquet").read_bytes() == (a.datasets_dir / vid / "train.parquet").read_bytes()

    second = tuneline.run(spec, workspace=b, dataset=vid, show_progress=False)
    assert client.get_run(second.run_id).data.tags["tuneline.dataset_version"] == vid
    assert second.train.train_examples == first.train.train_examples and second.train.steps == first.train.steps
    one, two = _adapter(first.run_dir), _adapter(second.run_dir)
    assert one.keys() == two.keys() and all(bool((one[k] == two[k]).all()) for k in one), "not the same training"

    # an erasure on B reaches both runs' logged copies (A's run and B's own)
    rows = _logged_split(a.tracking_uri, first.run_id, "train", tmp_path / "before")
    text = next(m["content"] for m in json.loads(rows[0]["messages"]) if m["role"] == "user")
    forgot = invoke_cli("data", "forget", "--contains", text, "-w", str(b.root), "--json")
    assert forgot.exit_code == 0, forgot.output
    counts = json.loads(forgot.stdout)
    assert counts["datasets"][vid]["rows"]["train"] >= 1 and counts["datasets"][vid]["mlflow_artifacts"] == 2
    for run_id in (first.run_id, second.run_id):
        after = _logged_split(a.tracking_uri, run_id, "train", tmp_path / f"after-{run_id}")
        assert len(after) == len(rows) - counts["datasets"][vid]["rows"]["train"]
        assert not any(text.lower() in json.dumps(r, default=str, ensure_ascii=False).lower() for r in after)


def test_a_fetched_version_whose_rows_do_not_hash_to_its_id_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    import pandas as pd

    from tuneline.context import prepare_version
    from tuneline.curation.version import adopt_version
    from tuneline.errors import DataError
    from tuneline.spec import load_spec

    (tmp_path / "spec").mkdir()
    spec = tiny_lora_spec(tmp_path / "spec", tiny_model_dir, "transfer")
    _, version = prepare_version(load_spec(spec), Workspace.at(tmp_path / "a"))
    assert version is not None
    copy = tmp_path / "fetched"
    copy.mkdir()
    for f in version.path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    df = pd.read_parquet(copy / "train.parquet")
    df.loc[0, "label"] = "exchange_rate" if df.loc[0, "label"] != "exchange_rate" else "card_arrival"
    df.to_parquet(copy / "train.parquet")
    with pytest.raises(DataError, match=f"does not hold the rows of {version.id}"):
        adopt_version(copy, tmp_path / "b", version.id)
    assert not (tmp_path / "b" / version.id).exists()
