"""Dashboard data loading and the Streamlit page (AppTest) on a run written by the real writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_forge.dashboard import data, lineage
from agent_forge.registry import Registry
from agent_forge.tracking import Tracker

APP = str(Path(data.__file__).with_name("app.py"))


def make_run(root: Path, bake_steps: int = 12, rl_steps: int = 5, finished: bool = True) -> Path:
    """A run dir as the pipeline writes it: metrics.jsonl via Tracker, pipeline_state.json, a checkpoint."""
    from agent_forge.quietstar.pipeline import PipelineState

    run = root / "runs" / "demo"
    with Tracker(run, mode="disabled") as tr:
        for s in range(1, bake_steps + 1):
            tr.log({"loss": 3.0 / s, "grad_norm": 1.0, "lr": 1e-4, "sec_per_step": 0.1}, step=s, stage="bake")
        tr.log({"token_accuracy": 0.5, "acc_step": 0.4}, step=bake_steps, stage="bake_eval")
        for s in range(1, rl_steps + 1):
            tr.log({"reward_mean": 0.1 * s, "reward_rolling": 0.05 * s, "coherence_semantic": 0.5,
                    "coherence_syntactic": 0.6, "coherence_predictive": 0.7, "coherence_composite": 0.59,
                    "thought_length": 12.0, "kl": 0.01}, step=s, stage="rl")
    (run / "pipeline_config.json").write_text(json.dumps({"bake": {"steps": 20}, "rl": {"steps": 10}}))
    state = PipelineState(run, resume=False)
    state.record("validate_input", {"ok": True})
    state.record("step1", {"steps": bake_steps, "baking_accuracy": 0.873, "accuracy_thinking_on": 0.625,
                           "accuracy_thinking_off": 0.5,
                           "usage": {"n": 16, "token_rate": {"[thinking]": 1.0, "<step>": 0.75, "<doubt>": 0.25},
                                     "well_formed_rate": 0.5, "closed_rate": 0.75}})
    if finished:
        state.record("anti_theater", {"tests": [
            {"name": "divergence", "value": 0.41, "threshold": 0.3, "passed": True},
            {"name": "ablation", "value": 1.5, "threshold": 2.0, "passed": False}],
            "passed": False, "recommendation": "roll back", "sentence": "Ablation too small."})
        state.record("ab_test", {"baseline": {"name": "base", "per_round": [0.5, 0.25]},
                                 "candidate": {"name": "cand", "per_round": [0.75, 0.5]},
                                 "diff_points": 25.0, "diff_ci_points": [5.0, 45.0], "mcnemar": {"p": 0.03},
                                 "winner": "candidate", "sentence": "cand wins"})
        state.record("handoff", {"ok": False, "checks": [{"name": "baking_accuracy", "ok": True, "message": "fine"},
                                                         {"name": "anti_theater_passed", "ok": False,
                                                          "message": "roll back"}]})
    ckpt = run / "step1" / "checkpoints" / "step-0000008"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 8}))
    return run


def test_stage_order_matches_the_pipeline():
    from agent_forge.quietstar.pipeline import STAGES

    assert data.STAGE_ORDER == tuple(name for name, _ in STAGES)


def test_find_runs_and_progress(tmp_path):
    run = make_run(tmp_path, bake_steps=12, rl_steps=5, finished=False)
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert data.find_runs(tmp_path / "runs") == [run]
    prog = data.run_progress(run)
    assert prog["step1"] == {"step": 12, "steps": 20}  # from step1's result
    assert prog["step2"] == {"step": 5, "steps": 10}  # from the rl metrics vs the config
    assert prog["stages_done"] == ["validate_input", "step1"] and not prog["finished"]
    assert data.run_status(run) == "running"
    assert data.run_status(run, now=data.last_modified(run) + 10 * data.ACTIVE_SECONDS) == "stopped"
    assert [c["step"] for c in data.checkpoints(run)] == [8]


def test_curves_keep_the_newest_value_of_a_redone_step(tmp_path):
    records = [{"stage": "bake", "step": 1, "loss": 3.0}, {"stage": "bake", "step": 2, "loss": 2.0},
               {"stage": "bake", "step": 2, "loss": 1.5}, {"stage": "rl", "step": 1, "reward_mean": 0.2}]
    frame = data.curve(records, ("loss", "absent"), "bake")
    assert list(frame.columns) == ["loss"] and frame["loss"].tolist() == [3.0, 1.5]
    assert data.curve(records, ("loss",), "rl") is None


def test_headline_and_usage(tmp_path):
    stages = data.load_stages(make_run(tmp_path))
    h = data.headline(stages)
    assert h["baking_accuracy"] == 0.873 and h["anti_theater_passed"] is False and h["ab_winner"] == "candidate"
    assert data.token_usage(stages) == {"[thinking]": 1.0, "<step>": 0.75, "<doubt>": 0.25}
    assert data.ab_rounds(stages)["cand"].tolist() == [75.0, 50.0]
    assert h["accuracy_thinking_on"] == 0.625 and h["accuracy_source"] == "validation"
    # a rolled-back Step 2 never supplies the headline; a kept one does (its validation figure)
    stages["step2"] = {"accuracy_thinking_on": 0.3, "kept": False}
    assert data.headline(stages)["accuracy_thinking_on"] == 0.625
    stages["step2"] = {"accuracy_thinking_on": 0.7, "val_accuracy_after": 0.7, "kept": True, "model_dir": "m"}
    assert data.headline(stages)["accuracy_thinking_on"] == 0.7
    # once anti-theater has measured the final model on the test set, that is the headline
    stages["anti_theater"]["tests"][1].update(accuracy_on=0.66, accuracy_off=0.04, n=150)
    h = data.headline(stages)
    assert (h["accuracy_thinking_on"], h["accuracy_thinking_off"], h["accuracy_source"]) == (0.66, 0.04, "test")


def test_registry_readers_never_create_a_file(tmp_path):
    missing = tmp_path / "none.sqlite"
    assert data.registry_models(missing) == [] and not missing.exists()
    reg = Registry(tmp_path / "reg.sqlite")
    reg.register_model("quietstar:demo", 3, tmp_path / "m", metrics={"baking_accuracy": 0.9})
    assert [m["name"] for m in data.registry_models(reg.path)] == ["quietstar:demo"]


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    reg = Registry(tmp_path / "reg.sqlite")
    reg.register_model("quietstar:demo", 3, run / "model", metrics={"baking_accuracy": 0.873},
                       handoff_status="failed")
    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_REGISTRY", str(reg.path))
    return run


def _count(node, kind: str) -> int:
    children = getattr(node, "children", None)
    own = 1 if getattr(node, "type", None) == kind else 0
    return own + (sum(_count(c, kind) for c in children.values()) if isinstance(children, dict) else 0)


def test_app_shows_the_run(app_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value.startswith("Agent Forge")
    assert at.header[0].value == "Run: demo"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Baking accuracy"] == "87.3%" and metrics["Accuracy, thinking on"] == "62.5%"
    assert metrics["Anti-theater"] == "FAILED" and metrics["A/B winner"] == "candidate"
    assert metrics["Handoff 3→4"] == "failed"
    assert any("PASS  divergence: 0.410 (needs > 0.3)" == s.value for s in at.success)
    assert any("FAIL  ablation: 1.500 (needs > 2.0)" == e.value for e in at.error)
    progress = [p.proto.text for p in at.get("progress")]
    assert "Step 1: prompt baking: 12 / 20 steps" in progress and "Step 2: Quiet-STaR RL: 5 / 10 steps" in progress
    # loss, token accuracy, reward, coherence, thought length, accuracy/diversity/KL, usage bars, A/B bars
    assert _count(at._tree, "vega_lite_chart") == 8
    subheaders = [s.value for s in at.subheader]
    for title in ("Curves", "Thinking-token usage", "Anti-theater validation", "A/B test", "Checkpoints"):
        assert title in subheaders
    assert at.toggle[0].value is True  # the run's files are fresh, so live refresh starts on


def test_app_without_runs(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("FORGE_REGISTRY", str(tmp_path / "none.sqlite"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "No runs under" in at.info[0].value


# ---------------------------------------------------------------------------------------
# Phase 2: EvoMerge runs, written by hand in the layout agent_forge.evomerge.phase writes


def _fit(value: float, n: int = 100, kind: str = "accuracy") -> dict:
    return {"value": value, "low": value - 0.05, "high": value + 0.05, "n": n, "details": {"kind": kind}}


def _history_row(g: int, best: float, mean: float, worst: float, diversity: float) -> dict:
    return {"generation": g, "best": best, "best_key": f"k{g}", "best_low": best - 0.04, "best_high": best + 0.04,
            "gen_best": best, "mean": mean, "worst": worst, "n_invalid": 0, "diversity": diversity,
            "n_evaluated": 8 if g == 0 else 5, "cache_hits": 0 if g == 0 else 1, "seconds": 12.5,
            "keys": [f"k{g}"]}


HISTORY = [_history_row(0, 0.50, 0.42, 0.30, 0.80), _history_row(1, 0.56, 0.47, 0.35, 0.60),
           _history_row(2, 0.61, 0.52, 0.40, 0.45)]
GENOME = {"interp": "slerp", "taskvec": "ties", "layers": "frankenmerge", "weights": [0.5, 0.3, 0.2],
          "slerp_t": 0.4, "density": 0.6, "taskvec_scale": 1.1, "route": [], "label": "mutate"}


def _finish_evomerge_run(run: Path, stages: dict, paths: list[str], families: list[str], history: list,
                         search_cfg: dict, registry: Path | None) -> None:
    """The stages after the search of a finished run, its report and fitness.png."""
    correct_parent = [True] * 45 + [False] * 55
    correct_champ = [True] * 58 + [False] * 42
    stages["search"] = {"best": GENOME, "best_fitness": _fit(0.61, 90), "history": history, "evaluated": 18,
                        "config": search_cfg, "stage_seconds": 100.0}
    stages["test"] = {"best_parent": {**_fit(0.45), "details": {"kind": "accuracy", "correct": correct_parent}},
                      "champion": {**_fit(0.58), "details": {"kind": "accuracy", "correct": correct_champ}},
                      "gain": {"points": 13.0, "ci95_points": [4.0, 22.0], "mcnemar_p": 0.004, "n": 100,
                               "before": 0.45, "after": 0.58, "relative_gain": 13 / 45, "target_relative": 0.2,
                               "target_met": True},
                      "control": _fit(0.55),
                      "gain_vs_control": {"points": 3.0, "ci95_points": [-4.0, 10.0], "mcnemar_p": 0.5, "n": 100,
                                          "before": 0.55, "after": 0.58, "relative_gain": 0.05,
                                          "target_relative": 0.0, "target_met": False}}
    stages["save"] = {"model_dir": str(run / "model"), "meta": {"metrics": {"fitness": 0.58}}}
    stages["plot"] = {"path": str(run / "fitness.png")}
    if registry is not None:
        reg = Registry(registry)
        parent_ids = [reg.register_model(f"evomerge-parent:{f}", 2, p, metrics={"val_fitness": v, "role": "parent"})
                      for f, p, v in zip(families, paths, (0.40, 0.45, 0.38))]
        champ = reg.register_model("evomerge:merge", 2, run / "model", metrics={"fitness": 0.58})
        reg.add_parents(champ, parent_ids)
        stages["register"] = {"model_id": champ, "parent_ids": parent_ids, "registry": str(reg.path)}
    stages["handoff"] = {"transition": "2->3", "model": str(run / "model"), "ok": True,
                         "checks": [{"name": "loads", "ok": True, "value": None, "threshold": None,
                                     "message": "loads with transformers", "severity": "error"}]}
    from PIL import Image

    Image.new("RGB", (64, 36), (200, 220, 255)).save(run / "fitness.png")
    (run / "evomerge_report.json").write_text(json.dumps(
        {"models": [], "preset": "quick", "out": str(run), "config": {"fitness": {"loglik_weight": 1.0},
                                                                      "search": search_cfg},
         "stages": stages, "timings": {}, "total_seconds": 170.0}))


def make_evomerge_run(root: Path, finished: bool = True, registry: Path | None = None) -> Path:
    """An EvoMerge out dir: evomerge_state.json, search_state.json (cut short in the middle of
    generation 2 of 5 when not finished), metrics.jsonl; when finished also the report,
    fitness.png and (with a registry) the champion registered with its 3 parents."""
    run = root / "runs" / "merge"
    families = ["chain_sum", "basic_arithmetic", "simple_equations"]
    paths = [str(run / "parents" / f / "model") for f in families]
    for p in paths:
        Path(p).mkdir(parents=True)
    # a specialist's own Step 1 run inside the merge's folder: part of the merge, not a run of its own
    (run / "parents" / families[0] / "metrics.jsonl").write_text("")
    stages = {"parents": {"paths": paths, "base": "/models/base", "n_layers": 4, "architecture": "LlamaForCausalLM",
                          "made": [{"path": p, "cached": False, "families": [f]} for p, f in zip(paths, families)],
                          "stage_seconds": 30.0},
              "baseline": {"parents": [{"path": p, **_fit(v, 90, "trace_likelihood")}
                                       for p, v in zip(paths, (0.40, 0.45, 0.38))],
                           "best_index": 1, "best_value": 0.45, "stage_seconds": 20.0}}
    search_cfg = {"strategy": "ga", "generations": 5 if not finished else 3, "population": 6, "n_parents": 3}
    history = HISTORY[:2] if not finished else HISTORY
    cache = {f"g0-{i}": {"genome": GENOME, "fitness": _fit(0.4), "generation": 0} for i in range(8)}
    cache.update({f"g1-{i}": {"genome": GENOME, "fitness": _fit(0.5), "generation": 1} for i in range(5)})
    if not finished:
        cache.update({f"g2-{i}": {"genome": GENOME, "fitness": _fit(0.5), "generation": 2} for i in range(2)})
    (run / "search_state.json").write_text(json.dumps(
        {"version": 1, "config": search_cfg, "generation": len(history) - 1, "population": [GENOME],
         "rng": None, "cma": None, "history": history, "cache": cache}))
    with Tracker(run, mode="disabled") as tr:
        for row in history:
            tr.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, row["generation"], "search")
    if finished:
        _finish_evomerge_run(run, stages, paths, families, history, search_cfg, registry)
    (run / "evomerge_state.json").write_text(json.dumps({"stages": stages}))
    return run


def test_stage_orders_match_the_phases():
    from agent_forge.bitnet.phase import STAGES as BITNET
    from agent_forge.cognate.phase import make_config, stages as cognate_stages
    from agent_forge.evomerge.phase import STAGES as EVOMERGE

    assert data.EVOMERGE_STAGE_ORDER == tuple(name for name, _ in EVOMERGE)
    assert data.BITNET_STAGE_ORDER == tuple(name for name, _ in BITNET)
    assert data.COGNATE_STAGE_ORDER == tuple(name for name, _ in cognate_stages(make_config("quick")))


def test_evomerge_run_found_and_its_kind(tmp_path):
    merge = make_evomerge_run(tmp_path, finished=False)
    demo = make_run(tmp_path)
    ternary = tmp_path / "runs" / "ternary"
    ternary.mkdir()
    (ternary / "bitnet_state.json").write_text(json.dumps({"stages": {"validate_input": {"ok": True}}}))
    assert sorted(data.find_runs(tmp_path / "runs")) == sorted([merge, demo, ternary])  # not parents/chain_sum
    assert [data.run_kind(r) for r in (merge, demo, ternary)] == ["evomerge", "quietstar", "bitnet"]
    assert data.run_status(merge) == "running"
    prog = data.stage_progress(ternary)  # running: what ran, then the phase's other stages in order
    assert prog["stages_done"] == ["validate_input"] and prog["stages_total"] == list(data.BITNET_STAGE_ORDER)
    (ternary / "bitnet_state.json").write_text(json.dumps({"stages": {"validate_input": {}, "data": {}, "extra": {}}}))
    assert data.stage_progress(ternary)["stages_total"] == ["validate_input", "data", "extra",
                                                            *data.BITNET_STAGE_ORDER[2:]]
    (ternary / "bitnet_state.json").write_text(json.dumps({"stages": {"validate_input": {"ok": True}}}))
    assert data.bitnet_summary(ternary) == []  # no report yet
    # before its first stage has finished, an EvoMerge run training its parents is still an EvoMerge run
    early = tmp_path / "early"
    (early / "parents" / "chain_sum").mkdir(parents=True)
    (early / "metrics.jsonl").write_text("")
    assert data.run_kind(early) == "evomerge" and data.load_stages(early) == {}


def test_evomerge_live_history_and_progress(tmp_path):
    run = make_evomerge_run(tmp_path, finished=False)
    history = data.evomerge_history(run)
    assert [r["generation"] for r in history] == [0, 1]  # from search_state.json: the search is running
    prog = data.evomerge_progress(run)
    assert prog["stages_done"] == ["parents", "baseline"] and len(prog["stages_total"]) == 8
    assert (prog["generations_done"], prog["generations"]) == (2, 5)
    assert prog["current"] == {"generation": 2, "evaluated": 2, "population": 6}
    assert not prog["finished"]
    frame = data.history_frame(history)
    assert list(frame.columns) == ["best", "mean", "worst"] and frame["best"].tolist() == [0.50, 0.56]
    assert data.history_frame(history, ("diversity",))["diversity"].tolist() == [0.80, 0.60]
    parents = data.evomerge_parents(data.load_stages(run))
    assert [p["families"] for p in parents] == ["chain_sum", "basic_arithmetic", "simple_equations"]
    assert [p["best"] for p in parents] == [False, True, False]
    assert parents[1]["value"] == 0.45 and parents[1]["low"] == pytest.approx(0.40) and parents[1]["n"] == 90
    assert data.evomerge_test_rows(data.load_stages(run)) == []
    h = data.evomerge_headline(data.load_stages(run), history)
    assert h["best_val"] == 0.56 and h["best_parent_val"] == 0.45 and h["target_met"] is None
    # a half-written state file (no history yet) reads as empty, not as an error
    (run / "search_state.json").write_text('{"history": [')
    assert data.evomerge_history(run) == [] and data.evomerge_progress(run)["current"] is None
    # before the registry knows the champion, the tree is the planned one: parents -> champion
    tree = lineage.evomerge_family_tree(data.load_stages(run), None)
    assert tree["id"] is None and [p["name"] for p in tree["parents"]][0] == "chain_sum"


def test_evomerge_finished_run(tmp_path):
    reg_path = tmp_path / "reg.sqlite"
    run = make_evomerge_run(tmp_path, finished=True, registry=reg_path)
    (run / "search_state.json").write_text(json.dumps({"history": [_history_row(0, 0.1, 0.1, 0.1, 0.1)]}))
    assert len(data.evomerge_history(run)) == 3  # the stage's result wins once the search stage is done
    prog = data.evomerge_progress(run)
    assert prog["finished"] and prog["current"] is None and (prog["generations_done"], prog["generations"]) == (3, 3)
    assert data.run_status(run) == "finished" and data.fitness_plot(run) == run / "fitness.png"
    stages = data.load_stages(run)
    rows = dict(data.evomerge_test_rows(stages))
    assert rows["best parent (test accuracy)"].startswith("45.0% [40.0%, 50.0%]")
    assert rows["gain (paired, test)"].startswith("+13.0 points [+4.0, +22.0]")
    assert rows["relative gain (target >= 20%)"] == "+28.9%: met"
    assert rows["control: one model on all families (test)"].startswith("55.0%")
    stages["test"]["gain"]["target_met"] = False
    assert dict(data.evomerge_test_rows(stages))["relative gain (target >= 20%)"].endswith("MISSED")
    summary = dict(data.evomerge_summary(run))
    assert "generation 2 (validation trace likelihood)" in summary and summary["time"] == "170 s"
    h = data.evomerge_headline(data.load_stages(run), data.evomerge_history(run))
    assert (h["champion_test"], h["gain_points"], h["target_met"], h["handoff_ok"]) == (0.58, 13.0, True, True)
    assert h["relative_gain_ci"] is None  # a report from before the relative gain had an interval
    stages = data.load_stages(run)
    stages["test"]["gain"]["relative_gain_ci95"] = [0.05, 0.6]
    assert data.evomerge_headline(stages, [])["relative_gain_ci"] == [0.05, 0.6]
    assert dict(data.evomerge_test_rows(stages))["relative gain (target >= 20%)"] == \
        "+28.9% [+5.0, +60.0]: met; its 95% interval spans 20%"
    tree = lineage.evomerge_family_tree(data.load_stages(run), None)  # the registry the run recorded
    assert tree["name"] == "evomerge:merge" and len(tree["parents"]) == 3


def test_live_readers_agree_with_the_real_search_writer(tmp_path):
    """search_state.json as run_search writes it, killed in the middle of generation 2."""
    from agent_forge.evomerge.search import Fitness, SearchConfig, run_search

    run = tmp_path / "merge"
    run.mkdir()
    (run / "evomerge_state.json").write_text(json.dumps({"stages": {"parents": {"paths": ["a", "b", "c"]}}}))
    finished, in_gen2 = [], []

    def fitness(genome):
        if len(finished) == 2:  # generations 0 and 1 are done: killed after 2 evaluations of generation 2
            if len(in_gen2) == 2:
                raise KeyboardInterrupt
            in_gen2.append(genome)
        return Fitness(0.1 + 0.01 * sum(genome.weights), 0.0, 1.0, 10)

    cfg = SearchConfig(generations=5, population=4, n_parents=3, elites=1, n_remerge=1, remerge_group=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, fitness, run / "search_state.json", on_generation=finished.append)
    prog = data.evomerge_progress(run)
    assert prog["generations_done"] == 2 and prog["generations"] == 5
    assert prog["current"] == {"generation": 2, "evaluated": 2, "population": 4}
    frame = data.history_frame(data.evomerge_history(run), ("best", "mean", "worst", "diversity"))
    assert list(frame.index) == [0, 1] and list(frame.columns) == ["best", "mean", "worst", "diversity"]


def test_lineage_of_a_merge_of_three(tmp_path):
    missing = tmp_path / "none.sqlite"
    assert lineage.lineage(missing, 1) is None and not missing.exists()
    reg = Registry(tmp_path / "reg.sqlite")
    base = reg.register_model("base", 1, tmp_path / "base")
    parents = [reg.register_model(f"evomerge-parent:{f}", 2, tmp_path / f, parent_id=base,
                                  metrics={"val_fitness": v}) for f, v in (("a", 0.4), ("b", 0.45), ("c", 0.38))]
    champ = reg.register_model("evomerge:merge", 2, tmp_path / "model", metrics={"fitness": 0.58})
    reg.add_parents(champ, parents)
    child = reg.register_model("quietstar:demo", 3, tmp_path / "q", parent_id=champ)
    assert lineage.lineage(reg.path, 999) is None

    tree = lineage.lineage(reg.path, child)
    assert tree["name"] == "quietstar:demo" and [p["id"] for p in tree["parents"]] == [champ]
    merge = tree["parents"][0]
    assert [p["name"] for p in merge["parents"]] == ["evomerge-parent:a", "evomerge-parent:b", "evomerge-parent:c"]
    assert all([g["id"] for g in p["parents"]] == [base] for p in merge["parents"])
    assert lineage.lineage(reg, champ)["parents"][1]["metrics"] == {"val_fitness": 0.45}  # a Registry works too

    lines = lineage.lineage_lines(lineage.lineage(reg.path, champ))
    assert lines[0] == "- **evomerge:merge** (#%d · phase 2 · fitness 58.0%%)" % champ
    assert lines[1].startswith("  - **evomerge-parent:a**") and lines[2].startswith("    - **base**")
    assert len(lines) == 7  # champion, 3 parents, the base under each
    dot = lineage.lineage_dot(lineage.lineage(reg.path, champ))
    assert dot.startswith("digraph") and dot.count(f"m{base} [label=") == 1  # the common ancestor drawn once
    for p in parents:
        assert f"m{p} -> m{champ};" in dot and f"m{base} -> m{p};" in dot

    # a corrupt registry with a cycle does not hang the walk
    reg.add_parents(base, [champ])
    assert lineage.lineage(reg.path, champ)["parents"][0]["parents"][0]["parents"][0].get("truncated")


@pytest.fixture
def evomerge_env(tmp_path, monkeypatch):
    reg = tmp_path / "reg.sqlite"
    run = make_evomerge_run(tmp_path, finished=True, registry=reg)
    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_REGISTRY", str(reg))
    return run


def test_app_shows_an_evomerge_run(evomerge_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "Agent Forge · Phase 2 EvoMerge"
    assert at.header[0].value == "Run: merge"
    progress = [p.proto.text for p in at.get("progress")]
    assert "Stages: 8 / 8 done" in progress and "Search: 3 / 3 generations" in progress
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Best merge (validation)"] == "61.0%" and metrics["Champion (test)"] == "58.0%"
    assert metrics["Target ≥ 20%"] == "met" and metrics["Handoff 2→3"] == "passed"
    deltas = {m.label: m.proto.delta for m in at.metric}
    assert deltas["Best merge (validation)"] == "+16.0 pts vs parent"
    assert deltas["Champion (test)"] == "+13.0 pts vs parent"
    assert _count(at._tree, "vega_lite_chart") == 2  # fitness per generation, diversity
    assert _count(at._tree, "graphviz_chart") == 1 and _count(at._tree, "image") == 1
    subheaders = [s.value for s in at.subheader]
    for title in ("Search", "Parents", "Test split (paired)", "Family tree", "fitness.png", "Handoff 2→3"):
        assert title in subheaders
    assert any(s.value.startswith("Target met") for s in at.success)
    assert any("**evomerge-parent:basic_arithmetic**" in m.value for m in at.markdown)
    assert at.toggle[0].value is False  # finished: no live refresh


def test_app_shows_a_running_evomerge_search(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    make_evomerge_run(tmp_path, finished=False)
    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_REGISTRY", str(tmp_path / "none.sqlite"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    progress = [p.proto.text for p in at.get("progress")]
    assert "Stages: 2 / 8 done" in progress
    assert ("Search: 2 / 5 generations · generation 2 running: 2 new recipes evaluated (population 6; "
            "known recipes come from the cache)") in progress
    assert _count(at._tree, "vega_lite_chart") == 2 and _count(at._tree, "graphviz_chart") == 1
    assert at.toggle[0].value is True
    assert not (tmp_path / "none.sqlite").exists()


def test_app_lists_a_bitnet_run(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    run = tmp_path / "runs" / "ternary"
    run.mkdir(parents=True)
    stages = {"validate_input": {"forced": False}, "handoff": {"ok": True, "checks": []}}
    (run / "bitnet_state.json").write_text(json.dumps({"stages": stages}))
    (run / "bitnet_report.json").write_text(json.dumps({"model": "runs/demo", "out": str(run), "stages": stages,
                                                        "total_seconds": 42.0}))
    assert data.bitnet_summary(run) == [("input", "runs/demo"), ("Phase 4 handoff", "passed"), ("time", "42 s")]
    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_REGISTRY", str(tmp_path / "none.sqlite"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "Agent Forge · Phase 4 BitNet"
    assert "Stages: 2 / 2 done" in [p.proto.text for p in at.get("progress")]  # finished: what it ran
    assert [s.value for s in at.subheader][:2] == ["Summary", "Handoff"]


def test_chain_run_is_read_and_shown(tmp_path, monkeypatch):
    """A `forge run` folder: its phases in order (finished, running), the whole table from
    forge_report.json, the HTML page offered, the last model's lineage; each phase folder is
    listed as a run of its own kind."""
    from streamlit.testing.v1 import AppTest

    from agent_forge.registry import Registry

    chain = tmp_path / "runs" / "demo"
    (chain / "quietstar").mkdir(parents=True)
    (chain / "quietstar" / "pipeline_state.json").write_text(json.dumps({"stages": {"step1": {}}}))
    (chain / "bitnet").mkdir()
    (chain / "bitnet" / "bitnet_state.json").write_text(json.dumps({"stages": {"validate_input": {}}}))
    (chain / "run_state.json").write_text(json.dumps({"stages": {"quietstar": {"model": "q"}}}))
    assert data.run_kind(chain) == "chain" and data.run_status(chain) != "finished"
    assert data.chain_progress(chain) == {"phases": ["quietstar", "bitnet"], "done": ["quietstar"],
                                          "running": ["bitnet"], "finished": False}
    assert data.chain_summary(chain) == [] and data.chain_last_model_id(chain) is None
    found = data.find_runs(tmp_path / "runs")
    assert {p.name: data.run_kind(p) for p in found} == {"demo": "chain", "quietstar": "quietstar", "bitnet": "bitnet"}

    reg = Registry(tmp_path / "reg.sqlite")
    q = reg.register_model("quietstar:demo", 3, chain / "quietstar" / "model")
    b = reg.register_model("bitnet:demo", 4, chain / "bitnet" / "model", parent_id=q)
    bitnet_report = {"model": "q", "stages": {"register": {"model_id": b}}, "total_seconds": 60.0}
    (chain / "run_state.json").write_text(json.dumps({"stages": {"quietstar": {"model": "q"},
                                                                 "bitnet": {"model": "b"}}}))
    (chain / "forge_report.json").write_text(json.dumps({
        "phases": ["quietstar", "bitnet"], "total_seconds": 90.0,
        "results": {"quietstar": {"model": "q"}, "bitnet": {"model": "b"}},
        "reports": {"quietstar": {"stages": {}, "total_seconds": 30.0}, "bitnet": bitnet_report}}))
    (chain / "forge_report.html").write_text("<!doctype html><p>page</p>")
    assert data.chain_last_model_id(chain) == b
    rows = data.chain_summary(chain)
    assert rows[0] == ("[bold]quietstar[/]", "q") and rows[-1] == ("chain time", "90 s")

    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_REGISTRY", str(reg.path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "Agent Forge · forge run (phases in order)"
    assert "Phases: 2 / 2 done" in [p.proto.text for p in at.get("progress")]
    assert [s.value for s in at.subheader] == ["Summary", "Lineage of the last model"]
    assert any("bitnet:demo" in m.value and "quietstar:demo" in m.value for m in at.markdown)
