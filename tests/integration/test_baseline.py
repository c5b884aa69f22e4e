"""Baselines: exact nearest neighbours, no evaluation row shown as a demonstration, the recommendation."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from helpers import banking_rows, tolerance, write_csv, write_spec

from tuneline.baseline.options import BaselineReport, OptionResult, recommend
from tuneline.data.examples import Example
from tuneline.eval.results import Estimate
from tuneline.retrieval.index import NearestIndex, with_demonstrations

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]


def _ex(i: int, text: str = "", label: str = "a") -> Example:
    return Example(where=f"t.csv:{i}", messages=({"role": "system", "content": "S"}, {"role": "user", "content": text or f"q{i}"},
                                                  {"role": "assistant", "content": label}), reference=label, label=label)


def test_nearest_index_returns_the_true_nearest_neighbours():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = NearestIndex(vectors, [_ex(i) for i in range(300)])
    got, sims = index.search(queries, 5, chunk=7)  # several chunks
    want = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute").fit(vectors).kneighbors(
        queries, return_distance=False)
    assert (got == want).all()
    # the index multiplies in chunks of 7 queries, the reference all at once: fp32 dot products of 16
    # terms summed in another order; unit vectors, so the terms' magnitudes sum to at most 1
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ vectors.T, got, axis=1),
                               **tolerance("float32", vectors.shape[1], scale=1.0))
    assert (np.diff(sims, axis=1) <= 0).all()  # most similar first (sorted by these very values)
    # a training row querying the index never gets itself back
    own, _ = index.search(vectors[:50], 3, exclude=list(range(50)))
    assert all(i not in row for i, row in enumerate(own))


def test_demonstrations_go_between_the_system_prompt_and_the_question():
    ex = with_demonstrations(_ex(9, "question", "z"), [_ex(1, "d1", "a"), _ex(2, "d2", "b")])
    assert [m["content"] for m in ex.messages] == ["S", "d1", "a", "d2", "b", "question", "z"]
    assert ex.reference == "z" and ex.prompt_messages[-1]["content"] == "question"


def _option(name: str, correct: list[bool], cost: float, p50: float) -> OptionResult:
    acc = float(np.mean(correct))
    return OptionResult(name, name, {"accuracy": Estimate(acc, acc, acc)}, cost, p50, p50, 10.0,
                        scores=[float(c) for c in correct], correct=list(correct))


def test_recommendation_picks_the_cheaper_option_when_qualities_tie():
    rng = np.random.default_rng(1)
    right = list(rng.random(200) < 0.8)
    tied = list(right)
    tied[0], tied[1] = not tied[0], not tied[1]  # two rows differ: not significant
    report = BaselineReport("test", 200, "accuracy", [_option("fine_tuned", right, 600.0, 200.0),
                                                      _option("embedding", tied, 12.0, 5.0),
                                                      _option("prompt", list(rng.random(200) < 0.1), 0.0, 150.0)])
    recommend(report)
    assert report.recommended == "embedding"
    assert report.option("embedding").p_vs_best > 0.05
    assert report.option("prompt").p_vs_best < 0.05  # far worse: never recommended for being free
    assert any("Significantly worse" in r and "prompt" in r for r in report.reasons)


def test_recommendation_pays_for_quality_when_the_gap_is_significant():
    rng = np.random.default_rng(2)
    report = BaselineReport("test", 300, "accuracy", [_option("fine_tuned", list(rng.random(300) < 0.9), 600.0, 200.0),
                                                      _option("few_shot", list(rng.random(300) < 0.5), 0.0, 300.0)])
    recommend(report)
    assert report.best == report.recommended == "fine_tuned"


def _spec(tmp_path: Path, model_dir: Path, encoder: Path, extra: str = "") -> Path:
    rows = banking_rows(LABELS, 10)
    test = banking_rows(LABELS, 3, "test")
    write_csv(tmp_path / "train.csv", rows + [test[0]])  # a test row also in train: curation must drop it
    write_csv(tmp_path / "test.csv", test)
    return write_spec(tmp_path, f"""
        name: tiny-baseline
        task: {{type: classification, instruction: Classify the message.}}
        objective: {{primary: accuracy}}
        model: {model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
        curation: {{split: {{validation: 0.2}}}}
        train: {{method: lora, lr: 3.0e-2, max_steps: 3, batch_size: 8, seq_len: 160, precision: fp32}}
        eval: {{batch_size: 16, forgetting: false, robustness: {{enabled: false}}, latency: {{requests: 4}}}}
        baseline: {{encoder: {encoder}, shots: 3, k: 2, latency_requests: 3}}
        {extra}
    """)


def test_no_evaluation_row_is_retrieved_as_a_demonstration(tmp_path: Path, tiny_model_dir: Path,
                                                           tiny_encoder_dir: Path):
    from tuneline.baseline.options import _text, retrieval_prompts
    from tuneline.context import open_context
    from tuneline.retrieval.encoder import load_encoder

    ctx = open_context(_spec(tmp_path, tiny_model_dir, tiny_encoder_dir), tmp_path / "ws")
    ws, data = ctx.workspace, ctx.data
    encoder = load_encoder(str(tiny_encoder_dir), cache_root=ws.embeddings_dir)
    index = NearestIndex(encoder.embed([_text(e) for e in data.train]), data.train)
    held_out = {_text(e) for e in data.test + data.eval}
    prompts = retrieval_prompts(index, data.test + data.eval, encoder.embed([_text(e) for e in data.test + data.eval]),
                                k=len(data.train))  # every training row as a demonstration, ranked
    for p in prompts:
        shown = [m["content"] for m in p.messages[1:-2] if m["role"] == "user"]
        assert len(shown) == len(data.train)
        assert not held_out & set(shown), "an evaluation row was shown as a demonstration"
    # the cache: the same texts are embedded once
    assert len(list((ws.root / "embeddings").rglob("*.npy"))) == 2


def test_run_measures_every_option_beside_the_fine_tuned_model(tmp_path: Path, tiny_model_dir: Path,
                                                               tiny_encoder_dir: Path):
    from rich.console import Console

    import tuneline
    from tuneline.baseline import BaselineReport
    from tuneline.pipeline import baseline

    spec = _spec(tmp_path, tiny_model_dir, tiny_encoder_dir)
    result = tuneline.run(spec, workspace=tmp_path / "ws", show_progress=False, console=Console(width=250))
    report = BaselineReport.from_dict(result.report.baselines)
    assert [o.name for o in report.options] == ["prompt", "few_shot", "retrieval", "embedding", "fine_tuned"]
    for o in report.options:
        assert o.metrics["accuracy"].low <= o.metrics["accuracy"].value <= o.metrics["accuracy"].high
        assert o.p50_ms is not None and o.p50_ms > 0
    assert report.option("prompt").prompt_tokens > 0
    # the label list in the prompt, demonstrations make prompts longer
    assert report.option("few_shot").prompt_tokens > report.option("fine_tuned").prompt_tokens
    assert report.option("retrieval").prompt_tokens > report.option("fine_tuned").prompt_tokens
    assert report.option("fine_tuned").one_off_seconds == pytest.approx(result.train.seconds)
    assert report.recommended in {o.name for o in report.options} and report.reasons
    # the same answers as the evaluation's candidate
    assert report.option("fine_tuned").predictions == result.report.main_set().system("candidate").predictions
    # standalone: `tuneline baseline` adds the last run's candidate when it was scored on the same rows
    from tuneline.baseline import options

    built: list[int] = []

    class Counted(options.LabelTrie):
        def __init__(self, *args, **kwargs) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(options, "LabelTrie", Counted)
        again = baseline(spec, workspace=tmp_path / "ws", show_progress=False, console=Console(width=250))
    # one label trie for every option and every timed request: a request's time is the model's
    assert len(built) == 1
    assert again.option("prompt").predictions == report.option("prompt").predictions
    assert again.option("retrieval").predictions == report.option("retrieval").predictions
    assert again.option("fine_tuned") is not None
    assert again.option("embedding").predictions == report.option("embedding").predictions
    saved = json.loads((tmp_path / "ws" / "runs" / "tiny-baseline" / "baseline_report.json").read_text())
    assert saved["recommended"] == again.recommended
    # the report shows every option side by side with the recommendation
    from tuneline.report import write_report

    page = write_report(result.run_id, tmp_path / "ws").read_text()
    assert 'id="baselines"' in page and f"Recommendation: {report.recommended}</strong>" in page
    for name in ("prompt", "few_shot", "retrieval", "embedding", "fine_tuned"):
        assert f"<td>{name}" in page
    assert 'alt="accuracy by option"' in page

    # baseline.max_rows: the options and the fine-tuned model on the same seeded sample of the items
    spec.write_text(spec.read_text().replace("shots: 3,", "max_rows: 5, shots: 3,"))
    out = StringIO()
    sampled = baseline(spec, workspace=tmp_path / "ws", show_progress=False, console=Console(file=out, width=250))
    assert (sampled.n, sampled.of) == (5, 9) and sampled.rows == sorted(set(sampled.rows)) and len(sampled.rows) == 5
    assert "a seeded sample of 5 of the 9 items" in out.getvalue()
    candidate = result.report.main_set().system("candidate").predictions
    tuned = sampled.option("fine_tuned")
    assert tuned.predictions == [candidate[i] for i in sampled.rows]
    assert tuned.metrics["accuracy"].value == pytest.approx(np.mean(tuned.correct))
    assert sampled.option("embedding").predictions == [report.option("embedding").predictions[i] for i in sampled.rows]
    assert all(len(o.scores) == 5 for o in sampled.options)
    full = baseline(spec, workspace=tmp_path / "ws", show_progress=False, console=Console(width=250), all_rows=True)
    assert (full.n, full.rows, full.of) == (9, None, None)


def test_constrained_answers_are_the_last_turn_not_the_demonstrations(tokenizer):
    """Demonstrations are assistant turns too; the label trie must hold only the final answer."""
    from tuneline.eval.generate import LabelTrie

    plain = _ex(0, "where is my card?", "card_arrival")
    shown = with_demonstrations(plain, [_ex(1, "rate?", "exchange_rate"), _ex(2, "stolen", "lost_or_stolen_card")])
    a = LabelTrie(tokenizer, LABELS, plain, tokenizer.eos_token_id)
    b = LabelTrie(tokenizer, LABELS, shown, tokenizer.eos_token_id)
    assert a.next == b.next and a.max_len == b.max_len
    assert len(b.next[()]) >= 2  # more than one label can start the answer
