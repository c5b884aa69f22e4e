"""Task metrics on generated answers, each computable on any subset of rows (for bootstrap intervals).

- classification: accuracy, macro-F1, invalid_rate (answers that are no label), per-class
  precision/recall/F1 and the confusion matrix;
- instruction, chat, summarization, translation: ROUGE-L, BLEU, chrF, exact match;
- structured: exact match, ROUGE-L, BLEU, chrF, and where the references are JSON (an object or
  array in at least one of them) JSON validity and field accuracy;

An item may have several references (a str or a sequence of str each): BLEU and chrF use
sacrebleu's multi-reference form (one reference stream per position, None where an item has
fewer), ROUGE-L is the best over the item's references, exact match is a match with any of them.
- every task: answer length in tokens, refusal rate, and the share of answers that stopped on
  their own (end of turn) rather than running into the token limit.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneline.eval.stats import Aggregate, macro_f1_metric, mean_metric, summed_stats_metric

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:'|no)t|i cannot|i'?m (?:not able|unable)|i am (?:not able|unable)"
    r"|as an ai\b|i won'?t be able|i do not have the ability)", re.IGNORECASE)


def normalize_label(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive form used for exact label match."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = re.sub(r"[\s\-]+", "_", text)
    return text.strip(" _.,;:!?\"'`")


def normalize_text(text: str) -> str:
    """For exact match of free text: NFKC, lower case, single spaces, no trailing punctuation."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    return re.sub(r"\s+", " ", text).strip(" .!?")


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text[:200]))


@dataclass
class Scored:
    """Per-row results and the metrics as functions of a set of row indices."""

    metrics: dict[str, Aggregate]
    primary_scores: np.ndarray  # per row: 1/0 right for labels, the primary text metric otherwise
    correct: np.ndarray | None = None  # per row right/wrong, where the task has one (classification)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: tuple[list[str], list[str], list[list[int]]] | None = None

    def values(self) -> dict[str, float]:
        idx = np.arange(len(self.primary_scores))
        return {name: agg(idx) for name, agg in self.metrics.items()}


References = Sequence["str | Sequence[str]"]


def as_reference_lists(references: References) -> list[list[str]]:
    """Each item's references as a list: a str is one reference, a sequence several."""
    out = []
    for r in references:
        refs = [r] if isinstance(r, str) else list(r)
        if not refs:
            raise ValueError("an evaluation item has no reference")
        out.append(refs)
    return out


def bleu_tokenize_for(spec: object) -> str:
    """sacrebleu's BLEU tokenizer for the spec's target language: ``zh`` for Chinese, ``char`` for
    Japanese and Korean (no spaces between words), else the default ``13a``."""
    lang = str(getattr(getattr(spec, "task", None), "target_language", None) or "").strip().lower()
    if lang.startswith("zh"):
        return "zh"
    if lang.startswith(("ja", "ko")):
        return "char"
    return "13a"


def score(task: str, predictions: list[str], references: References, labels: list[str] | None, *,
          primary: str | None = None, answer_tokens: list[int] | None = None,
          stopped: list[bool] | None = None, bleu_tokenize: str = "13a") -> Scored:
    """Score ``predictions`` against ``references`` for ``task``; ``primary`` picks the per-item score.

    ``references[i]`` is item i's reference, or a sequence of its references (see the module
    docstring for how each metric uses several). ``bleu_tokenize`` is sacrebleu's BLEU tokenizer
    (``13a``, ``zh``, ``char``, ...; see :func:`bleu_tokenize_for`)."""
    refs = as_reference_lists(references)
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} items with references")
    if task == "classification":
        firsts = [r[0] for r in refs]
        scored = _classification(predictions, firsts, labels or sorted(set(firsts)))
    elif task == "structured":
        scored = _structured(predictions, refs, primary, bleu_tokenize)
    else:
        scored = _text(predictions, refs, primary, bleu_tokenize)
        if task == "translation":  # BLEU and chrF; ROUGE's tokenizer drops every non-Latin character
            scored.metrics.pop("rouge_l")
    n = len(predictions)
    scored.metrics["answer_tokens"] = mean_metric(answer_tokens if answer_tokens is not None
                                                  else [len(p.split()) for p in predictions])
    scored.metrics["refusal_rate"] = mean_metric([is_refusal(p) for p in predictions])
    scored.metrics["stopped_rate"] = mean_metric(stopped if stopped is not None else [True] * n)
    return scored


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and invalid_rate on all rows (see :func:`score` for the rest)."""
    values = _classification(predictions, references, labels).values()
    return {k: values[k] for k in ("accuracy", "macro_f1", "invalid_rate")}


def _classification(predictions: list[str], references: list[str], labels: list[str]) -> Scored:
    known = sorted({normalize_label(x) for x in labels})
    names = {normalize_label(x): x for x in labels}
    pos = {lab: i for i, lab in enumerate(known)}
    for r in references:  # a reference outside the label set still gets a class of its own
        key = normalize_label(r)
        if key not in pos:
            pos[key] = len(known)
            known.append(key)
            names[key] = r
    pred = np.array([pos.get(normalize_label(p), -1) for p in predictions], dtype=np.int64)
    ref = np.array([pos[normalize_label(r)] for r in references], dtype=np.int64)
    correct = pred == ref
    k = len(known)
    metrics: dict[str, Aggregate] = {
        "accuracy": mean_metric(correct),
        # macro over the label set: an invented label counts as wrong, not as a new class
        "macro_f1": macro_f1_metric(pred, ref, k),
        "invalid_rate": mean_metric(pred < 0),
    }
    tp = np.bincount(ref[correct], minlength=k)
    n_pred = np.bincount(pred[pred >= 0], minlength=k)
    n_ref = np.bincount(ref, minlength=k)
    per_class = {}
    for i, key in enumerate(known):
        prec = float(tp[i] / n_pred[i]) if n_pred[i] else 0.0
        rec = float(tp[i] / n_ref[i]) if n_ref[i] else 0.0
        per_class[names[key]] = {"precision": prec, "recall": rec,
                                 "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "support": int(n_ref[i])}
    invalid = bool((pred < 0).any())
    cols = k + 1 if invalid else k
    matrix = np.zeros((k, cols), dtype=np.int64)
    np.add.at(matrix, (ref, np.where(pred < 0, k, pred)), 1)
    label_names = [names[x] for x in known]
    columns = label_names + (["(invalid)"] if invalid else [])
    return Scored(metrics, correct.astype(float), correct, per_class, (label_names, columns, matrix.tolist()))


def _text(predictions: list[str], references: list[list[str]], primary: str | None,
          bleu_tokenize: str = "13a") -> Scored:
    import sacrebleu

    rouge = np.array([max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)])
    exact = np.array([any(normalize_text(p) == normalize_text(r) for r in refs)
                      for p, refs in zip(predictions, references, strict=True)])
    metrics: dict[str, Aggregate] = {"rouge_l": mean_metric(rouge), "exact_match": mean_metric(exact)}
    per_row = {"rouge_l": rouge, "exact_match": exact.astype(float)}
    if predictions:
        streams: Any = reference_streams(references)  # None-padded: sacrebleu's types omit None, its code allows it
        for name, metric, sentence in (
                ("bleu", sacrebleu.BLEU(tokenize=bleu_tokenize), sacrebleu.BLEU(tokenize=bleu_tokenize,
                                                                                 effective_order=True)),
                ("chrf", sacrebleu.CHRF(), sacrebleu.CHRF())):
            # per-item sufficient statistics (each against all of the item's references), summed
            # over any resample of items: exactly sacrebleu's corpus score on that resample
            stats = np.array(metric._extract_corpus_statistics(predictions, streams), dtype=float)
            metrics[name] = summed_stats_metric(stats, _corpus_score(metric))
            if primary == name:  # per item: the sentence-level score (sacrebleu's sentence_bleu/_chrf)
                per_row[name] = np.array([_corpus_score(sentence)(row) for row in stats])
    else:
        metrics["bleu"] = metrics["chrf"] = mean_metric([])
    return Scored(metrics, per_row.get(primary or "rouge_l", rouge), exact)


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's multi-reference layout: stream j holds every item's j-th reference, None where
    an item has fewer than j + 1."""
    width = max((len(r) for r in references), default=0)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


_ROUGE: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (stemmed) of ``prediction`` against one reference."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def closest_reference(prediction: str, references: Sequence[str]) -> str:
    """The reference with the highest ROUGE-L against ``prediction`` (the first on ties)."""
    refs = list(references)
    if len(refs) <= 1:
        return refs[0] if refs else ""
    scores = [rouge_l(prediction, r) for r in refs]
    return refs[int(np.argmax(scores))]


def _corpus_score(metric: Any) -> Any:
    # sacrebleu's own statistics -> score path (its significance tests use the same), scaled to 0..1
    return lambda summed: float(metric._compute_score_from_stats(list(summed)).score) / 100.0


def _structured(predictions: list[str], references: list[list[str]], primary: str | None,
                bleu_tokenize: str = "13a") -> Scored:
    scored = _text(predictions, references, primary, bleu_tokenize)  # rouge_l unless exact_match
    wanted = [[_parse_json(r) for r in refs] for refs in references]
    if not any(ok and isinstance(v, (dict, list)) for item in wanted for v, ok in item):
        # the references are not JSON (e.g. a meaning representation): validity and field
        # accuracy would score every answer 0, so they are left out; exact match and the rest stay
        return scored
    valid, fields = [], []
    for p, item in zip(predictions, wanted, strict=True):
        got, ok = _parse_json(p)
        valid.append(ok)
        fields.append(max(_field_accuracy(got, ok, want) for want, _ in item))
    scored.metrics["json_valid"] = mean_metric(valid)
    scored.metrics["field_accuracy"] = mean_metric(fields)
    per_row = {"json_valid": np.array(valid, dtype=float), "field_accuracy": np.array(fields, dtype=float)}
    if primary in per_row:
        scored.primary_scores = per_row[primary]
    return scored


def _field_accuracy(got: Any, ok: bool, want: Any) -> float:
    if isinstance(want, dict) and want:
        return sum(isinstance(got, dict) and k in got and got[k] == v for k, v in want.items()) / len(want)
    return float(ok and got == want)  # a non-object reference: the whole value must match


def _parse_json(text: str) -> tuple[Any, bool]:
    s = text.strip()
    if s.startswith("```"):  # a fenced block: take its body
        s = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", s)
    try:
        return json.loads(s), True
    except (json.JSONDecodeError, ValueError):
        return None, False
