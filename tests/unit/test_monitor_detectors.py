"""The drift, quality and operations detectors on real data: no alarm between two random halves
of one dataset, an alarm when the traffic really moves, no verdict on too little data.

The embedding tests (marked slow) use the shipped encoder on a seeded 4,000-row sample of
BANKING77 train and 300 ViGGO sentences, embedded once per machine into pytest's cache (the
first run embeds for ~80 s on 2 cores, later runs take seconds)."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from helpers import BANKING, REPO

from tuneline.monitor.detectors import (
    input_detectors,
    is_refusal,
    operations_detectors,
    output_detectors,
    quality_detectors,
    reference_of,
)
from tuneline.monitor.results import DetectorResult
from tuneline.spec.monitor import MonitorSpec

VIGGO = REPO / "examples" / "viggo" / "data"
SEEDS = 20


@cache
def banking() -> tuple[list[str], list[str]]:
    with (BANKING / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def halves(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2:]


def by_name(results: list[DetectorResult]) -> dict[str, DetectorResult]:
    return {r.name: r for r in results}


# ---------------------------------------------------------------------------------------------
# text and label detectors on all of BANKING77 train (no encoder: fast)


def test_random_halves_fire_no_text_or_label_detector_over_20_seeds() -> None:
    texts, labels = banking()
    spec = MonitorSpec()
    fired: list[str] = []
    for seed in range(SEEDS):
        a, b = halves(seed, len(texts))
        ref_idx = a[: spec.window.reference_rows]
        ref = reference_of([texts[i] for i in ref_idx], [], [labels[i] for i in ref_idx], None, seed)
        cur = b[: spec.window.requests]
        results = (input_detectors(ref, [texts[i] for i in cur], None, spec)
                   + output_detectors(ref, [], [labels[i] for i in cur], [], "classification", spec))
        assert {r.name for r in results} == {"input.embedding", "input.length", "input.oov", "output.labels"}
        fired += [f"{seed}:{r.name}" for r in results if r.fired]
    print(f"false alarms (length, oov, labels): {len(fired)}/{SEEDS} seeds")
    assert fired == []


def test_labels_collapsed_onto_few_intents_fire_output_labels() -> None:
    texts, labels = banking()
    spec = MonitorSpec()
    a, b = halves(0, len(texts))
    ref = reference_of([texts[i] for i in a[:2000]], [], [labels[i] for i in a[:2000]], None)
    few = sorted(set(labels))[:3]
    collapsed = [few[i % 3] for i in range(500)]
    res = by_name(output_detectors(ref, [], collapsed, [], "classification", spec))["output.labels"]
    assert res.fired, res.detail
    assert res.value is not None and res.value > 0.5
    mild = [labels[i] for i in b[:500]]
    mild[:10] = ["not-an-intent"] * 10  # 2% unparsed answers: seen, not an alarm
    res = by_name(output_detectors(ref, [], mild, [], "classification", spec))["output.labels"]
    assert not res.fired, res.detail
    assert res.extra["other_share"] == pytest.approx(0.02)


def test_unrelated_texts_fire_length_and_oov() -> None:
    texts, labels = banking()
    with (VIGGO / "valid.csv").open() as f:
        viggo = [r["ref"] for r in csv.DictReader(f)][:300]
    ref = reference_of(texts[:2000], [], labels[:2000], None)
    got = by_name(input_detectors(ref, viggo, None, MonitorSpec()))
    assert got["input.oov"].fired and got["input.length"].fired, (got["input.oov"].detail, got["input.length"].detail)
    assert got["input.embedding"].status == "insufficient"  # no embeddings given: no verdict, no alarm


def test_fewer_than_min_requests_is_insufficient_and_never_fires() -> None:
    texts, labels = banking()
    spec = MonitorSpec()
    ref = reference_of(texts[:2000], [], labels[:2000], np.eye(2000, 8, dtype=np.float32))
    cur = ["zzz qqq xxyy"] * (spec.window.min_requests - 1)  # would be drift, were there enough
    results = (input_detectors(ref, cur, np.ones((len(cur), 8), dtype=np.float32), spec)
               + output_detectors(ref, [], ["zzz"] * len(cur), [], "classification", spec)
               + output_detectors(ref, cur, None, ["length"] * len(cur), "instruction", spec)
               + operations_detectors([500] * len(cur), [9e9] * len(cur), [10**6] * len(cur), spec)
               + quality_detectors([-1] * 19, ["fix"] * 19, spec))
    assert len(results) == 3 + 1 + 3 + 6 + 2
    assert {r.status for r in results} == {"insufficient"}
    assert all(r.value is None and "not enough data" in r.detail for r in results)


def test_disabled_groups_report_nothing() -> None:
    spec = MonitorSpec.model_validate({"input": {"enabled": False}, "output": {"enabled": False},
                                       "quality": {"enabled": False}, "operations": {"enabled": False}})
    ref = reference_of(["a b"] * 10, [], None, None)
    assert input_detectors(ref, ["a"] * 60, None, spec) == []
    assert output_detectors(ref, [], ["a"] * 60, [], "classification", spec) == []
    assert quality_detectors([1] * 30, [None] * 30, spec) == []
    assert operations_detectors([200] * 60, [1.0] * 60, [1] * 60, spec) == []


# ---------------------------------------------------------------------------------------------
# generation outputs


def test_refusals_and_truncation_fire_on_generation_outputs() -> None:
    spec = MonitorSpec()
    train_answers = [f"The game {i} is a fun racing game for PC." for i in range(400)]
    ref = reference_of([f"describe game {i}" for i in range(400)], train_answers, None, None)
    normal = [f"The game {i} is a fun racing game for Mac." for i in range(200)]
    got = by_name(output_detectors(ref, normal, None, ["stop"] * 200, "instruction", spec))
    assert [r.status for r in got.values()] == ["ok", "ok", "ok"], [r.detail for r in got.values()]
    refusing = ["I'm sorry, but I can't help with that."] * 60 + normal[:140]
    cut = ["length"] * 80 + ["stop"] * 120
    got = by_name(output_detectors(ref, refusing, None, cut, "instruction", spec))
    assert got["output.refusal_rate"].fired, got["output.refusal_rate"].detail
    assert got["output.truncated_rate"].fired, got["output.truncated_rate"].detail
    assert got["output.answer_length"].fired  # 30% of the answers are 8 words long, the training answers 10


def test_refusals_without_training_answers_compare_with_none() -> None:
    ref = reference_of(["q"] * 100, [], None, None)
    answers = ["I'm sorry, but I can't do that."] * 30 + ["Sure: here it is."] * 70
    res = by_name(output_detectors(ref, answers, None, ["stop"] * 100, "chat", MonitorSpec()))["output.refusal_rate"]
    assert res.fired and "no training answers" in res.detail
    assert res.value == pytest.approx(0.2189, abs=1e-3)  # Wilson lower bound of 30/100


@pytest.mark.parametrize(("text", "refusal"), [
    ("I'm sorry, but I cannot share that.", True),
    ("As an AI language model, I do not have opinions.", True),
    ("I can't help with that request.", True),
    ("I cannot assist with this.", True),
    ("Sorry to hear your card has not arrived; it takes up to 5 days.", False),
    ("You can't use this card abroad without activating it first.", False),
])
def test_refusal_patterns(text: str, refusal: bool) -> None:
    assert is_refusal(text) is refusal


# ---------------------------------------------------------------------------------------------
# quality and operations


@pytest.mark.parametrize(("negative_share", "fires"), [(0.6, True), (0.05, False)])
def test_negative_feedback_fires_at_60_percent_not_at_5(negative_share: float, fires: bool) -> None:
    n = 100
    neg = round(negative_share * n)
    ratings: list[int | None] = [-1] * neg + [1] * (n - neg) + [None] * 30  # unrated entries do not count
    got = by_name(quality_detectors(ratings, [None] * len(ratings), MonitorSpec()))
    res = got["quality.negative_feedback"]
    assert res.fired is fires, res.detail
    assert res.n_current == n
    assert res.extra["rate"] == pytest.approx(negative_share)
    assert not got["quality.correction_rate"].fired


def test_correction_rate_uses_its_lower_bound() -> None:
    spec = MonitorSpec()
    few = by_name(quality_detectors([None] * 25, ["better answer"] * 4 + [None] * 21, spec))  # 16%, n=25
    assert not few["quality.correction_rate"].fired  # 16% but the 95% lower bound is ~6%
    many = by_name(quality_detectors([None] * 400, ["better answer"] * 100 + [""] * 300, spec))  # 25%, n=400
    assert many["quality.correction_rate"].fired


def test_operations_latency_errors_and_shedding() -> None:
    spec = MonitorSpec.model_validate({"operations": {"latency_p95_ms": 800, "latency_p99_ms": 2000}})
    calm = operations_detectors([200] * 300, [100.0 + i % 50 for i in range(300)], [120] * 300, spec)
    assert not any(r.fired for r in calm), [r.detail for r in calm if r.fired]
    assert by_name(calm)["operations.latency_p50_ms"].status == "info"
    assert by_name(calm)["operations.tokens_per_request"].status == "info"  # no threshold set

    statuses = [200] * 200 + [504] * 40 + [500] * 10 + [429] * 50
    latencies: list[float | None] = [100.0] * 180 + [3000.0] * 20 + [None] * 100
    got = by_name(operations_detectors(statuses, latencies, [None] * 300, spec))
    assert got["operations.error_rate"].fired and got["operations.error_rate"].extra["count"] == 50
    assert got["operations.shed_rate"].fired and got["operations.shed_rate"].extra["count"] == 50
    assert got["operations.latency_p95_ms"].fired and got["operations.latency_p99_ms"].fired
    assert got["operations.latency_p95_ms"].n_current == 200  # only answered requests count
    assert got["operations.tokens_per_request"].status == "insufficient"


def test_latency_without_threshold_is_reported_only() -> None:
    got = by_name(operations_detectors([200] * 100, [5000.0] * 100, [10] * 100, MonitorSpec()))
    assert got["operations.latency_p95_ms"].status == "info"
    assert got["operations.latency_p95_ms"].value == pytest.approx(5000.0)
    assert "no threshold" in got["operations.latency_p95_ms"].detail


# ---------------------------------------------------------------------------------------------
# embeddings from the shipped encoder


@pytest.fixture(scope="module")
def embedded(request: pytest.FixtureRequest) -> dict[str, object]:
    """4,000 BANKING77 train rows (seeded) and 300 ViGGO sentences with their embeddings."""
    from tuneline.retrieval.encoder import load_encoder

    texts, labels = banking()
    pick = np.sort(np.random.default_rng(77).choice(len(texts), 4000, replace=False))
    with (VIGGO / "valid.csv").open() as f:
        viggo = [r["ref"] for r in csv.DictReader(f)][:300]
    enc = load_encoder("all-minilm-l6-v2", cache_root=Path(request.config.cache.mkdir("monitor-embeddings")))
    b_texts = [texts[i] for i in pick]
    return {"texts": b_texts, "labels": [labels[i] for i in pick], "emb": enc.embed(b_texts),
            "viggo": viggo, "viggo_emb": enc.embed(viggo)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mmd", "classifier"])
def test_random_halves_fire_no_input_or_output_detector_with_embeddings(embedded: dict, method: str) -> None:
    texts, labels, emb = embedded["texts"], embedded["labels"], embedded["emb"]
    spec = MonitorSpec.model_validate({"input": {"method": method}})
    fired: list[str] = []
    for seed in range(SEEDS):
        a, b = halves(seed, len(texts))
        ref = reference_of([texts[i] for i in a], [], [labels[i] for i in a], emb[a], seed)
        cur = b[: spec.window.requests]
        results = (input_detectors(ref, [texts[i] for i in cur], emb[cur], spec)
                   + output_detectors(ref, [], [labels[i] for i in cur], [], "classification", spec))
        assert {r.status for r in results} <= {"ok", "alert"}
        fired += [f"{seed}:{r.name}" for r in results if r.fired]
    print(f"false alarms ({method} embedding, length, oov, labels): {len(fired)} in {SEEDS} seeds")
    assert fired == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mmd", "classifier"])
def test_unrelated_domain_fires_input_embedding(embedded: dict, method: str) -> None:
    texts, labels, emb = embedded["texts"], embedded["labels"], embedded["emb"]
    spec = MonitorSpec.model_validate({"input": {"method": method}})
    ref = reference_of(texts[:2000], [], labels[:2000], emb[:2000])
    got = by_name(input_detectors(ref, embedded["viggo"][:100], embedded["viggo_emb"][:100], spec))
    assert got["input.embedding"].fired, got["input.embedding"].detail
    assert got["input.embedding"].extra["method"] == method


@pytest.mark.slow
def test_other_intents_fire_input_embedding_with_the_classifier(embedded: dict) -> None:
    """Same domain, new topics: half the intents as the reference, traffic from the other half."""
    texts, labels, emb = embedded["texts"], embedded["labels"], embedded["emb"]
    intents = sorted(set(labels))
    rng = np.random.default_rng(5)
    half = set(rng.choice(intents, len(intents) // 2, replace=False).tolist())
    ia = np.array([i for i, lab in enumerate(labels) if lab in half])
    ib = rng.permutation([i for i, lab in enumerate(labels) if lab not in half])[:100]  # a mix of ~38 intents
    ref = reference_of([texts[i] for i in ia], [], [labels[i] for i in ia], emb[ia])
    spec = MonitorSpec.model_validate({"input": {"method": "classifier"}})
    got = by_name(input_detectors(ref, [texts[i] for i in ib], emb[ib], spec))
    assert got["input.embedding"].fired, got["input.embedding"].detail
    mmd_spec = MonitorSpec.model_validate({"input": {"method": "mmd"}})
    mmd = by_name(input_detectors(ref, [texts[i] for i in ib], emb[ib], mmd_spec))["input.embedding"]
    # significant, but an MMD^2 of ~0.01 is under the default min_effect 0.05: no alarm (see
    # docs/monitoring.md, "Embedding drift": why the classifier is the better default)
    assert mmd.p_value is not None and mmd.p_value <= 0.001
    assert mmd.status == "ok" and mmd.value is not None and mmd.value < 0.05
    print("other intents:", got["input.embedding"].detail, "|", mmd.detail)
