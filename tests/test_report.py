"""The printed summary: test-set headline numbers come from the stages that measured them."""

from agent_forge.report import carried_stage, carried_val_accuracy, headline, summary_rows


def _report():
    ablation = {"name": "ablation", "value": 60.0, "threshold": 2.0, "passed": True, "n": 150, "p": 1e-20,
                "accuracy_on": 0.64, "ci95_on": [0.56, 0.71], "accuracy_off": 0.03, "ci95_off": [0.01, 0.07]}
    ab = {"rounds": 2, "baseline": {"per_round": [0.16, 0.20]}, "candidate": {"per_round": [0.64, 0.50]},
          "diff_points": 39.0, "diff_ci_points": [33.0, 45.0], "mcnemar": {"p": 2e-25}, "winner": "candidate",
          "per_round_diff": [{"round": 0, "points": 48.0, "ci95_points": [40.0, 56.0], "mcnemar_p": 3e-20},
                             {"round": 1, "points": 30.0, "ci95_points": [21.0, 39.0], "mcnemar_p": 1e-8}]}
    return {"stages": {"anti_theater": {"passed": True, "tests": [ablation]}, "ab_test": ab},
            "total_seconds": 1230}


def test_headline_reads_the_greedy_round_and_the_ablation():
    h = headline(_report())
    assert (h["accuracy_on"], h["accuracy_off"], h["n"]) == (0.64, 0.03, 150)
    assert (h["input_accuracy_greedy"], h["candidate_accuracy_greedy"]) == (0.16, 0.64)
    assert (h["greedy_gain_points"], h["greedy_gain_ci_points"], h["greedy_gain_p"]) == (48.0, [40.0, 56.0], 3e-20)
    assert headline({"stages": {}})["greedy_gain_points"] is None  # nothing measured, nothing claimed


def test_summary_rows_show_both_ab_views_and_the_time():
    rows = dict(summary_rows(_report()))
    assert rows["TEST thinking model - input (greedy)"] == "+48.0 points [+40.0, +56.0], p=3e-20"
    assert rows["A/B: thinking model - input (2 rounds, per question)"].startswith("+39.0 points [+33.0, +45.0]")
    assert rows["TEST accuracy, thinking on (n=150)"] == "64.0% [56.0, 71.0]"
    assert rows["total time"] == "20.5 min"


def test_the_carried_model_is_the_newest_kept_one():
    step1 = {"accuracy_thinking_on": 0.49}
    kept2 = {"accuracy_thinking_on": 0.51, "val_accuracy_after": 0.51, "kept": True, "model_dir": "s2"}
    dropped_tb = {"val_accuracy_after": 0.44, "kept": False, "rolled_back_model_dir": "tb"}
    assert carried_stage({"step1": step1}) == "step1" and carried_val_accuracy({"step1": step1}) == 0.49
    stages = {"step1": step1, "step2": kept2, "trace_baking": dropped_tb}
    assert carried_stage(stages) == "step2" and carried_val_accuracy(stages) == 0.51
    stages["trace_baking"] = {"val_accuracy_after": 0.55, "kept": True, "model_dir": "tb"}
    assert carried_stage(stages) == "trace_baking" and carried_val_accuracy(stages) == 0.55
    skipped = {"status": "skipped"}  # no model: never carried
    assert carried_stage({"step1": step1, "step2": skipped}) == "step1"


def test_a_skipped_step_2_says_so_and_why():
    rows = dict(summary_rows({"stages": {"step2": {"status": "skipped", "note": "rl_enabled is false; run forge rl"}}}))
    assert rows["Step 2 (Quiet-STaR RL)"] == "skipped: rl_enabled is false; run forge rl"
    assert "val: Step 2 accuracy, thinking on" not in rows


def test_print_rows_shows_text_and_paths_relative_to_here(tmp_path, monkeypatch):
    """Values are text, not rich markup; a path under the working directory prints relative
    (the chain stores absolute ones); any other path prints whole."""
    from rich.console import Console

    from agent_forge.progress import print_rows

    monkeypatch.chdir(tmp_path)
    console = Console(record=True, width=200)
    print_rows(console, "t", [("hint", "pip install '.[llamacpp]'"), ("model", f"{tmp_path}/runs/demo/model"),
                              ("elsewhere", "/opt/models/x")])
    text = console.export_text()
    assert "'.[llamacpp]'" in text and " runs/demo/model " in text and str(tmp_path) not in text
    assert "/opt/models/x" in text
