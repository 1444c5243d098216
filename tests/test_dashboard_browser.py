"""End to end: `streamlit run` on 127.0.0.1, loaded in Debian's headless Chromium over DevTools."""

from __future__ import annotations

import json
import time

import pytest

from agent_forge.dashboard.screenshot import Browser, find_chromium, serve_dashboard

from test_dashboard import make_evomerge_run, make_run

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium not installed (Debian: apt-get install -y chromium)")


def test_served_dashboard_renders_in_chromium(tmp_path):
    make_run(tmp_path)
    with serve_dashboard(tmp_path / "runs", tmp_path / "reg.sqlite") as url:
        assert url.startswith("http://127.0.0.1:")
        with Browser(width=1200, height=900) as browser:
            text = browser.open(url, wait_for="Handoff", timeout=90)
            shot = browser.screenshot(tmp_path / "shot.png")
    for expected in ("Agent Forge", "Run: demo", "87.3%", "FAIL", "Step 1: prompt baking: 12 / 20 steps"):
        assert expected in text
    from PIL import Image  # a Streamlit dependency

    with Image.open(shot) as image:
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width == 1200 and height > 900  # grown to the page's full height
    assert len(colours) > 50  # not blank: text, charts, boxes


CHARTS_JS = """JSON.stringify({
  vega: document.querySelectorAll('[data-testid="stVegaLiteChart"] canvas, '
                                  + '[data-testid="stVegaLiteChart"] svg.marks').length,
  nodes: Array.from(document.querySelectorAll('[data-testid="stGraphVizChart"] svg g.node')).map(n => n.textContent),
  edges: document.querySelectorAll('[data-testid="stGraphVizChart"] svg g.edge').length,
  images: Array.from(document.querySelectorAll('[data-testid="stImage"] img')).map(i => i.naturalWidth)})"""


def test_evomerge_run_renders_in_chromium(tmp_path):
    """The EvoMerge page: its fitness chart drawn, and the champion's family tree from the registry."""
    make_evomerge_run(tmp_path, finished=True, registry=tmp_path / "reg.sqlite")
    with serve_dashboard(tmp_path / "runs", tmp_path / "reg.sqlite") as url:
        with Browser(width=1400, height=900) as browser:
            text = browser.open(url, wait_for="Summary (as", timeout=90)
            drawn = json.loads(browser.evaluate(CHARTS_JS))
            for _ in range(20):  # graphviz lays out in the browser (wasm) after the text is shown
                if drawn["nodes"] and drawn["vega"] >= 2:
                    break
                time.sleep(0.5)
                drawn = json.loads(browser.evaluate(CHARTS_JS))
    for expected in ("Agent Forge · Phase 2 EvoMerge", "Run: merge", "Stages: 8 / 8 done", "Search: 3 / 3 generations",
                     "Validation fitness per generation", "Family tree", "Target met", "45.0%", "58.0%"):
        assert expected in text
    assert drawn["vega"] >= 2  # fitness per generation and diversity, drawn
    assert len(drawn["nodes"]) == 4 and drawn["edges"] == 3  # 3 parents -> champion
    assert any("evomerge:merge" in n for n in drawn["nodes"])
    assert any("evomerge-parent:basic_arithmetic" in n for n in drawn["nodes"])
    assert drawn["images"] == [64]  # fitness.png loaded


def test_cognate_run_renders_in_chromium(tmp_path, monkeypatch):
    """The Cognate page on a run the smoke preset writes: every stage done, both per-model
    charts drawn, the summary."""
    from conftest import make_tiny_tokenizer

    from agent_forge.cognate.phase import make_config, run_cognate

    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "forge_home"))
    make_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    report = run_cognate(make_config("smoke", out=str(tmp_path / "runs" / "cog"), tokenizer=str(tmp_path / "tok"),
                                     tracking="disabled", registry=str(tmp_path / "reg.sqlite")))
    n = len(report["stages"])
    with serve_dashboard(tmp_path / "runs", tmp_path / "reg.sqlite") as url:
        with Browser(width=1400, height=900) as browser:
            text = browser.open(url, wait_for="Summary", timeout=90)  # tables draw on a canvas: no text
            drawn = json.loads(browser.evaluate(CHARTS_JS))
            for _ in range(20):
                if drawn["vega"] >= 2:
                    break
                time.sleep(0.5)
                drawn = json.loads(browser.evaluate(CHARTS_JS))
    for expected in ("Agent Forge · Phase 1 Cognate", "Run: cog", f"Stages: {n} / {n} done",
                     "Training loss (LM + ponder), per model", "Mean halting steps, per model"):
        assert expected in text
    assert drawn["vega"] >= 2  # the loss and halting charts, drawn
