"""Task metrics on generated text: accuracy and macro-F1 for labels, ROUGE-L and BLEU for text."""

from __future__ import annotations

import re
import unicodedata


def normalize_label(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive form used for exact label match."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = re.sub(r"[\s\-]+", "_", text)
    return text.strip(" _.,;:!?\"'`")


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = [normalize_label(p) for p in predictions]
    ref = [normalize_label(r) for r in references]
    known = sorted({normalize_label(x) for x in labels})
    return {
        "accuracy": float(accuracy_score(ref, pred)),
        # macro over the label set: an invented label counts as wrong, not as a new class
        "macro_f1": float(f1_score(ref, pred, labels=known, average="macro", zero_division=0)),
        "invalid_rate": sum(p not in set(known) for p in pred) / max(1, len(pred)),
    }


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score / 100.0
    return {"rouge_l": sum(rouge) / max(1, len(rouge)), "bleu": bleu}
