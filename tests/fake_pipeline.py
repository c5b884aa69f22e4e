"""`python tests/fake_pipeline.py ARGS...`: the real `tuneline` CLI over a stand-in pipeline whose
stages return at once (no model), and print as the real ones do: to the console they are given,
with print(), on Rich's global console and in the log. Environment: FAKE_GATES=pass|fail,
FAKE_BEST=1|0 (a search with or without a completed trial), FAKE_SLEEP=seconds (a long run,
to be interrupted; "ready" on stdout once it sleeps)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from rich import print as rich_print
from rich.console import Console

import tuneline.pipeline as pipeline
from tuneline.baseline.options import BaselineReport, OptionResult
from tuneline.eval.results import Estimate, EvalSuite, GateResult
from tuneline.pipeline import RunResult
from tuneline.train import TrainResult
from tuneline.tune.study import SearchResult, TrialRow


def _talk(console: Console | None) -> None:
    assert console is not None
    console.print("[bold]a table a person reads[/]")
    print("a library's print()")
    rich_print("Rich's global console")
    logging.getLogger("tuneline.pipeline").info("a log line")
    if float(os.environ.get("FAKE_SLEEP", "0")):
        sys.stdout.flush()
        os.write(1, b"ready\n")
        time.sleep(float(os.environ["FAKE_SLEEP"]))


def run(spec_path: object, *, console: Console | None = None, **_: object) -> RunResult:
    _talk(console)
    passed = os.environ.get("FAKE_GATES", "pass") == "pass"
    train = TrainResult(adapter_dir="runs/t/adapter", steps=4, epochs=1.0, train_examples=24, dropped_too_long=0,
                        train_tokens=960, computed_tokens=900, seconds=2.0, tokens_per_second=480.0,
                        final_loss=1.25, eval_loss=1.5, trainable_params=10, total_params=100, precision="fp32",
                        device="cpu", resumed_from_step=None)
    gate = GateResult("accuracy >= 0.5", 0.75 if passed else 0.25, 0.5, passed, 0.25 if passed else -0.25)
    report = EvalSuite(spec="t", task="classification", primary="accuracy", created="now", sets=[], gates=[gate])
    return RunResult("run123", Path("runs/t"), train, report, 3.5, model_version=2)


def tune(spec_path: object, *, console: Console | None = None, **_: object) -> SearchResult:
    _talk(console)
    row = TrialRow(number=0, state="complete", params={"lr": 0.001}, value=0.75, validations=[(4, 0.75)], seconds=1.0)
    best = row if os.environ.get("FAKE_BEST", "1") == "1" else None
    return SearchResult(study_name="s", backend="optuna", metric="accuracy", direction="maximize", trials_wanted=1,
                        trials=[row], best=best)


def baseline(spec_path: object, *, console: Console | None = None, **_: object) -> BaselineReport:
    _talk(console)
    option = OptionResult("prompt", "the instruction alone", {"accuracy": Estimate(0.5, 0.25, 0.75)}, 0.0, 10.0, 20.0,
                          30.0, scores=[1.0, 0.0])
    return BaselineReport(set="test", n=2, metric="accuracy", options=[option], best="prompt", recommended="prompt")


pipeline.run, pipeline.tune, pipeline.baseline = run, tune, baseline  # type: ignore[assignment]

from tuneline.cli import main  # noqa: E402

main(sys.argv[1:])
