"""Output that is not a terminal stays readable: no progress line per update or per request, and
tables at full width instead of squeezed to 80 columns."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from helpers import write_jsonl, write_spec
from rich.console import Console
from rich.table import Table

from tuneline.data.examples import Example
from tuneline.eval.generate import GenerateOptions
from tuneline.runtime import progress
from tuneline.runtime.progress import WIDE_COLUMNS, make_console, progress_bar
from tuneline.spec import load_spec


def _piped() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out), out  # a StringIO is not a terminal: a log file, as far as Rich can tell


def test_a_bar_in_a_log_prints_nothing_per_update() -> None:
    console, out = _piped()
    with progress_bar(console=console) as bar:
        for k in range(3):
            task = bar.add_task(f"batch set {k}", total=50)
            for _ in range(50):
                bar.advance(task)
    assert out.getvalue() == ""  # short tasks: not a line, not even the final state


def test_a_long_task_in_a_log_gets_one_line_when_it_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LONG_TASK_SECONDS", 0.0)
    console, out = _piped()
    with progress_bar(console=console) as bar:
        done = bar.add_task("eval candidate on test", total=40)
        bar.add_task("never finished", total=40)
        for _ in range(40):
            bar.advance(done)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval candidate on test: 40/40 in ")


def test_no_progress_means_nothing_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LONG_TASK_SECONDS", 0.0)
    console, out = _piped()
    with progress_bar(console=console, enabled=False) as bar:
        bar.advance(bar.add_task("train", total=1))
    assert out.getvalue() == ""


def test_on_a_terminal_the_bar_is_drawn() -> None:
    out = io.StringIO()
    with progress_bar(console=Console(file=out, force_terminal=True, width=100)) as bar:
        bar.advance(bar.add_task("train", total=2), 2)
    assert "train" in out.getvalue() and "2/2" in out.getvalue()


def test_a_console_writing_to_a_file_is_wide_so_table_rows_stay_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    console = make_console(file=out)
    assert console.width == WIDE_COLUMNS
    table = Table(title="baselines")
    for col in ("option", "accuracy [95% interval]", "one-off cost", "p50 / p95 latency", "prompt tokens"):
        table.add_column(col)
    table.add_row("few_shot (8 fixed examples from the training split)", "0.4120 [0.3810, 0.4430]",
                  "0 s", "812 / 1,204 ms", "1,318")
    console.print(table)
    row = next(line for line in out.getvalue().splitlines() if "few_shot" in line)
    assert "8 fixed examples from the training split)" in row and "1,318" in row  # the whole row, unwrapped


def test_columns_still_decides_the_width_of_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert make_console(file=io.StringIO()).width == 120


def _item(i: int) -> Example:
    return Example(f"test.csv:{i + 2}", ({"role": "user", "content": f"question {i}"},
                                         {"role": "assistant", "content": "card_arrival"}), "card_arrival", "card_arrival")


def _fake_generate(model: object, tokenizer: object, examples: list[Example], options: GenerateOptions):
    """Generation as generate_detailed shows it: one bar per call, over the call's examples."""
    from tuneline.eval.generate import Generation

    with progress_bar(enabled=options.show_progress) as bar:
        task = bar.add_task(options.description, total=len(examples))
        bar.advance(task, len(examples))
    return Generation(["card_arrival"] * len(examples), 0.0, [True] * len(examples), [2] * len(examples))


def test_eval_latency_is_one_bar_not_one_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo > log` printed "eval latency ... 1/1" once per timed request (33 times)."""
    from tuneline.eval import suite
    from tuneline.eval.suite import EvalSet, Evaluation

    write_jsonl(tmp_path / "train.jsonl", [{"text": "where is my card", "label": "card_arrival"}])
    loaded = load_spec(write_spec(tmp_path, """
        name: t
        task: {type: classification}
        objective: {primary: accuracy}
        model: smollm2-135m
        data: {train: {path: train.jsonl}}
        eval: {latency: {requests: 6}}
    """))
    monkeypatch.setattr(suite, "generate_detailed", _fake_generate)
    monkeypatch.setattr(progress, "LONG_TASK_SECONDS", 0.0)  # every finished bar would leave its line
    evaluation = Evaluation(loaded.spec, None, [EvalSet("test", "test", [_item(i) for i in range(8)])], None,
                            autocast=None, show_progress=True)
    latency = evaluation._latency(None, lambda examples: examples)
    assert latency is not None and latency.n == 6
    lines = [line for line in capsys.readouterr().err.splitlines() if "latency" in line]
    assert len(lines) == 1 and lines[0].startswith("eval latency: 6/6 in "), lines


def test_baseline_timed_requests_draw_no_bar(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The baseline's single timed requests printed "baseline few_shot ... 1/1" once each."""
    import importlib
    from types import SimpleNamespace

    from tuneline.baseline import options

    generate = importlib.import_module("tuneline.eval.generate")  # `tuneline.eval.generate` is also a function

    monkeypatch.setattr(options, "generate_detailed", _fake_generate)
    monkeypatch.setattr(progress, "LONG_TASK_SECONDS", 0.0)
    monkeypatch.setattr(options, "encode_prompt", lambda tok, ex: [0, 1, 2])
    spec = SimpleNamespace(task=SimpleNamespace(type="classification"), objective=SimpleNamespace(primary="accuracy"),
                           eval=SimpleNamespace(bootstrap=100, batch_size=4, constrain_to_labels=False),
                           decoding=None, baseline=SimpleNamespace(latency_requests=5, seed=0))
    monkeypatch.setattr(generate.Decoding, "of", classmethod(lambda cls, d: cls()))
    items = [_item(i) for i in range(6)]
    random.seed(0)
    ctx = options.Context(spec=spec, tokenizer=None, model=None, train=[], validation=[], test=items,  # type: ignore[arg-type]
                          labels=["card_arrival"], autocast=None, device="cpu", show_progress=True)
    option = options._generated_option(ctx, "few_shot", "few-shot", items, 0.0)
    assert option.p50_ms is not None
    lines = [line for line in capsys.readouterr().err.splitlines() if "few_shot" in line]
    assert lines == ["baseline few_shot: 6/6 in 0s"]  # the answers' bar; none for the 6 timed requests
