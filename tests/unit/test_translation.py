"""The translation task (issue 17, point 5): a language pair in the spec, source -> user turn,
target -> answer, a default system prompt naming the pair, scored with BLEU and chrF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_csv, write_spec

from tuneline.errors import SpecError
from tuneline.spec import parse_spec

ROWS = [("Guten Morgen", "Good morning"), ("Meine Karte ist verloren", "My card is lost"),
        ("Wo ist der Bahnhof?", "Where is the station?"), ("Ich habe eine Frage", "I have a question"),
        ("Das Wetter ist schön", "The weather is nice"), ("Vielen Dank für Ihre Hilfe", "Thank you for your help")]


def _spec(tmp_path: Path, task: str = "{type: translation, source_language: de, target_language: en}") -> Path:
    write_csv(tmp_path / "train.csv", [{"de": d, "en": e} for d, e in ROWS])
    write_csv(tmp_path / "test.csv", [{"de": d, "en": e} for d, e in ROWS[:2]])
    return write_spec(tmp_path, f"""
        name: de-en
        task: {task}
        objective: {{primary: chrf, thresholds: ["bleu >= 0.0", "chrf - base.chrf >= 0.0"]}}
        model: smollm2-135m
        data:
          train: {{path: train.csv, columns: {{source: de, target: en}}}}
          test: {{path: test.csv, columns: {{source: de, target: en}}}}
        curation: {{split: {{validation: 0.0}}}}
    """)


@pytest.mark.parametrize(("task", "message"), [
    ("{type: translation, source_language: de}", "task type 'translation' needs target_language"),
    ("{type: translation}", "needs source_language and target_language"),
    ("{type: summarization, source_language: de}", "source_language apply only to task type 'translation'"),
])
def test_the_language_pair_belongs_to_translation(task: str, message: str):
    body = f"name: x\ntask: {task}\nobjective: {{primary: bleu}}\nmodel: m\ndata: {{train: {{path: d.csv}}}}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(body)
    assert message in str(info.value)


def test_translation_metrics_are_bleu_and_chrf():
    with pytest.raises(SpecError, match="not reported for task 'translation'"):
        parse_spec("name: x\ntask: {type: translation, source_language: de, target_language: en}\n"
                   "objective: {primary: accuracy}\nmodel: m\ndata: {train: {path: d.csv}}\n")


def test_rows_become_source_and_target_turns_under_the_default_prompt(tmp_path: Path):
    from tuneline.pipeline import validate

    loaded, data = validate(_spec(tmp_path))
    ex = next(e for e in data.test if e.reference == "Good morning")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    assert ex.messages[0]["content"] == "Translate the text from de to en. Answer with the translation only."
    assert (ex.messages[1]["content"], ex.messages[2]["content"]) == ("Guten Morgen", "Good morning")
    assert sorted(e.reference for e in data.test) == ["Good morning", "My card is lost"]
    # curation keeps every training row that is not a test row
    assert sorted(e.reference for e in data.train) == sorted(e for _, e in ROWS[2:])

    # an instruction replaces the default prompt
    own = tmp_path / "own"
    own.mkdir()
    _, data = validate(_spec(own, "{type: translation, source_language: de, target_language: en, "
                                  "instruction: Into English.}"))
    assert {e.messages[0]["content"] for e in data.train} == {"Into English."}


def test_tuneline_validate_accepts_a_translation_spec(tmp_path: Path):
    out = subprocess.run([sys.executable, "-c", "from tuneline.cli import main; main()", "validate",
                          str(_spec(tmp_path))], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "de-en (translation)" in " ".join(out.stdout.split())


def test_a_row_without_its_target_is_reported_with_its_line(tmp_path: Path):
    from tuneline.pipeline import validate

    spec = _spec(tmp_path)
    write_csv(tmp_path / "train.csv", [{"de": "Hallo", "en": "Hello"}, {"de": "Tschüss", "en": ""}])
    with pytest.raises(Exception) as info:
        validate(spec)
    assert "train.csv:3" in str(info.value) and "empty 'en'" in str(info.value)


def test_score_reports_bleu_and_chrf_equal_to_sacrebleu():
    import sacrebleu

    from tuneline.eval.metrics import score

    preds = ["Good morning", "My card was lost", "Where is the train station?"]
    refs = ["Good morning", "My card is lost", "Where is the station?"]
    values = score("translation", preds, refs, None, primary="chrf").values()
    assert {"bleu", "chrf", "exact_match"} <= set(values)
    assert "rouge_l" not in values  # ROUGE's tokenizer drops non-Latin text: not reported for translation
    assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score / 100)
    assert values["exact_match"] == pytest.approx(1 / 3)


def test_other_tasks_dump_as_before_so_fingerprints_and_study_names_keep():
    """Run fingerprints and search study names hash task.model_dump(): no new keys outside translation."""
    spec = parse_spec("name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: m\n"
                      "data: {train: {path: d.csv}}\n")
    assert spec.task.model_dump(mode="json") == {"type": "classification", "labels": None, "instruction": None}
