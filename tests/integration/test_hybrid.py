"""The hybrid (`retrieval: {k}`): trained, evaluated and served with the nearest training examples
in the prompt, from one index versioned with the dataset and shipped with the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_lora_spec

from tuneline.data.examples import Example
from tuneline.data.tokenize import IGNORE_INDEX, encode_example
from tuneline.retrieval.index import with_demonstrations


def _hybrid_spec(tmp_path: Path, model_dir: Path, encoder: Path, k: int = 2, extra: str = "") -> Path:
    return tiny_lora_spec(tmp_path, model_dir, "tiny-hybrid", per_label=6, max_steps=2,
                          train="{method: lora, lr: 3.0e-2, max_steps: 2, batch_size: 8, seq_len: 256, "
                                "precision: fp32, seed: 0}",
                          extra=f"retrieval: {{k: {k}, encoder: {encoder}}}\nbaseline: {{enabled: false}}\n" + extra)


def test_demonstrations_are_context_not_answers(tokenizer):
    """The loss covers the row's own answer only: a demonstration's answer is prompt."""
    def ex(q: str, a: str) -> Example:
        return Example("t:1", ({"role": "system", "content": "S"}, {"role": "user", "content": q},
                               {"role": "assistant", "content": a}), a, a)

    plain = encode_example(tokenizer, ex("where is my card", "card_arrival"), 512)
    shown = with_demonstrations(ex("where is my card", "card_arrival"),
                                [ex("my card is lost", "lost_or_stolen_card"), ex("rate for euros", "exchange_rate")])
    assert shown.demonstrations == 4
    enc = encode_example(tokenizer, shown, 512)
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert answer == [t for t in plain.labels if t != IGNORE_INDEX]  # the same tokens: "card_arrival" + end of turn
    assert len(enc.input_ids) > len(plain.input_ids) + 10
    # and without the count, every assistant turn would be trained
    whole = encode_example(tokenizer, Example("t:1", shown.messages, "card_arrival"), 512)
    assert whole.n_answer_tokens > enc.n_answer_tokens


def test_training_rows_never_see_themselves_or_a_copy(tmp_path: Path, tiny_encoder_dir: Path):
    from tuneline.retrieval import Retriever, build_index
    from tuneline.retrieval.encoder import load_encoder

    def ex(i: int, q: str, a: str) -> Example:
        return Example(f"t:{i}", ({"role": "user", "content": q}, {"role": "assistant", "content": a}), a, a)

    rows = [ex(0, "card not here yet", "card_arrival"), ex(1, "card not here yet", "card_arrival"),  # a copy
            ex(2, "lost my card", "lost"), ex(3, "euro rate today", "rate"), ex(4, "my card never came", "card_arrival")]
    encoder = load_encoder(str(tiny_encoder_dir))
    index = build_index(rows, encoder, tmp_path / "idx")
    out = Retriever(index, encoder, k=2).augment_training(rows)
    for i, shown in enumerate(out):
        demos = [m["content"] for m in shown.messages[: shown.demonstrations] if m["role"] == "user"]
        assert len(demos) == 2
        assert rows[i].messages[0]["content"] not in demos, f"row {i} was shown itself (or its copy)"
    # loading checks the files it was trained with
    (tmp_path / "idx" / "examples.jsonl").write_text((tmp_path / "idx" / "examples.jsonl").read_text().replace(
        "lost my card", "LOST MY CARD"))
    from tuneline.errors import ModelError
    from tuneline.retrieval import load_index

    with pytest.raises(ModelError, match="examples.jsonl does not match"):
        load_index(tmp_path / "idx")


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_encoder_dir: Path) -> Any:
    """One hybrid run on the tiny model (spec, workspace, RunResult), shared by the tests that read it."""
    from tuneline.pipeline import run

    tmp_path = tmp_path_factory.mktemp("hybrid")
    spec = _hybrid_spec(tmp_path, tiny_model_dir, tiny_encoder_dir)
    return spec, tmp_path / "ws", run(spec, workspace=tmp_path / "ws", show_progress=False)


def test_hybrid_run_trains_evaluates_and_ships_the_index(hybrid_run: Any):
    from tuneline.retrieval import adapter_retriever, load_index

    spec, ws, result = hybrid_run
    adapter = Path(result.train.adapter_dir)
    shipped = load_index(adapter / "retrieval")
    assert shipped.k == 2
    version = shipped.meta["dataset_version"]
    assert version and (ws / "datasets" / version / "retrieval").is_dir()  # versioned with the data
    # evaluation prompted the candidate as the server will: its answers equal the served retriever's prompts
    suite = result.report
    main = suite.main_set()
    assert "nearest training examples" in main.system("candidate").model
    assert "nearest" not in main.system("base").model  # the base model is scored on the plain prompts
    retriever = adapter_retriever(adapter)
    assert retriever is not None and retriever.k == 2
    from tuneline.context import open_context

    data = open_context(spec, ws).data
    assert [e.where for e in shipped.examples] == [e.where for e in data.train]  # the training split, all of it
    assert shipped.vectors.shape == (len(data.train), 32)
    prompts = retriever.augment(data.test)
    assert all(p.demonstrations == 4 for p in prompts)
    assert not {ex.where for ex in data.test} & {d.where for d in shipped.examples}  # no test row in the index
    # the run is traceable: the adapter artifact carries the index
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "adapter/retrieval")]
    assert sorted(arts) == ["adapter/retrieval/examples.jsonl", "adapter/retrieval/retrieval.json",
                            "adapter/retrieval/vectors.npy"]


def test_the_registered_version_records_the_sha256_of_the_adapter_as_stored(hybrid_run: Any, tmp_path: Path):
    """The tag is the hash of the folder the tracking store holds (weights, spec copy and index):
    what the server can check a downloaded adapter against."""
    import mlflow

    from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256

    _, ws, result = hybrid_run
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    version = mlflow.MlflowClient(uri).get_model_version("tiny-hybrid", str(result.model_version))
    mlflow.set_tracking_uri(uri)
    stored = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path)))
    assert (stored / "retrieval" / "vectors.npy").is_file() and (stored / "tuneline.yaml").is_file()
    assert version.tags[ADAPTER_SHA_TAG] == tree_sha256(stored) == tree_sha256(result.train.adapter_dir)


def test_eval_scores_the_saved_hybrid_with_its_index_and_a_plain_adapter_without(hybrid_run: Any, tmp_path: Path,
                                                                                tiny_model_dir: Path):
    """`tuneline eval` of the hybrid beside a production adapter that has no index: each system is
    prompted as it would be served, on the same rows (paired)."""
    import shutil

    from tuneline.pipeline import evaluate

    spec, ws, result = hybrid_run
    plain = tmp_path / "plain-adapter"
    shutil.copytree(result.train.adapter_dir, plain, ignore=shutil.ignore_patterns("retrieval"))
    suite = evaluate(spec, workspace=ws, production=plain, show_progress=False)
    main = suite.main_set()
    assert "nearest training examples" in main.system("candidate").model
    assert main.system("production").model == str(plain)
    assert main.system("candidate").predictions == result.report.main_set().system("candidate").predictions
    assert any(c.b == "production" for c in main.comparisons)


def test_server_retrieves_for_each_request_from_the_adapters_index(hybrid_run: Any, tiny_model_dir: Path):
    from fastapi.testclient import TestClient

    from tuneline.retrieval import adapter_retriever
    from tuneline.serve import build_app

    _, ws, result = hybrid_run
    app = build_app(ws, keys=None, base=str(tiny_model_dir))
    engine = app.state.engine
    sent: list[list[int]] = []
    real = engine.submit
    engine.submit = lambda job: (sent.append(job.prompt_ids), real(job))[1]
    messages = [{"role": "system", "content": "Classify the message."},
                {"role": "user", "content": "I still have not received my new card"}]
    with TestClient(app, base_url="http://localhost") as client:  # without keys: localhost only
        r = client.post("/v1/chat/completions", json={"model": "tiny-hybrid@candidate", "messages": messages,
                                                      "max_tokens": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        plain = client.post("/v1/chat/completions", json={"model": str(tiny_model_dir), "messages": messages,
                                                          "max_tokens": 4})
        assert plain.status_code == 200 and "retrieved" not in plain.json()
    engine.close()
    # what the model was sent: the request with the 2 nearest training rows in front, as in evaluation
    retriever = adapter_retriever(result.train.adapter_dir)
    shown, hits = retriever.messages(messages)
    want = engine.tokenizer(engine.tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
    assert sent[0] == want
    assert body["retrieved"] == hits and len(hits) == 2
    assert all(h["where"].startswith("train.csv:") for h in hits)
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    assert len(sent[1]) < len(sent[0])  # the base model got the request as it was


def test_retrieval_spec_errors(tmp_path: Path):
    from helpers import spec_error

    assert "retrieval.k" in spec_error(tmp_path, "retrieval: {k: 0}")
    assert "retrieval.top" in spec_error(tmp_path, "retrieval: {top: 3}")


def test_index_is_reused_per_dataset_version(tmp_path: Path, tiny_encoder_dir: Path):
    from tuneline.retrieval import build_index
    from tuneline.retrieval.encoder import load_encoder

    rows = [Example(f"t:{i}", ({"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "a"}),
                    "a", "a") for i in range(5)]
    encoder = load_encoder(str(tiny_encoder_dir))
    first = build_index(rows, encoder, tmp_path / "idx", "ds-1")
    again = build_index(rows, encoder, tmp_path / "idx", "ds-1")
    assert again.meta["created"] == first.meta["created"]
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert json.loads((tmp_path / "idx" / "retrieval.json").read_text())["rows"] == 5
