"""The chain's one-page HTML report: which figures it picks from the phase reports, and a
page that embeds its plots and needs nothing beside it."""

import base64
import json

from agent_forge.html_report import accuracy_points, write_html_report


def _reports():
    ablation = {"name": "ablation", "n": 100, "accuracy_on": 0.6, "ci95_on": [0.5, 0.69],
                "accuracy_off": 0.02, "ci95_off": [0.005, 0.07], "p": 1e-9}
    return {
        "quietstar": {"stages": {"anti_theater": {"tests": [ablation]},
                                 "fresh_split": {"accuracy_on": 0.4, "ci95_on": [0.32, 0.48], "n": 144}}},
        "bitnet": {"stages": {"before": {"accuracy_on": 0.59, "ci95_on": [0.49, 0.68]},
                              "after": {"accuracy_on": 0.1, "ci95_on": [0.05, 0.17], "accuracy_off": 0.0,
                                        "ci95_off": [0.0, 0.04]}}},
        "evomerge": {"stages": {"test": {"best_parent": {"value": 0.15, "low": 0.11, "high": 0.2, "n": 300},
                                         "champion": {"value": 0.147, "low": 0.111, "high": 0.191, "n": 300}},
                                "search": {"history": [{"generation": 0, "best": 0.6, "mean": 0.5, "worst": 0.4},
                                                       {"generation": 1, "best": 0.62, "mean": 0.55,
                                                        "worst": 0.5}]},
                                "baseline": {"best_value": 0.51}}},
    }


def test_accuracy_points_read_every_phase_with_its_interval():
    points = {label: (acc, ci) for label, acc, ci in accuracy_points(_reports())}
    assert points["Quiet-STaR: test, thinking on"] == (0.6, [0.5, 0.69])
    assert points["Quiet-STaR: test, thinking off"] == (0.02, [0.005, 0.07])
    assert points["Quiet-STaR: fresh, thinking on"] == (0.4, [0.32, 0.48])
    assert points["BitNet: ternary, thinking on"] == (0.1, [0.05, 0.17])
    assert points["EvoMerge: champion (test)"] == (0.147, [0.111, 0.191])
    assert len(points) == 8
    # a phase that measured nothing contributes nothing (no made-up zeros)
    assert accuracy_points({"bitnet": {"stages": {}}}) == []


def test_html_page_embeds_table_and_plots(tmp_path, monkeypatch):
    run = tmp_path / "chain"
    (run / "bitnet").mkdir(parents=True)
    (run / "evomerge").mkdir()
    (run / "evomerge" / "fitness.png").write_bytes(b"written by the plot stage")
    with open(run / "bitnet" / "metrics.jsonl", "w") as f:
        for step in range(5):
            f.write(json.dumps({"stage": "bitnet_qat", "step": step, "loss": 5.0 - step}) + "\n")
    report = {"phases": ["evomerge", "quietstar", "bitnet"], "total_seconds": 90, "reports": _reports(),
              "results": {p: {"model": f"{run}/{p}/model"} for p in ("evomerge", "quietstar", "bitnet")}}
    import agent_forge.chain as chain

    monkeypatch.setattr(chain, "chain_rows", lambda r: [("[bold]bitnet[/]", "m"), ("  size <on disk>", "84 MB")])
    page = write_html_report(run, report).read_text()
    assert page.count("<img") == 3  # accuracy bars, loss curve, fitness per generation
    assert "size &lt;on disk&gt;" in page and "[bold]" not in page  # markup stripped, text escaped
    assert page.startswith("<!doctype html>") and "src=\"data:image/png;base64," in page
    assert base64.b64encode(b"written by the plot stage").decode() in page  # the phase's own PNG, not redrawn
