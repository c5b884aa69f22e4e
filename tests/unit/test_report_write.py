"""`tuneline report RUN`: finding the run in a real MLflow store, loading what it logged, writing
the page, and the command."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_samples import CURVES, MANIFEST, SPEC_TEXT, make_suite

from tuneline.errors import TunelineError
from tuneline.report import write_report


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A workspace with one evaluated run and one run without an evaluation."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from tuneline.workspace import Workspace

    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    client = MlflowClient(tracking_uri=ws.tracking_uri)
    exp = client.create_experiment("banking77-intents", artifact_location=(ws.artifact_root / "b77").as_uri())
    run = client.create_run(exp, run_name="nightly")
    rid = run.info.run_id
    client.log_dict(rid, make_suite().to_dict(), "eval/report.json")
    client.log_text(rid, SPEC_TEXT, "spec/tuneline.yaml")
    client.log_dict(rid, MANIFEST, "dataset/manifest.json")
    client.log_batch(rid, metrics=[Metric("train_loss", loss, 0, step) for step, loss in CURVES["train_loss"]])
    client.set_tag(rid, "tuneline.model", "smollm2-135m")
    client.set_terminated(rid)
    bare = client.create_run(exp).info.run_id
    client.log_text(bare, SPEC_TEXT, "spec/tuneline.yaml")
    return ws.root, rid, bare


def test_write_report_from_mlflow(store: tuple[Path, str, str]) -> None:
    root, rid, _ = store
    path = write_report(rid[:8], root)
    assert path == root / "reports" / f"{rid}.html"
    page = path.read_text()
    assert f"<title>tuneline report: banking77-intents ({rid[:12]})</title>" in page
    assert rid in page and "nightly" in page and "smollm2-135m" in page and "FINISHED" in page
    assert "ds-0123456789abcdef" in page and "Answer &lt;label&gt; only" in page
    assert "eval_loss" not in page  # only train_loss was logged
    assert "train_loss 0.2326 at step 195" in page
    assert page.count('<img class="plot"') == 5


def test_report_command(store: tuple[Path, str, str], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from tuneline.cli.report import register

    app = typer.Typer()
    register(app)

    @app.command()
    def noop() -> None:  # a second command, so `report` stays a named subcommand
        pass

    root, rid, _ = store
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", rid[:10], "-w", str(root), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out) and out.is_file()


def test_write_report_errors(store: tuple[Path, str, str]) -> None:
    root, _, bare = store
    with pytest.raises(TunelineError, match="no run 'ffffffffffff'") as e:
        write_report("ffffffffffff", root)
    assert "tuneline runs" in str(e.value)
    with pytest.raises(TunelineError, match="too short"):
        write_report("abc", root)
    with pytest.raises(TunelineError, match=r"no evaluation report.*tuneline eval SPEC"):
        write_report(bare, root)


def test_a_prefix_finds_the_runs_that_tuneline_runs_lists(store: tuple[Path, str, str]) -> None:
    """The prefix lookup is `tracking.list_runs`: search trials count, deleted runs do not (their full
    id still works)."""
    from mlflow.tracking import MlflowClient

    from tuneline.workspace import Workspace

    root, rid, _ = store
    client = MlflowClient(tracking_uri=Workspace.at(root).tracking_uri)
    exp = client.get_run(rid).info.experiment_id
    trial = client.create_run(exp, tags={"tuneline.kind": "search-trial"}).info.run_id
    gone = client.create_run(exp).info.run_id
    for run_id in (trial, gone):
        client.log_dict(run_id, make_suite().to_dict(), "eval/report.json")
    client.delete_run(gone)
    assert write_report(trial[:8], root).name == f"{trial}.html"
    assert write_report(gone, root).name == f"{gone}.html"
    with pytest.raises(TunelineError, match=f"no run '{gone[:8]}'"):
        write_report(gone[:8], root)
