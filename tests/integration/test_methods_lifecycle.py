"""Every training method's whole life on the tiny model: `tuneline run` trains, evaluates and
registers a version, and one server over the registry answers a chat request for it through the
OpenAI-compatible API, naming that version, with the classification label it predicts logged; MLflow
loads the version itself from the registry when its method merges and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_lora_spec, uvicorn_on_loopback

import tuneline
from tuneline import registry
from tuneline.serve import Key, build_app
from tuneline.serve.engine import slot_name
from tuneline.spec.methods import TRAIN_METHODS
from tuneline.workspace import Workspace

# the batched LoRA path and one per-model path by default; each other method adds ~5-10 s
FAST = ("lora", "prefix")
# dpo needs preference pairs: its whole life is tests/integration/test_dpo.py
METHODS = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in TRAIN_METHODS if m != "dpo"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """One workspace and one server over its registry for every method: versions registered
    after the server started are resolved on their first request."""
    ws = Workspace.at(tmp_path_factory.mktemp("methods") / "ws")
    app = build_app(ws, keys={"sk-all": Key("ops", {"*"})}, base=str(tiny_model_dir), resolve_ttl=0.0)
    with uvicorn_on_loopback(app) as url:
        yield {"url": url, "ws": ws, "app": app}
    app.state.engine.close()


@pytest.mark.parametrize("method", METHODS)
def test_a_method_is_trained_evaluated_registered_and_served(method: str, server, tiny_model_dir: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from openai import OpenAI

    name = f"intents-{method}"
    train = (f"{{method: {method}, lr: 3.0e-2, max_steps: 3, batch_size: 8, seq_len: 96, precision: fp32, seed: 0, "
             "prompt: {virtual_tokens: 4}}")
    spec = tiny_lora_spec(tmp_path, tiny_model_dir, name, per_label=4, train=train)
    ws: Workspace = server["ws"]
    result = tuneline.run(spec, workspace=ws, show_progress=False)

    report = result.report  # evaluated: the candidate scored on the test rows
    assert report is not None and report.main_set().system("candidate") is not None
    info = registry.resolve(ws.tracking_uri, f"{name}@{result.model_version}")  # registered
    assert info.tags.get("tuneline.adapter_sha256")
    adapter = ws.root / "runs" / name / "adapter"
    assert (adapter / ("config.json" if method == "full" else "adapter_config.json")).is_file()

    client = OpenAI(base_url=server["url"] + "/v1", api_key="sk-all", max_retries=0, timeout=120)
    resp = client.chat.completions.create(model=f"{name}@candidate", messages=[{"role": "user", "content": "my card has not arrived"}],
                                          max_tokens=4)
    assert resp.model == f"{name}@{result.model_version}"
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage is not None
    engine = server["app"].state.engine
    key = slot_name(f"{name}@{result.model_version}", "").rsplit("_p", 1)[0]  # the slot, whatever its folder
    slot = next(s for s in engine.adapters if s.rsplit("_p", 1)[0] == key)
    assert (slot in engine.per_model) == (method not in ("lora", "rslora"))  # the path its method takes
    row = next(r for r in server["app"].state.request_log.rows() if r["id"] == resp.id)
    # a classification version: its answer logged as the label it predicts, on every path
    assert row["predicted_label"] == ((resp.choices[0].message.content or "").strip() or None)

    # MLflow loads the registered version itself when its method merges and generates (models:/NAME/N)
    import mlflow

    from tuneline.export.source import MERGEABLE, MLMODEL

    if method in MERGEABLE:
        monkeypatch.setenv("TUNELINE_HOME", str(tmp_path / "home"))  # the loader's models cache
        mlflow.set_tracking_uri(ws.tracking_uri)
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/{result.model_version}")
        answer = loaded.predict({"messages": [{"role": "user", "content": "my card has not arrived"}], "max_tokens": 4})
        assert answer["model"] == f"{name}@{result.model_version}" and answer["usage"]["completion_tokens"] <= 4
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    else:  # virtual tokens and classifier heads: tuneline serve serves them
        assert not (adapter / MLMODEL).exists()
