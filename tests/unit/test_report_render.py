"""`tuneline report`: the page's content, its sections' edge cases, and the page in headless
Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from report_samples import default_page, make_multiref_suite, make_suite, render

from tuneline.eval.results import Estimate, EvalSuite, Flip, SetResult, SystemResult
from tuneline.report import render_html


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


def test_render_html_tolerates_a_minimal_suite() -> None:
    suite = EvalSuite(spec="s", task="instruction", primary="rouge_l", created="now", sets=[SetResult(
        name="test", kind="test", n=3, systems=[SystemResult("candidate", "m", {"rouge_l": Estimate(0.4)}, 0.1)])])
    page = render_html(suite, title="t", spec_text=None, dataset={"id": "ds-x"}, loss_curves={}, run_info={})
    assert "NO GATES" in page and "No loss history" in page and "0.400" in page and "ds-x" in page


def test_suite_round_trips_through_json() -> None:
    suite = make_suite()
    again = EvalSuite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert render(again) == default_page()  # deterministic output, same page from the stored JSON


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
