"""End to end: `streamlit run` on 127.0.0.1, loaded in Debian's headless Chromium over DevTools."""

from __future__ import annotations

import pytest

from agent_forge.dashboard.screenshot import Browser, find_chromium, serve_dashboard

from test_dashboard import make_run

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
