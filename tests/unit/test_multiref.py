"""Multi-reference evaluation: rows sharing an input are one item, scored against all its answers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu
from helpers import write_csv, write_jsonl, write_spec

from tuneline.data import read_golden_examples, read_records
from tuneline.data.examples import Example, build_examples
from tuneline.eval import stats
from tuneline.eval.items import group_items
from tuneline.eval.metrics import (
    bleu_tokenize_for,
    closest_reference,
    reference_streams,
    rouge_l,
    score,
)
from tuneline.spec import load_spec
from tuneline.spec.models import DataSource, TaskSpec

PREDICTIONS = [
    "The Witcher 3 is an excellent role-playing game from 2015.",
    "Mirror's Edge is a first-person platformer.",
    "I liked Portal 2, a puzzle game for Xbox.",
    "Dirt: Showdown is a driving game that was rated poorly.",
]
REFERENCES = [  # 3, 1, 5 and 2 references
    ["The Witcher 3 is an excellent role-playing game released in 2015.",
     "Released in 2015, The Witcher 3 is an excellent RPG.",
     "The Witcher 3: an excellent 2015 role-playing game."],
    ["Mirror's Edge is a first-person platform game."],
    ["Portal 2 is a puzzle game I liked on Xbox.", "I enjoyed Portal 2.", "Portal 2, a puzzle game for Xbox, is fun.",
     "Portal 2 is a puzzle platformer.", "I liked Portal 2, a puzzle game for Xbox."],
    ["Dirt: Showdown is a poorly rated driving game.", "Dirt: Showdown, a driving game, got poor ratings."],
]
# sacrebleu's corpus scores are sums of per-segment integer counts turned into a score once: the
# same sums in another order give the same double, up to the last bits of the log/exp
TOL = 1e-9


def _streams() -> list[list[str | None]]:
    return reference_streams(REFERENCES)


def test_reference_streams_pad_with_none() -> None:
    streams = _streams()
    assert len(streams) == 5 and all(len(s) == 4 for s in streams)
    assert streams[0] == [r[0] for r in REFERENCES]
    assert streams[2] == [REFERENCES[0][2], None, REFERENCES[2][2], None]


def test_multi_reference_bleu_and_chrf_equal_sacrebleu() -> None:
    values = score("summarization", PREDICTIONS, REFERENCES, None).values()
    assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, _streams()).score / 100, abs=TOL)
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, _streams()).score / 100, abs=TOL)
    # every reference counts: the first reference alone scores lower
    first_only = score("summarization", PREDICTIONS, [r[0] for r in REFERENCES], None).values()
    assert values["bleu"] > first_only["bleu"] and values["chrf"] >= first_only["chrf"]


def test_bleu_on_a_resample_of_items_equals_sacrebleu_on_those_items() -> None:
    sc = score("summarization", PREDICTIONS, REFERENCES, None)
    idx = np.array([2, 2, 0, 3])
    hyps = [PREDICTIONS[i] for i in idx]
    streams = reference_streams([REFERENCES[i] for i in idx])
    assert sc.metrics["bleu"](idx) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score / 100, abs=TOL)
    assert sc.metrics["chrf"](idx) == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score / 100, abs=TOL)


def test_per_item_scores_of_a_bleu_or_chrf_primary_are_sacrebleus_sentence_scores() -> None:
    # the per-item score (shown per row, used by the baselines' paired test) is the item's own
    # sentence-level score against all its references, not another metric
    bleu = score("summarization", PREDICTIONS, REFERENCES, None, primary="bleu").primary_scores
    chrf = score("summarization", PREDICTIONS, REFERENCES, None, primary="chrf").primary_scores
    for i, (p, refs) in enumerate(zip(PREDICTIONS, REFERENCES, strict=True)):
        assert bleu[i] == pytest.approx(sacrebleu.sentence_bleu(p, refs).score / 100, abs=TOL)
        assert chrf[i] == pytest.approx(sacrebleu.sentence_chrf(p, refs).score / 100, abs=TOL)


def test_bleu_tokenizer_follows_the_target_language() -> None:
    def spec(lang: str | None) -> SimpleNamespace:
        return SimpleNamespace(task=SimpleNamespace(target_language=lang))

    assert [bleu_tokenize_for(spec(x)) for x in ("zh", "zh-Hans", "ja", "ko-KR", "de", None)] == \
        ["zh", "zh", "char", "char", "13a", "13a"]
    assert bleu_tokenize_for(SimpleNamespace(task=SimpleNamespace())) == "13a"  # no target_language field
    hyp, ref = ["猫坐在垫子上。"], [["猫坐在垫子上了。"]]
    zh = score("translation", hyp, ref, None, bleu_tokenize="zh").values()["bleu"]
    assert zh == pytest.approx(sacrebleu.corpus_bleu(hyp, [["猫坐在垫子上了。"]], tokenize="zh").score / 100, abs=TOL)
    assert zh > score("translation", hyp, ref, None).values()["bleu"]  # 13a sees one unmatched "word"


def test_rouge_l_is_the_best_over_references_and_exact_match_any() -> None:
    sc = score("summarization", PREDICTIONS, REFERENCES, None, primary="rouge_l")
    best = [max(rouge_l(p, r) for r in refs) for p, refs in zip(PREDICTIONS, REFERENCES, strict=True)]
    np.testing.assert_allclose(sc.primary_scores, best, rtol=0, atol=0)
    assert sc.primary_scores[2] == 1.0  # the fifth reference is the answer
    assert sc.primary_scores[0] > rouge_l(PREDICTIONS[0], REFERENCES[0][1])
    exact = score("summarization", PREDICTIONS, REFERENCES, None, primary="exact_match")
    assert list(exact.primary_scores) == [0.0, 0.0, 1.0, 0.0]
    assert exact.values()["exact_match"] == 0.25
    assert closest_reference(PREDICTIONS[2], REFERENCES[2]) == REFERENCES[2][4]
    assert closest_reference(PREDICTIONS[1], REFERENCES[1]) == REFERENCES[1][0]


def test_bootstrap_resamples_items_not_references() -> None:
    sc = score("summarization", PREDICTIONS, REFERENCES, None)
    n = len(REFERENCES)  # 4 items, 11 references
    assert len(sc.primary_scores) == n
    idx = stats.resample_indices(n, 200)
    assert idx.shape == (200, 4) and idx.max() < 4
    iv = stats.bootstrap(sc.metrics["rouge_l"], n, indices=idx)
    # the interval is over the mean of per-item scores: an item with 5 references counts once
    means = sc.primary_scores[idx].mean(axis=1)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert iv.value == pytest.approx(float(np.mean(sc.primary_scores)))


def _row(where: str, user: str, answer: str) -> Example:
    return Example(where, ({"role": "user", "content": user}, {"role": "assistant", "content": answer}), answer,
                   answer)


def test_group_items_groups_generation_rows_in_first_appearance_order() -> None:
    rows = [_row("f:1", "inform(name[Portal 2])", "Portal 2."), _row("f:2", "inform(name[Dirt])", "Dirt."),
            _row("f:3", "  INFORM(name[Portal 2]) ", "I like Portal 2."), _row("f:4", "inform(name[Portal 2])", "Portal 2."),
            _row("f:5", "inform(name[Dirt])", "Dirt is a game.")]
    items = group_items(rows, "summarization")
    assert [it.where for it in items] == ["f:1", "f:2"]
    assert items[0].references == ("Portal 2.", "I like Portal 2.")  # distinct answers, row order
    assert items[0].messages == rows[0].messages and items[0].reference == "Portal 2."
    assert items[1].all_references == ("Dirt.", "Dirt is a game.")
    # grouping items again changes nothing; a row that already has references merges them
    assert group_items(items, "summarization") == items
    merged = group_items([items[0], _row("g:9", "inform(name[Portal 2])", "Portal 2, yes.")], "instruction")
    assert merged[0].references == ("Portal 2.", "I like Portal 2.", "Portal 2, yes.")
    single = group_items([rows[1]], "chat")
    assert single == [rows[1]] and single[0].references == ()


def test_group_items_leaves_classification_and_structured_alone() -> None:
    rows = [_row("f:1", "card lost", "lost_card"), _row("f:2", "card lost", "card_arrival")]
    assert group_items(rows, "classification") == rows
    assert group_items(rows, "structured") == rows


def _records(**fields: object) -> list:
    from tuneline.data.readers import Record

    return [Record("d.jsonl", 1, dict(fields))]


def test_list_answer_expands_to_rows_that_group_back(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [
        {"mr": "inform(name[Portal 2])", "references": ["Portal 2 is fun.", "I liked Portal 2.", "Portal 2!"]},
        {"mr": "inform(name[Dirt])", "references": "Dirt is a driving game."},
    ])
    read = read_records(tmp_path / "d.jsonl", "jsonl", "d.jsonl")
    task, source = TaskSpec(type="summarization"), DataSource(path="d.jsonl", columns={"text": "mr",
                                                                                        "summary": "references"})
    examples, problems = build_examples(task, source, read.records)
    assert problems == []
    assert [(ex.where, ex.reference) for ex in examples] == [
        ("d.jsonl:1", "Portal 2 is fun."), ("d.jsonl:1", "I liked Portal 2."), ("d.jsonl:1", "Portal 2!"),
        ("d.jsonl:2", "Dirt is a driving game.")]
    items = group_items(examples, "summarization")
    assert len(items) == 2 and items[0].all_references == ("Portal 2 is fun.", "I liked Portal 2.", "Portal 2!")

    pq.write_table(pa.table({"instruction": ["Describe Portal 2"], "response": [["Fun.", "A puzzle game."]]}),
                   tmp_path / "d.parquet")
    read = read_records(tmp_path / "d.parquet", "parquet")
    examples, problems = build_examples(TaskSpec(type="instruction"), DataSource(path="d.parquet"), read.records)
    assert problems == [] and [ex.reference for ex in examples] == ["Fun.", "A puzzle game."]


def test_csv_cell_is_one_answer_even_when_it_looks_like_a_list(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", [{"text": "a document", "summary": '["one", "two"]'}])
    read = read_records(tmp_path / "d.csv", "csv")
    examples, problems = build_examples(TaskSpec(type="summarization"), DataSource(path="d.csv"), read.records)
    assert problems == [] and [ex.reference for ex in examples] == ['["one", "two"]']


@pytest.mark.parametrize(("value", "message"), [
    ([], "empty list in 'summary'"),
    (["fine", 3], "answer 1 of the list in 'summary' is a int, not a string"),
    (["fine", "  "], "answer 1 of the list in 'summary' is an empty text"),
])
def test_bad_list_answers_are_row_problems(value: list, message: str) -> None:
    examples, problems = build_examples(TaskSpec(type="summarization"), DataSource(path="d.jsonl"),
                                        _records(text="doc", summary=value))
    assert examples == []
    (p,) = problems
    assert p.where == "d.jsonl:1" and p.field == "summary" and message in p.message


def test_golden_set_with_list_answers_is_one_item_per_input(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "summary": "y"}])
    write_jsonl(tmp_path / "gold.jsonl", [{"text": "doc one", "summary": ["a", "b"]},
                                          {"text": "doc two", "summary": "c"},
                                          {"text": "Doc one", "summary": "d"}])
    loaded = load_spec(write_spec(tmp_path, """
        name: t
        task: {type: summarization}
        objective: {primary: rouge_l}
        model: smollm2-135m
        data: {train: {path: train.jsonl}}
        eval: {golden: [{name: gold, path: gold.jsonl}]}
    """))
    examples, _ = read_golden_examples(loaded, loaded.spec.eval.golden[0])
    items = group_items(examples, "summarization")
    assert [it.all_references for it in items] == [("a", "b", "d"), ("c",)]


def test_structured_without_json_references_reports_no_json_metrics() -> None:
    preds = ["inform(name[Portal 2])", "request(rating)"]
    refs = ["inform(name[Portal 2])", "give_opinion(rating[poor])"]
    sc = score("structured", preds, refs, None, primary="exact_match")
    values = sc.values()
    assert "json_valid" not in values and "field_accuracy" not in values
    assert values["exact_match"] == 0.5 and {"rouge_l", "bleu", "chrf"} <= values.keys()
    assert list(sc.primary_scores) == [1.0, 0.0]
    with_json = score("structured", ['{"a": 1}', "nope"], ['{"a": 1}', '{"a": 2, "b": 3}'], None).values()
    assert with_json["json_valid"] == 0.5 and with_json["field_accuracy"] == 0.5


def test_json_round_trip_of_reference_counts() -> None:
    from tuneline.eval.results import EvalSuite, SetResult

    s = SetResult("test", "test", 2, [], references=["a", "c"], item_references=[["a", "b"], ["c"]])
    suite = EvalSuite("t", "summarization", "rouge_l", "now", [s])
    back = EvalSuite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert back.sets[0].item_references == [["a", "b"], ["c"]]
    assert back.sets[0].reference_counts() == [2, 1]
    assert "item_references" not in suite.to_dict(with_rows=False)["sets"][0]


def test_evaluation_scores_items_with_every_reference(tmp_path: Path) -> None:
    """eval_sets groups the test rows and golden rows; the suite's n, intervals, flips and stored
    references are per item."""
    from tuneline.eval.generate import Generation
    from tuneline.eval.suite import Evaluation
    from tuneline.pipeline import eval_sets
    from tuneline.workspace import Workspace

    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "summary": "y"}])
    write_jsonl(tmp_path / "gold.jsonl", [{"text": "g1", "summary": ["a b c", "a b d"]}])
    loaded = load_spec(write_spec(tmp_path, """
        name: t
        task: {type: summarization}
        objective: {primary: rouge_l}
        model: smollm2-135m
        data: {train: {path: train.jsonl}}
        eval: {golden: [{name: gold, path: gold.jsonl}], forgetting: false, bootstrap: 200}
    """))
    rows = []  # 4 inputs: 3, 1, 5 and 2 answers, interleaved as a test split would hold them
    for j in range(5):
        rows += [_row(f"t:{i}{j}", f"input {i}", REFERENCES[i][j]) for i in range(4) if j < len(REFERENCES[i])]
    sets = eval_sets(loaded, Workspace(tmp_path / ".tuneline"), rows)
    assert [(s.name, len(s.examples)) for s in sets] == [("test", 4), ("gold", 1)]
    assert [ex.all_references for ex in sets[0].examples] == [tuple(r) for r in REFERENCES]

    evaluation = Evaluation(loaded.spec, None, sets, None, autocast=None, show_progress=False)
    evaluation.models = {"base": "base", "candidate": "cand"}
    base = ["nothing", REFERENCES[1][0], "nothing", "nothing"]
    for name, texts in (("base", base), ("candidate", PREDICTIONS)):
        evaluation.answers[("test", name)] = Generation(texts, 0.0, [True] * 4, [5] * 4)
        evaluation.answers[("gold", name)] = Generation(["a b d"], 0.0, [True], [3])
    suite = evaluation.finish()
    test = suite.main_set()
    assert test.n == 4 and test.item_references == REFERENCES and test.references == [r[0] for r in REFERENCES]
    cand = test.system("candidate")
    assert cand is not None and len(cand.scores) == 4
    bleu = cand.metrics["bleu"]
    assert bleu.value == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, _streams()).score / 100, abs=TOL)
    # the interval resamples the 4 items (seed 0), each with all its references
    idx = stats.resample_indices(4, 200)
    samples = [sacrebleu.corpus_bleu([PREDICTIONS[i] for i in r],
                                     reference_streams([REFERENCES[i] for i in r])).score / 100 for r in idx]
    assert (bleu.low, bleu.high) == pytest.approx(tuple(np.quantile(samples, [0.025, 0.975])), abs=TOL)
    # generation flips: items whose primary score (ROUGE-L) moved by >= FLIP_DELTA, largest first
    listed = test.flips["candidate_vs_base"]
    assert [f.index for f in listed][0] == 2 and {f.index for f in listed} == {0, 2, 3}  # item 1 moved 0.06
    flips = {f.index: f for f in listed}
    assert flips[2].kind == "improved" and flips[2].delta == pytest.approx(1.0)
    assert flips[2].closest_reference == REFERENCES[2][4] and flips[2].n_references == 5
    assert all(f.kind == "improved" and f.delta is not None and f.delta >= 0.2 for f in listed)
    gold = suite.sets[1]
    assert gold.n == 1 and gold.system("candidate").metrics["exact_match"].value == 1.0  # type: ignore[union-attr]


def test_validation_scorer_scores_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Early stopping and search on a generated metric score the validation rows as items."""
    import sys

    from tuneline.eval.generate import Generation
    from tuneline.eval.validate import make_scorer

    seen: list[list[Example]] = []

    def fake(model: object, tokenizer: object, examples: list[Example], options: object) -> Generation:
        seen.append(list(examples))
        return Generation([ex.all_references[-1] for ex in examples], 0.0, [True] * len(examples),
                          [3] * len(examples))

    monkeypatch.setattr(sys.modules["tuneline.eval.validate"], "generate_detailed", fake)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "summary": "y"}])
    spec = load_spec(write_spec(tmp_path, """
        name: t
        task: {type: summarization}
        objective: {primary: exact_match}
        model: smollm2-135m
        data: {train: {path: train.jsonl}}
    """)).spec
    rows = [_row("v:1", "in a", "one"), _row("v:2", "in b", "two"), _row("v:3", "in a", "uno")]
    scorer = make_scorer(spec, None, rows, None, "exact_match", precision="fp32", device="cpu")
    # the answer matches item "in a"'s second reference: right against any of them
    assert scorer(object()) == 1.0
    assert [ex.all_references for ex in seen[0]] == [("one", "uno"), ("two",)]


def test_scoring_without_validation_rows_is_an_evaluation_error(tmp_path: Path) -> None:
    """Early stopping on a spec without a validation split fails as an evaluation problem (not a
    training one), naming the field to fix."""
    from tuneline.errors import EvaluationError, TrainingError
    from tuneline.eval.validate import make_scorer

    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "summary": "y"}])
    spec = load_spec(write_spec(tmp_path, """
        name: t
        task: {type: summarization}
        objective: {primary: exact_match}
        model: smollm2-135m
        data: {train: {path: train.jsonl}}
    """)).spec
    with pytest.raises(EvaluationError, match="needs a validation split") as info:
        make_scorer(spec, None, [], None, "exact_match", precision="fp32", device="cpu")
    assert not isinstance(info.value, TrainingError)
    assert info.value.problems[0].field == "data.eval"


def test_the_baseline_recommendation_compares_corpus_bleu_itself_paired_over_items() -> None:
    from tuneline.baseline.options import BaselineReport, OptionResult, recommend
    from tuneline.eval.results import Estimate

    worse = ["A game.", "Mirror's Edge.", "Portal 2.", "Dirt: Showdown."]
    options = []
    for name, preds in (("prompt", worse), ("fine_tuned", PREDICTIONS)):
        sc = score("summarization", preds, REFERENCES, None, primary="bleu")
        bleu = sc.values()["bleu"]
        options.append(OptionResult(name, name, {"bleu": Estimate(bleu, bleu, bleu)}, 0.0, None, None, None,
                                    scores=[float(x) for x in sc.primary_scores], predictions=preds,
                                    aggregate=sc.metrics["bleu"]))
    report = recommend(BaselineReport("test", 4, "bleu", options), resamples=200)
    assert report.best == "fine_tuned"
    prompt = report.option("prompt")
    assert prompt is not None and prompt.vs_best is not None
    # the difference shown is the corpus BLEU difference, not a mean of sentence scores
    assert prompt.vs_best.value == pytest.approx(options[0].metrics["bleu"].value - options[1].metrics["bleu"].value)
    assert prompt.vs_best.value != pytest.approx(np.mean(options[0].scores) - np.mean(options[1].scores))
    assert "aggregate" not in json.dumps(report.to_dict())  # not saved


def test_the_prompt_baseline_reuses_the_base_models_answers_to_the_same_prompts(monkeypatch: pytest.MonkeyPatch):
    """Outside classification the prompt-only baseline asks the base model exactly what the
    evaluation's base system was asked: its answers are reused, not generated again."""
    from tuneline.baseline import options
    from tuneline.eval.generate import Generation

    items = [_row(f"t:{i}", f"input {i}", REFERENCES[i][0]) for i in range(4)]
    spec = SimpleNamespace(task=SimpleNamespace(type="summarization"), objective=SimpleNamespace(primary="bleu"),
                           eval=SimpleNamespace(bootstrap=100, batch_size=4, constrain_to_labels=True),
                           baseline=SimpleNamespace(latency_requests=1, seed=0))
    calls: list[int] = []

    def generate(ctx, examples, what, batch_size=None):
        calls.append(len(examples))
        return Generation(["fresh"] * len(examples), 0.0, [True] * len(examples), [1] * len(examples))

    monkeypatch.setattr(options, "_generate", generate)
    monkeypatch.setattr(options, "_timed", lambda fn, rows: (1.0, 2.0))
    monkeypatch.setattr(options, "encode_prompt", lambda tok, ex: [0, 1, 2])
    known = Generation(PREDICTIONS, 0.0, [True] * 4, [5] * 4)

    def prompt_option(answered):
        ctx = options.Context(spec=spec, tokenizer=None, model=None, train=[], validation=[], test=items,  # type: ignore[arg-type]
                              labels=None, autocast=None, device="cpu", answered=answered)
        return options._prompt_only(ctx, "prompt")

    reused = prompt_option((list(items), known))
    assert calls == [] and reused.predictions == PREDICTIONS  # no generation for the test items
    other = [_row(f"t:{i}", f"another input {i}", REFERENCES[i][0]) for i in range(4)]
    fresh = prompt_option((other, known))  # other prompts: generated
    assert calls == [4] and fresh.predictions == ["fresh"] * 4
