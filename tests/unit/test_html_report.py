"""`tuneline report`: the HTML page's content, the page in headless Chromium, and finding the run
in a real MLflow store."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from tuneline.errors import TunelineError
from tuneline.eval.html import render_html, write_report
from tuneline.eval.results import (
    Comparison,
    Confusion,
    Estimate,
    EvalSuite,
    Flip,
    Forgetting,
    GateResult,
    Latency,
    Perturbed,
    ProbeItem,
    Robustness,
    SetResult,
    SystemResult,
)

EVIL = '<script>alert("x")</script>'
N_LABELS = 77


def make_suite() -> EvalSuite:
    """A classification suite shaped like BANKING77: 77 labels, base/candidate/production on the
    test split, a golden set, every optional section filled, one gate failing."""
    rng = random.Random(0)
    labels = [f"intent_{i:02d}" for i in range(N_LABELS - 1)] + ["card <b>&amp; co"]
    columns = [*labels, "(invalid)"]

    def confusion(acc: float) -> Confusion:
        m = [[0] * len(columns) for _ in labels]
        for i in range(len(labels)):
            for _ in range(13):
                j = i if rng.random() < acc else rng.choice([(i + 1) % len(labels), (i + 7) % len(labels), len(labels)])
                m[i][j] += 1
        return Confusion(labels, columns, m)

    def per_class(acc: float) -> dict[str, dict[str, float]]:
        out = {}
        for lab in labels:
            f1 = min(1.0, max(0.0, acc + rng.uniform(-0.2, 0.2)))
            out[lab] = {"precision": f1, "recall": f1, "f1": f1, "support": 13.0}
        return out

    def system(name: str, acc: float, with_detail: bool = True) -> SystemResult:
        return SystemResult(
            name=name, model=f"models/{name}", seconds_per_example=0.03 + acc / 100,
            metrics={"accuracy": Estimate(acc, acc - 0.03, acc + 0.03),
                     "macro_f1": Estimate(acc - 0.01, acc - 0.045, acc + 0.02)},
            per_class=per_class(acc) if with_detail else {},
            confusion=confusion(acc) if with_detail else None,
        )

    fixed = [Flip(i, f"test.csv:{i + 2}", f"message {i}" if i else EVIL, labels[i % N_LABELS],
                  labels[(i + 1) % N_LABELS], labels[i % N_LABELS], "fixed") for i in range(60)]
    broken = [Flip(100 + i, f"test.csv:{102 + i}", f"broken message {i}", labels[i], labels[i],
                   labels[i + 3], "broken") for i in range(4)]
    test = SetResult(
        name="test", kind="test", n=N_LABELS * 13,
        systems=[system("base", 0.31), system("candidate", 0.86), system("production", 0.81)],
        comparisons=[
            Comparison("candidate", "base", "accuracy", Estimate(0.55, 0.51, 0.59), 1e-9, "mcnemar", True, 560, 11),
            Comparison("candidate", "production", "accuracy", Estimate(0.05, -0.01, 0.1), 0.09, "mcnemar", False, 70, 31),
        ],
        flips={"candidate_vs_base": fixed + broken},
    )
    golden = SetResult(
        name="golden-v3 <edge cases>", kind="golden", n=40, version=3, sha256="ab" * 32, path="golden/edge.jsonl",
        systems=[system("base", 0.4, with_detail=False), system("candidate", 0.7, with_detail=False)],
        comparisons=[Comparison("candidate", "base", "accuracy", Estimate(0.3, 0.1, 0.5), 0.004, "mcnemar", True, 14, 2)],
    )
    forgetting = Forgetting(
        n=30, base=Estimate(0.6, 0.43, 0.77), candidate=Estimate(0.53, 0.37, 0.7), drop=0.07,
        items=[ProbeItem(f"What is {i} + {i}?", str(2 * i), str(2 * i), str(2 * i) if i % 4 else "?", True, bool(i % 4))
               for i in range(30)])
    robustness = Robustness(set="test", metric="accuracy", n=200, clean=0.86,
                            perturbations={"typos": Perturbed(0.79, 0.07), "lowercase": Perturbed(0.85, 0.01),
                                           "extra whitespace": Perturbed(0.86, 0.0)})
    gates = [
        GateResult("accuracy >= 0.75", 0.86, 0.75, True, 0.11),
        GateResult("macro_f1 >= 0.90", 0.85, 0.90, False, -0.05),
        GateResult("forgetting.drop <= 0.10", 0.07, 0.10, True, 0.03, note="probe of 30 general questions"),
    ]
    return EvalSuite(
        spec="banking77-intents", task="classification", primary="accuracy", created="2026-12-01T10:00:00Z",
        sets=[test, golden], gates=gates, forgetting=forgetting, robustness=robustness,
        latency=Latency(n=50, p50_ms=41.5, p95_ms=77.25, mean_ms=45.0, tokens_per_second=212.4),
        human={"against": "base", "n": 40, "win_rate": 0.6, "low": 0.45, "high": 0.74, "wins": 20, "losses": 12,
               "ties": 8},
    )


MANIFEST = {"id": "ds-0123456789abcdef", "spec": "banking77-intents", "created": "2026-11-30T09:00:00Z",
            "counts": {"train": 2855, "validation": 0, "test": 1000}, "rejected": 145,
            "dropped_by_reason": {"exact_duplicate": 45, "test_overlap": 100}, "pii_found": {"email": 3}}
SPEC_TEXT = "name: banking77-intents\ntask:\n  type: classification\n  instruction: \"Answer <label> only & nothing else\"\n"
CURVES = {"train_loss": [(s, 2.5 / (1 + s / 20)) for s in range(0, 200, 5)], "eval_loss": [(100, 0.9), (199, 0.7)]}


@functools.cache
def default_page() -> str:
    return render()


def render(suite: EvalSuite | None = None) -> str:
    return render_html(suite or make_suite(), title="tuneline report: banking77-intents (abc123)",
                       spec_text=SPEC_TEXT, dataset=MANIFEST, loss_curves=CURVES,
                       run_info={"run id": "abc123def456", "experiment": "banking77-intents"})


def test_render_html_content() -> None:
    page = default_page()
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>tuneline report: banking77-intents (abc123)</title>" in page
    # overall verdict: one gate fails
    assert ">FAILED<" in page and "2 of 3 gates passed" in page
    for expr in ("accuracy &gt;= 0.75", "macro_f1 &gt;= 0.90", "forgetting.drop &lt;= 0.10"):
        assert expr in page
    assert "-0.050" in page and "probe of 30 general questions" in page
    # every system side by side with its interval; comparisons with signed intervals and p-values
    assert "0.860 [0.830, 0.890]" in page and "0.310 [0.280, 0.340]" in page and "0.810 [0.780, 0.840]" in page
    assert "+0.550 [+0.510, +0.590]" in page and "&lt;0.001" in page and "mcnemar" in page
    assert "Evaluation set: golden-v3 &lt;edge cases&gt;" in page and "golden/edge.jsonl" in page
    # per-class table folded, 77 labels; confusion focused on 20 labels and saying so
    assert "<summary>Per-class scores (77 labels" in page
    assert "The 20 labels (of 77) involved in the most confusions of candidate" in page
    # flips capped at 50 with the total
    assert "fixed (60, showing the first 50)" in page and "broken (4)" in page
    # forgetting, robustness, latency, human, loss, data, spec
    assert "Probe items (30" in page and "+0.070" in page
    assert "typos" in page and "worst drop +0.070" in page
    assert "77.2" in page and "212.4" in page
    assert "0.600 [0.450, 0.740]" in page and "wins 20, losses 12, ties 8" in page
    assert "train_loss" in page and "eval_loss 0.7000 at step 199" in page
    assert "ds-0123456789abcdef" in page and "test_overlap" in page and "email" in page
    assert "Answer &lt;label&gt; only &amp; nothing else" in page
    # user text is escaped everywhere: no live script, the odd label shown literally
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "card &lt;b&gt;&amp;amp; co" in page
    # self-contained: nothing loaded from the network
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and not [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]
    assert "http://" not in page.split("data:image")[0] and "https://" not in page
    assert page.count('<img class="plot"') == 5  # primary x2 sets, confusion, robustness, loss


def test_confusion_focus_keeps_rows_whole() -> None:
    from tuneline.eval.html import _confusion_focus, _confusion_view

    candidate = make_suite().sets[0].system("candidate")
    assert candidate is not None and candidate.confusion is not None
    conf = candidate.confusion
    rows, cols, n_confused = _confusion_focus(conf, 20)
    assert len(rows) == 20 and n_confused > 20 and conf.columns.index("(invalid)") in cols
    row_labels, col_labels, m = _confusion_view(conf, rows, cols)
    assert col_labels[-1] == "(other labels)" and col_labels[:20] == row_labels
    for a, i in enumerate(rows):  # every prediction of a shown label is counted once
        assert m[a].sum() == sum(conf.matrix[i])


def test_render_html_tolerates_a_minimal_suite() -> None:
    suite = EvalSuite(spec="s", task="instruction", primary="rouge_l", created="now", sets=[SetResult(
        name="test", kind="test", n=3, systems=[SystemResult("candidate", "m", {"rouge_l": Estimate(0.4)}, 0.1)])])
    page = render_html(suite, title="t", spec_text=None, dataset={"id": "ds-x"}, loss_curves={}, run_info={})
    assert "NO GATES" in page and "No loss history" in page and "0.400" in page and "ds-x" in page


# --- the page in a real browser ------------------------------------------------------------------

def _browser_or_skip() -> tuple[str, str | None]:
    """chromedriver (and chromium) paths; skip when missing, fail instead when CI is set."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    driver = shutil.which("chromedriver")
    if driver is None:
        missing.append("chromedriver (bash scripts/install-browser.sh installs chromium and chromium-driver)")
    if missing:
        reason = "headless browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this does not skip)")
        pytest.skip(reason)
    assert driver is not None
    return driver, shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    driver_path, browser_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page_file = tmp_path / "report.html"
    page_file.write_text(default_page(), encoding="utf-8")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2400"):
        options.add_argument(arg)
    if browser_path:
        options.binary_location = browser_path
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager never downloads anything
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(page_file.as_uri())
        assert driver.title == "tuneline report: banking77-intents (abc123)"
        sizes = driver.execute_script("""
            return [...document.querySelectorAll('img, svg')].map(el => {
              const r = el.getBoundingClientRect();
              return {tag: el.tagName.toLowerCase(), alt: el.getAttribute('alt'), complete: !!el.complete,
                      natural: el.tagName === 'IMG' ? el.naturalWidth : null, width: r.width, height: r.height};
            });""")
        assert len(sizes) == 5, sizes
        for s in sizes:
            assert s["width"] > 0 and s["height"] > 0, s
            if s["tag"] == "img":
                assert s["complete"] and s["natural"] > 0, s
        # nothing the page tried to load from outside it
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith('data:') && !n.startsWith('file:'))")
        assert resources == []
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] > 1000 and pixels.shape[1] > 1000
    assert len({tuple(p) for p in pixels[::17, ::17].reshape(-1, pixels.shape[2]).tolist()}) > 20  # not blank


# --- finding the run in a real MLflow store --------------------------------------------------------

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


def test_suite_round_trips_through_json() -> None:
    suite = make_suite()
    again = EvalSuite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert render(again) == default_page()  # deterministic output, same page from the stored JSON


def make_multiref_suite() -> EvalSuite:
    """A summarization suite whose 3 test items have 3, 1 and 5 references, with two flips."""
    refs = [["The Witcher 3 is a great RPG.", "A great RPG: The Witcher 3.", "The Witcher 3, from 2015."],
            ["Dirt is a driving game."],
            ["Portal 2 is fun.", "I liked Portal 2.", "Portal 2 <b>rocks</b>.", "Portal 2!", "Portal 2, a puzzle game."]]
    metrics = {"rouge_l": Estimate(0.5, 0.4, 0.6), "exact_match": Estimate(0.33, 0.0, 1.0)}
    flips = [Flip(2, "d.jsonl:3", "inform(name[Portal 2])", refs[2][0], "Bad.", "Portal 2!", "fixed",
                  "Portal 2!", 5),
             Flip(1, "d.jsonl:2", "inform(name[Dirt])", refs[1][0], "Dirt is a driving game.", "Dirt.", "broken",
                  refs[1][0], 1)]
    test = SetResult(name="test", kind="test", n=3,
                     systems=[SystemResult("base", "m", metrics, 0.1, ["x", "y", "z"]),
                              SystemResult("candidate", "m+a", metrics, 0.1, ["x", "Dirt.", "Portal 2!"])],
                     flips={"candidate_vs_base": flips}, references=[r[0] for r in refs],
                     wheres=["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"], inputs=["a", "b", "c"], item_references=refs)
    return EvalSuite(spec="viggo", task="summarization", primary="rouge_l", created="2026-12-01T10:00:00Z",
                     sets=[test])


def test_html_and_terminal_show_references_per_item_and_closest_reference() -> None:
    from rich.console import Console

    from tuneline.eval.report import render_tables

    page = render(make_multiref_suite())
    assert re.search(r"<th>items</th><td>3</td>", page)
    assert "1 / 3 / 5 (min / median / max; 9 references in all)" in page
    assert "closest reference to after" in page
    assert "all 5 references" in page and "Portal 2 &lt;b&gt;rocks&lt;/b&gt;." in page  # every one, escaped
    console = Console(record=True, width=200)
    for table in render_tables(make_multiref_suite()):
        console.print(table)
    text = " ".join(console.export_text().split())  # the title wraps
    assert "test split: 3 items, references per item 1/3/5 (min/median/max)" in text
    assert "fixed #2: 'Portal 2!'; closest of 5 references: 'Portal 2!'" in text
    assert "broken #1: 'Dirt.'; reference: 'Dirt is a driving game.'" in text


def test_generation_flips_show_how_far_each_item_moved() -> None:
    from rich.console import Console

    from tuneline.eval.report import render_tables

    suite = make_multiref_suite()
    refs = suite.sets[0].item_references
    suite.sets[0].flips = {"candidate_vs_base": [
        Flip(2, "d.jsonl:3", "inform(name[Portal 2])", refs[2][0], "Bad.", "Portal 2!", "improved", "Portal 2!", 5,
             0.8),
        Flip(1, "d.jsonl:2", "inform(name[Dirt])", refs[1][0], "Dirt is a driving game.", "Dirt.", "worsened",
             refs[1][0], 1, -0.6)]}
    page = render(suite)
    assert "candidate vs base: improved (1)" in page and "candidate vs base: worsened (1)" in page
    assert "rouge_l on the item at least 0.2 above base" in page
    assert "<th class=num>change</th>" in page and ">+0.800</td>" in page and ">-0.600</td>" in page
    console = Console(record=True, width=200)
    for table in render_tables(suite):
        console.print(table)
    text = " ".join(console.export_text().split())
    assert "candidate vs base: 1 improved, 1 worsened (by >= 0.2 rouge_l)" in text


def test_old_report_without_multireference_fields_loads_and_renders() -> None:
    d = make_suite().to_dict()
    for s in d["sets"]:
        s.pop("item_references")
        for flips in s["flips"].values():
            for f in flips:
                f.pop("closest_reference"), f.pop("n_references")
    old = EvalSuite.from_dict(json.loads(json.dumps(d)))
    assert old.sets[0].item_references == [] and old.sets[0].reference_counts() == [1] * old.sets[0].n
    assert old.sets[0].flips["candidate_vs_base"][0].n_references == 1
    assert render(old) == default_page()
