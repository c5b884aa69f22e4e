"""Curation: every step on small fixtures, the policies, dataset versions, rejects, diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl, write_spec

from tuneline.curation import curate, diff_versions, load_version, save_version
from tuneline.errors import DataError
from tuneline.spec import load_spec

SPEC = """
name: cur
task: {{type: classification, labels: [card, rate, topup]}}
objective: {{primary: accuracy}}
model: smollm2-135m
data:
  train: {{path: train.jsonl}}
{extra}
"""

GOOD = [
    {"text": "My card has still not arrived after two weeks of waiting", "label": "card"},
    {"text": "What exchange rate do you use for euro payments abroad", "label": "rate"},
    {"text": "The top up from my bank account failed this morning", "label": "topup"},
    {"text": "How long does a new card take to be delivered here", "label": "card"},
    {"text": "Why was I charged a bad rate when I paid in dollars", "label": "rate"},
    {"text": "I tried to add money but the top up was declined twice", "label": "topup"},
]


def _prepare(tmp_path: Path, rows: list, extra: str = "", tokenizer=None, lines: list[bytes] | None = None):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    if lines:
        path.write_bytes(path.read_bytes() + b"".join(line + b"\n" for line in lines))
    loaded = load_spec(write_spec(tmp_path, SPEC.format(extra=extra)))
    return loaded, curate(loaded, tokenizer)


def _reasons(curated) -> dict[str, str]:
    """where (file:line) -> the kind of reason it was dropped for."""
    return {r.where: r.reason.split(":")[0] for r in curated.rejects}


ALL_DROP = """
curation:
  validation: {unreadable: drop, missing_field: drop, unknown_label: drop, too_long: drop}
  split: {validation: 0, test: 0}
"""


def _bad_lines() -> list[bytes]:
    return [
        b'{"text": "broken json", "label": "card"',                      # line 7: bad JSON
        b'{"text": "caf\xe9 latte", "label": "card"}',                    # line 8: invalid UTF-8
        b'["not", "an", "object"]',                                       # line 9: not an object
        b'{"text": "", "label": "card"}',                                 # line 10: empty field
        b'{"label": "card"}',                                             # line 11: missing field
        b'{"text": "Please close my account today", "label": "closing"}',  # line 12: unknown label
        json.dumps({"text": "word " * 400, "label": "card"}).encode(),    # line 13: too long
    ]


def test_drop_policy_exports_every_bad_row_with_its_reason_and_line(tmp_path: Path, tokenizer):
    loaded, curated = _prepare(tmp_path, GOOD, ALL_DROP + "train: {seq_len: 128}", tokenizer, _bad_lines())
    reasons = _reasons(curated)
    assert reasons == {
        "train.jsonl:7": "unreadable", "train.jsonl:8": "unreadable", "train.jsonl:9": "unreadable",
        "train.jsonl:10": "missing_field", "train.jsonl:11": "missing_field",
        "train.jsonl:12": "unknown_label", "train.jsonl:13": "too_long",
    }
    assert len(curated.splits["train"]) == len(GOOD)  # every good row kept
    by_where = {r.where: r for r in curated.rejects}
    assert "broken json" in by_where["train.jsonl:7"].row["raw"]  # the line as read, for fixing
    assert by_where["train.jsonl:12"].row["label"] == "closing"
    assert "128" in by_where["train.jsonl:13"].reason

    version = save_version(curated, tmp_path / "ds", "cur", loaded.sha256)
    exported = version.rejects()
    assert {r["where"] for r in exported} == set(reasons)
    assert version.manifest["dropped_by_reason"]["unreadable"] == 3
    assert version.manifest["steps"][0]["rows_in"] == len(GOOD) + 7


def test_bad_csv_lines_are_dropped_one_by_one_and_the_rest_is_read(tmp_path: Path):
    path = tmp_path / "train.csv"
    good = "".join(f'"{r["text"]}",{r["label"]}\n' for r in GOOD)
    path.write_bytes(b"text,label\n" + good[:good.index("\n") + 1].encode()
                     + b'"an "unescaped" quote",card\n'          # line 3: bad quoting
                     + b'caf\xe9 au lait at the airport,rate\n'  # line 4: invalid UTF-8
                     + b'three,fields,here\n'                   # line 5: wrong field count
                     + good[good.index("\n") + 1 :].encode())   # lines 6-10: still read
    spec = write_spec(tmp_path, SPEC.format(extra="").replace("train.jsonl", "train.csv") + ALL_DROP)
    curated = curate(load_spec(spec))
    assert _reasons(curated) == {"train.csv:3": "unreadable", "train.csv:4": "unreadable",
                                 "train.csv:5": "unreadable"}
    assert len(curated.splits["train"]) == len(GOOD)
    raw = {r.where: r.row["raw"] for r in curated.rejects}
    assert "unescaped" in raw["train.csv:3"] and "caf" in raw["train.csv:4"]


def test_fail_policy_stops_and_names_the_first_bad_line(tmp_path: Path):
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, GOOD, lines=_bad_lines())
    text = str(exc.value)
    assert "train.jsonl:7" in text and "invalid JSON" in text
    assert text.index("train.jsonl:7") < text.index("train.jsonl:8")  # in file order, all of them
    assert "nothing was trained" in text


def test_warn_keeps_usable_rows(tmp_path: Path):
    extra = ALL_DROP.replace("unknown_label: drop", "unknown_label: warn")
    _, curated = _prepare(tmp_path, [*GOOD, {"text": "Please close my account for good", "label": "closing"}], extra)
    assert "closing" in {ex.label for ex in curated.splits["train"]}
    assert curated.steps[0].details["warned"] == {"unknown_label": 1}


def test_normalization_composes_unicode_and_cleans_whitespace(tmp_path: Path):
    rows = [*GOOD, {"text": "Cafe\u0301   payment\u200b failed\x00 at the   shop", "label": "rate"}]
    _, curated = _prepare(tmp_path, rows, ALL_DROP)
    text = curated.splits["train"][-1].messages[-2]["content"]
    assert text == "Café payment failed at the shop"
    assert curated.steps[1].name == "normalize" and curated.steps[1].changed == 1


def test_pii_redacted_with_counts_and_ordinary_numbers_kept(tmp_path: Path):
    rows = [*GOOD,
            {"text": "Email me at jane.doe@example.com or call +44 20 7946 0958 about it", "label": "card"},
            {"text": "My card 4111 1111 1111 1111 was charged twice on the terminal", "label": "rate"},
            {"text": "I paid 250.00 on 2024-01-15 for order 12345 at 10:30", "label": "rate"}]
    _, curated = _prepare(tmp_path, rows, ALL_DROP)
    texts = [ex.messages[-2]["content"] for ex in curated.splits["train"]]
    assert "Email me at <EMAIL> or call <PHONE> about it" in texts
    assert "My card <CARD> was charged twice on the terminal" in texts
    assert "I paid 250.00 on 2024-01-15 for order 12345 at 10:30" in texts  # not PII
    assert curated.pii_counts == {"card": 1, "email": 1, "phone": 1}


def test_pii_drop_policy_rejects_the_row(tmp_path: Path):
    rows = [*GOOD, {"text": "Reach me at jane.doe@example.com about the transfer", "label": "card"}]
    _, curated = _prepare(tmp_path, rows, ALL_DROP + "  pii: {policy: drop}\n")
    assert _reasons(curated) == {"train.jsonl:7": "pii"}


def test_rejects_hold_no_pii_only_the_reason(tmp_path: Path):
    rows = [*GOOD,
            {"text": "Reach me at jane.doe@example.com about the transfer", "label": "card"},        # 7
            {"text": "My card:\n4111 1111 1111 1111 was charged twice at the shop", "label": "rate"},  # 8
            {"text": "Call +44 20 7946 0958 about my crypto wallet please", "label": "crypto"}]     # 9
    lines = [b'{"text": "mail jane.doe@example.com, card 4111 1111 1111 1111", "label": "card"']  # 10: bad JSON
    loaded, curated = _prepare(tmp_path, rows, ALL_DROP + "  pii: {policy: drop}\n", lines=lines)
    assert _reasons(curated) == {"train.jsonl:7": "pii", "train.jsonl:8": "pii", "train.jsonl:9": "unknown_label",
                                 "train.jsonl:10": "unreadable"}
    version = save_version(curated, tmp_path / "ds", "cur", loaded.sha256)
    stored = (version.path / "rejects.jsonl").read_text()
    for secret in ("jane.doe", "4111", "1111 1111", "7946"):
        assert secret not in stored
    rejects = {r["where"]: r for r in version.rejects()}
    assert rejects["train.jsonl:7"]["reason"] == "pii: contains 1 email"
    assert rejects["train.jsonl:7"]["row"]["messages"][-2]["content"] == "Reach me at <EMAIL> about the transfer"
    assert rejects["train.jsonl:8"]["reason"] == "pii: contains 1 card"
    assert rejects["train.jsonl:8"]["row"]["messages"][-2]["content"] == (
        "My card:\n<CARD> was charged twice at the shop")
    assert rejects["train.jsonl:9"]["row"]["messages"][-2]["content"] == (
        "Call <PHONE> about my crypto wallet please")  # rejected by validation, before the PII step
    assert "<EMAIL>" in rejects["train.jsonl:10"]["row"]["raw"] and "<CARD>" in rejects["train.jsonl:10"]["row"]["raw"]


def test_exact_near_and_conflicting_duplicates(tmp_path: Path):
    long = "I ordered a replacement card last month and it still has not arrived at my home address in town"
    rows = [*GOOD,
            {"text": GOOD[0]["text"].upper() + "  ", "label": "card"},            # 7: exact duplicate of 1
            {"text": long, "label": "card"},                                      # 8
            {"text": long + " please", "label": "card"},                          # 9: near duplicate of 8
            {"text": "Is there a fee for topping up", "label": "topup"},          # 10: conflict ...
            {"text": "is there a fee for topping up", "label": "rate"}]           # 11: ... with 10
    _, curated = _prepare(tmp_path, rows, ALL_DROP)
    reasons = _reasons(curated)
    assert reasons["train.jsonl:7"] == "exact_duplicate"
    assert reasons["train.jsonl:10"] == reasons["train.jsonl:11"] == "conflict"
    assert len(curated.conflicts) == 1 and len(curated.conflicts[0]["rows"]) == 2
    by_where = {r.where: r.reason for r in curated.rejects}
    assert "train.jsonl:1" in by_where["train.jsonl:7"]  # names the row it duplicates
    assert "train.jsonl:8" not in reasons  # the first of a near-duplicate pair stays
    assert reasons.get("train.jsonl:9") == "near_duplicate" and "train.jsonl:8" in by_where["train.jsonl:9"]


def test_quality_filters(tmp_path: Path):
    rows = [*GOOD,
            {"text": "buy now " * 20, "label": "card"},
            {"text": "1234 5678 9012 #### ----", "label": "rate"}]
    _, curated = _prepare(tmp_path, rows, ALL_DROP)
    assert _reasons(curated) == {"train.jsonl:7": "repetitive", "train.jsonl:8": "non_text"}


def test_training_rows_that_match_the_test_set_are_removed(tmp_path: Path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": GOOD[1]["text"].lower(), "label": "rate"},
                                          {"text": "A completely different question about my card", "label": "card"}])
    extra = "  test: {path: test.jsonl}\n" + ALL_DROP
    _, curated = _prepare(tmp_path, GOOD, extra)
    assert _reasons(curated) == {"train.jsonl:2": "eval_exact"}
    assert len(curated.splits["test"]) == 2  # the test set itself is untouched


def test_cap_per_class_and_split_when_only_train_is_given(tmp_path: Path):
    rows = [{"text": f"question number {w} about {lab} things and more words", "label": lab}
            for lab in ("card", "rate", "topup") for w in ("one two", "three four", "five six", "seven eight",
                                                            "nine ten", "eleven twelve", "thirteen fourteen",
                                                            "fifteen sixteen", "seventeen eighteen", "nineteen twenty")]
    extra = "curation:\n  dedup: {near: false}\n  max_per_class: 8\n  split: {validation: 0.25, test: 0.25, seed: 1}\n"
    _, curated = _prepare(tmp_path, rows, extra)
    assert _reasons(curated) == {r.where: "over_cap" for r in curated.rejects} and len(curated.rejects) == 6
    sizes = {k: len(v) for k, v in curated.splits.items()}
    assert sizes == {"train": 12, "validation": 6, "test": 6}
    for part in curated.splits.values():  # stratified: every label in every part
        assert {ex.label for ex in part} == {"card", "rate", "topup"}


def test_version_id_is_stable_and_changes_with_one_row_and_diff_shows_it(tmp_path: Path):
    loaded, first = _prepare(tmp_path, GOOD, ALL_DROP)
    root = tmp_path / "ds"
    v1 = save_version(first, root, "cur", loaded.sha256)
    _, again = _prepare(tmp_path, GOOD, ALL_DROP)
    assert save_version(again, root, "cur", loaded.sha256).id == v1.id
    changed = [dict(r) for r in GOOD]
    changed[2]["text"] = "The top up from my savings account failed this evening"
    _, third = _prepare(tmp_path, changed, ALL_DROP)
    v2 = save_version(third, root, "cur", loaded.sha256)
    assert v2.id != v1.id
    assert load_version(v2.id[:8], root).id == v2.id  # a unique prefix is enough
    d = diff_versions(v1, v2)
    train = d["splits"]["train"]
    assert [ex.messages[-2]["content"] for ex in train["added"]] == [changed[2]["text"]]
    assert [ex.messages[-2]["content"] for ex in train["removed"]] == [GOOD[2]["text"]]
    assert d["sources_changed"] == ["train: train.jsonl"]
    # stored splits read back as the same examples
    assert v2.split("train") == third.splits["train"]
    card = v2.card.read_text()
    assert "## Steps" in card and "## Labels" in card and "train.jsonl" in card


def test_cli_data_prepare_show_rejects(tmp_path: Path, builtin_dir: Path):
    from typer.testing import CliRunner

    from tuneline.cli import app

    write_jsonl(tmp_path / "train.jsonl", [*GOOD, {"text": GOOD[0]["text"], "label": "card"}])
    spec = write_spec(tmp_path, SPEC.format(extra="curation: {split: {validation: 0, test: 0}}"))
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    (ws / "models" / builtin_dir.name).symlink_to(builtin_dir)  # the session's converted model (tokenizer)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", str(spec), "-w", str(ws)])
    assert res.exit_code == 0, res.output
    vid = next(w for w in res.output.split() if w.startswith("ds-")).rstrip(":")
    res = runner.invoke(app, ["data", "show", vid, "-w", str(ws)])
    assert res.exit_code == 0 and "dedup" in res.output and "exact_duplicate 1" in res.output
    res = runner.invoke(app, ["data", "rejects", vid, "-w", str(ws)])
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [(r["where"], r["step"]) for r in rows] == [("train.jsonl:7", "dedup")]
    res = runner.invoke(app, ["data", "show", "ds-nope", "-w", str(ws)])
    assert res.exit_code != 0
    # the same inputs: the same id; one row changed: a new id, and diff shows that row
    res = runner.invoke(app, ["data", "prepare", str(spec), "-w", str(ws)])
    assert vid in res.output
    write_jsonl(tmp_path / "train.jsonl", [*GOOD[:-1], {"text": "A brand new question about my pin", "label": "card"},
                                           {"text": GOOD[0]["text"], "label": "card"}])
    res = runner.invoke(app, ["data", "prepare", str(spec), "-w", str(ws)])
    new = next(w for w in res.output.split() if w.startswith("ds-")).rstrip(":")
    assert new != vid
    res = runner.invoke(app, ["data", "diff", vid, new, "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "+ train.jsonl:6: A brand new question about my pin" in res.output
    assert "- train.jsonl:6: " + GOOD[-1]["text"] in res.output


def test_map_contents_keeps_the_example_when_nothing_changes_and_the_turns_it_reads():
    from tuneline.curation.steps import input_of, map_contents, text_of
    from tuneline.data.examples import Example

    system = {"role": "system", "content": "Be brief."}
    chat = Example("c.jsonl:1", (system, {"role": "user", "content": "Hi  there"},
                                 {"role": "assistant", "content": "Hello  back"}), "Hello  back")
    labelled = Example("t.csv:2", ({"role": "user", "content": "Card  lost"},
                                   {"role": "assistant", "content": "card"}), "card", "card")
    assert text_of(chat) == "Hi  there\nHello  back" and input_of(chat) == "Hi  there"
    assert text_of(labelled) == "Card  lost\ncard" and input_of(labelled) == "Card  lost"
    seen: list[str] = []

    def squeeze(text: str) -> str:
        seen.append(text)
        return " ".join(text.split())

    assert map_contents(labelled, str.strip, answer_too=False) is labelled
    new = map_contents(labelled, squeeze, answer_too=False)
    assert seen == ["Card  lost"]  # not the system prompt, not the label
    assert new.messages == ({"role": "user", "content": "Card lost"}, {"role": "assistant", "content": "card"})
    assert (new.where, new.reference, new.label) == ("t.csv:2", "card", "card")
    seen.clear()
    new = map_contents(chat, squeeze, answer_too=True)
    assert seen == ["Hi  there", "Hello  back"]
    assert new.messages[0] is system and new.messages[1:] == (
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello back"})
    assert new.reference == "Hello back"
    assert chat.messages[2]["content"] == "Hello  back"  # the original is left as it was


def test_curation_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path):
    import gc

    assert gc.isenabled()
    _prepare(tmp_path, GOOD, ALL_DROP)
    assert gc.isenabled()
    gc.disable()
    try:
        _prepare(tmp_path, GOOD, ALL_DROP)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(DataError):  # a failing curation too
        _prepare(tmp_path, [], ALL_DROP)
    assert gc.isenabled()
