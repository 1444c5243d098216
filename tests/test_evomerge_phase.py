"""`forge evomerge` end to end on tiny models: every stage, the champion as a plain HF model
that Phase 3 accepts, lineage in the registry, the paired test report against a plain
computation, resume, and the refusals (one parent, parents that cannot merge)."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from agent_forge.evomerge.commands import _relative_gain_text, summary_rows
from agent_forge.evomerge.fitness import paired_report
from agent_forge.evomerge.phase import STAGES, STATE_FILE, EvoMergePhaseError, make_config, run_evomerge
from agent_forge.evomerge.search import Fitness
from agent_forge.models import read_meta, save_model
from agent_forge.registry import Registry

from conftest import make_tiny_model, make_tiny_tokenizer


def _family(tmp_path, n_children=2):
    """A base and children fine-tuned from it (here: different tensors nudged), as on disk."""
    tok = make_tiny_tokenizer()
    base = make_tiny_model("llama", len(tok), seed=0)
    save_model(base, tok, tmp_path / "base")
    paths = []
    for k in range(n_children):
        child = make_tiny_model("llama", len(tok), seed=0)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, p in child.named_parameters():
                if f"layers.{k % 2}." in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        save_model(child, tok, tmp_path / f"child{k}")
        paths.append(str(tmp_path / f"child{k}"))
    return str(tmp_path / "base"), paths


def _cfg(tmp_path, models, base, **kw):
    return make_config("smoke", models=tuple(models), base=base, out=str(tmp_path / "out"), tracking="disabled",
                       registry=str(tmp_path / "reg.db"), **kw)


def test_smoke_run_makes_a_champion_phase3_accepts(tmp_path):
    from transformers import AutoModelForCausalLM

    from agent_forge.handoff import validate_phase2_to_3

    base, parents = _family(tmp_path)
    report = run_evomerge(_cfg(tmp_path, parents, base))
    st = report["stages"]
    assert list(st) == [name for name, _ in STAGES]
    assert [h["generation"] for h in st["search"]["history"]] == [0, 1]
    assert st["search"]["history"][0]["n_evaluated"] == 8  # the 8 combinations
    best = st["search"]["history"][-1]["best"]
    assert best == max(st["search"]["history"][i]["best"] for i in range(2))  # elitism
    model_dir = tmp_path / "out" / "model"
    plain = AutoModelForCausalLM.from_pretrained(model_dir)  # plain transformers loads it
    assert plain.config.num_hidden_layers >= 1
    meta = read_meta(model_dir)
    assert meta["phase"] == 2 and meta["parents"] == parents
    assert meta["metrics"]["fitness"] == st["test"]["champion"]["value"]
    assert validate_phase2_to_3(model_dir).ok
    reg = Registry(tmp_path / "reg.db")
    champion = st["register"]["model_id"]
    assert [reg.get_model(i).path for i in reg.parents(champion)] == parents
    base_id = reg.find_by_path(base)  # lineage goes back to the common ancestor (phase 0)
    assert base_id and reg.get_model(base_id).phase == 0
    assert all(reg.get_model(i).parent_id == base_id for i in reg.parents(champion))
    assert reg.get_model(champion).handoff_status == "passed"
    assert (tmp_path / "out" / "fitness.png").stat().st_size > 1000


def test_resume_after_the_run_repeats_nothing(tmp_path):
    base, parents = _family(tmp_path)
    cfg = _cfg(tmp_path, parents, base)
    run_evomerge(cfg)
    first = json.loads((tmp_path / "out" / "evomerge_report.json").read_text())
    with pytest.raises(EvoMergePhaseError, match="--resume"):
        run_evomerge(cfg)
    again = run_evomerge(cfg, resume=True)
    assert json.loads(json.dumps(again["stages"])) == first["stages"]


def drop_ci_high(before: Fitness, after: Fitness) -> float:
    from agent_forge.validation.stats import relative_drop
    return relative_drop(before.details["correct"], after.details["correct"])["ci95"][1]


def test_paired_report_matches_a_plain_computation():
    before = Fitness(0.5, 0.3, 0.7, 8, {"correct": [1, 1, 0, 0, 1, 0, 1, 0]})
    after = Fitness(0.75, 0.4, 0.9, 8, {"correct": [1, 1, 1, 0, 1, 1, 1, 0]})
    r = paired_report(before, after, target_relative=0.2)
    assert r["points"] == pytest.approx(25.0)
    assert r["relative_gain"] == pytest.approx((0.75 - 0.5) / 0.5)
    assert r["ci95_points"][0] <= 25.0 <= r["ci95_points"][1]
    # McNemar: 2 discordant pairs, both for `after`: exact two-sided p = 2 * 0.5^2
    assert r["mcnemar_p"] == pytest.approx(0.5)
    assert not r["target_met"]  # +50% relative, but the interval reaches 0 on 8 items
    # the relative gain's interval is the relative drop's (tested against the delta method in
    # test_stats.py), negated and in order; the row says why the +50% point estimate is MISSED
    lo, hi = r["relative_gain_ci95"]
    assert -drop_ci_high(before, after) == pytest.approx(lo) and lo <= 0.5 <= hi
    text = _relative_gain_text(r)
    assert text.startswith(f"+50.0% [{100 * lo:+.1f}, {100 * hi:+.1f}]: MISSED (the point estimate reaches it")
    assert text.endswith("its 95% interval spans 20%")
    with pytest.raises(ValueError, match="same test items"):
        paired_report(before, Fitness(0.5, 0, 1, 2, {"correct": [1, 0]}))


def test_budget_warning_only_when_every_model_scored_left_nearly_all_unanswered():
    from agent_forge.evomerge.phase import budget_warning

    silent = Fitness(0.0, 0.0, 0.1, 4, {"no_answer_rate": 1.0, "correct": [0] * 4})
    answering = Fitness(0.5, 0.1, 0.9, 4, {"no_answer_rate": 0.25, "correct": [1, 0, 1, 0]})
    warning = budget_warning([silent, silent], 16)
    assert "100%+ of test replies gave no answer" in warning and "max_new_tokens=16" in warning
    assert budget_warning([silent, answering], 16) is None  # one model answers: the figures mean something
    assert budget_warning([Fitness(0.5, 0.3, 0.7, 8, {})], 16) is None  # the likelihood proxy: no replies
    report = {"config": {"fitness": {"loglik_weight": 0.0}}, "total_seconds": 1.0,
              "stages": {"test": {"best_parent": silent.to_dict(), "champion": silent.to_dict(),
                                  "gain": paired_report(silent, silent, 0.2), "budget_warning": warning}}}
    assert dict(summary_rows(report))["WARNING"] == warning


def test_one_parent_is_refused_and_leaves_nothing(tmp_path):
    base, parents = _family(tmp_path, n_children=1)
    with pytest.raises(EvoMergePhaseError, match="at least two"):
        run_evomerge(_cfg(tmp_path, parents, base))
    assert not (tmp_path / "out").exists()


def test_memory_plan_counts_the_weight_files_streams_or_refuses(tmp_path, monkeypatch):
    """The plan by hand from the files on disk: in memory, parents and base as stored plus
    three models' worth; streamed, the three alone. Too little memory for the first: the run
    streams the parents and makes the same champion; too little for either: one message with
    the numbers, before any weight is loaded, and no directory."""
    from agent_forge.evomerge import merge

    base, parents = _family(tmp_path)
    dirs = [*parents, base]
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("child0", "child1", "base")]
    plan = merge.memory_plan(dirs, free_bytes=10 ** 12)
    assert plan["weights_bytes"] == sizes and plan["need_bytes"] == sum(sizes) + 3 * max(sizes)
    assert plan["streamed_need_bytes"] == 3 * max(sizes) and plan["mode"] == "in memory"
    assert merge.memory_plan(dirs, free_bytes=plan["need_bytes"])["mode"] == "streamed"  # needs 90% of free at most
    none = merge.memory_plan(dirs, free_bytes=plan["streamed_need_bytes"])
    assert none["mode"] is None and "2 parents and the base" in merge.plan_problem(none, 2)

    in_memory = run_evomerge(_cfg(tmp_path, parents, base))
    monkeypatch.setattr("agent_forge.models.free_memory", lambda device: plan["need_bytes"])
    mapped, real_mapped = [], merge.mapped_state
    monkeypatch.setattr(merge, "mapped_state", lambda path: mapped.append(path) or real_mapped(path))
    streamed = run_evomerge(dataclasses.replace(_cfg(tmp_path, parents, base), out=str(tmp_path / "streamed")))
    assert streamed["stages"]["parents"]["memory"]["mode"] == "streamed" and len(mapped) == 3  # 2 parents, base
    assert streamed["stages"]["search"]["best"] == in_memory["stages"]["search"]["best"]
    assert streamed["stages"]["test"]["champion"] == in_memory["stages"]["test"]["champion"]

    monkeypatch.setattr("agent_forge.models.free_memory", lambda device: plan["streamed_need_bytes"])
    monkeypatch.setattr(merge, "load_state", lambda path: pytest.fail("weights loaded before the plan"))
    monkeypatch.setattr(merge, "mapped_state", lambda path: pytest.fail("weights mapped before the plan"))
    with pytest.raises(EvoMergePhaseError, match="would hold about .* streaming the parents .* GB is free"):
        run_evomerge(dataclasses.replace(_cfg(tmp_path, parents, base), out=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()


def test_sizes_adapt_to_parents_larger_than_the_default_model(tmp_path, monkeypatch):
    """By hand: k times the default's parameters -> 1/k of the validation items (at least
    30) and of the population (at least 4); smaller parents, or adapt_to_size off, keep the
    preset. In a run the parents stage records it and the search uses it."""
    from agent_forge.evomerge import phase

    quick = make_config("quick")
    ref = phase.REFERENCE_PARAMS
    assert phase.size_adaptation(quick, int(2 * ref)) == {"fitness.samples": [90, 45], "search.population": [8, 4]}
    assert phase.size_adaptation(quick, int(10 * ref)) == {"fitness.samples": [90, 30], "search.population": [8, 4]}
    assert phase.size_adaptation(quick, int(ref / 2)) == {}
    assert phase.size_adaptation(dataclasses.replace(quick, adapt_to_size=False), int(10 * ref)) == {}
    assert phase.adapted(quick, {"fitness.samples": [90, 45]}).fitness.samples == 45

    base, parents = _family(tmp_path)
    n_params = sum(p.numel() for p in make_tiny_model("llama", len(make_tiny_tokenizer())).parameters())
    monkeypatch.setattr(phase, "REFERENCE_PARAMS", n_params / 3)  # the tiny parents count as 3x the default
    report = run_evomerge(_cfg(tmp_path, parents, base))
    assert report["stages"]["parents"]["n_params"] == n_params
    assert report["stages"]["parents"]["adapted"] == {"search.population": [8, 4]}  # smoke's 8 items stay
    assert report["stages"]["search"]["config"]["population"] == 4
    assert dict(summary_rows(report))["sized for 0M-parameter parents"] == "search.population 8 -> 4"


def test_parents_of_different_architectures_are_refused(tmp_path):
    tok = make_tiny_tokenizer()
    save_model(make_tiny_model("llama", len(tok)), tok, tmp_path / "a")
    save_model(make_tiny_model("qwen2", len(tok)), tok, tmp_path / "b")
    with pytest.raises(EvoMergePhaseError) as err:
        run_evomerge(_cfg(tmp_path, [str(tmp_path / "a"), str(tmp_path / "b")], None))
    assert "llama" in str(err.value) and "qwen2" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_command_prints_the_table(tmp_path, monkeypatch):
    from agent_forge.cli import app

    base, parents = _family(tmp_path)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(app, ["evomerge", "--models", ",".join(parents), "--base", base,
                                   "--out", str(tmp_path / "cli"), "--preset", "smoke", "--tracking", "disabled"])
    assert res.exit_code == 0, res.output
    assert "champion (test accuracy)" in res.output and "relative gain" in res.output
    report = json.loads((tmp_path / "cli" / "evomerge_report.json").read_text())
    assert report["stages"]["handoff"]["ok"]
    assert (tmp_path / "cli" / STATE_FILE).exists()


def test_command_without_parents_says_what_to_give(tmp_path):
    from agent_forge.cli import app

    res = CliRunner().invoke(app, ["evomerge", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--models" in res.output


def test_control_for_parents_without_a_recipe_is_refused_and_leaves_nothing(tmp_path):
    base, parents = _family(tmp_path)
    cfg = dataclasses.replace(_cfg(tmp_path, parents, base), control=True)
    with pytest.raises(EvoMergePhaseError, match="not made by --make-parents"):
        run_evomerge(cfg)
    assert not (tmp_path / "out").exists()


def test_command_with_given_parents_trains_and_reports_the_control(tmp_path, monkeypatch):
    """`forge evomerge --models P1,P2 --control` on parents `make_parents` made: the control
    is trained from their recipe and the table compares the champion with it. A second run on
    the same parents reads their validation and test scores back (same values, marked)."""
    from agent_forge.cli import app
    from agent_forge.evomerge.parents import ParentsConfig, make_parents

    tok = make_tiny_tokenizer()
    save_model(make_tiny_model("llama", len(tok)), tok, tmp_path / "base")
    recipe = ParentsConfig(families=("chain_sum", "simple_equations"), records=6, steps=1, batch_size=2)
    paths = [m["path"] for m in make_parents(str(tmp_path / "base"), tmp_path / "parents", recipe)]
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(app, ["evomerge", "--models", ",".join(paths), "--base",
                                   str(tmp_path / "parents" / "base" / "model"), "--control", "--out",
                                   str(tmp_path / "cli"), "--preset", "smoke", "--tracking", "disabled"])
    assert res.exit_code == 0, res.output
    test = json.loads((tmp_path / "cli" / "evomerge_report.json").read_text())["stages"]["test"]
    assert "control" in test and "gain_vs_control" in test
    assert "champion vs control" in res.output
    control = read_meta(tmp_path / "cli" / "parents" / "control" / "model")["evomerge_parent"]
    assert control["families"] == list(recipe.families) and control["steps"] == 2
    again = CliRunner().invoke(app, ["evomerge", "--models", ",".join(paths), "--base",
                                     str(tmp_path / "parents" / "base" / "model"), "--out", str(tmp_path / "cli2"),
                                     "--preset", "smoke", "--tracking", "disabled"])
    assert again.exit_code == 0, again.output  # the same parents: their scores are read back, and say so
    first = json.loads((tmp_path / "cli" / "evomerge_report.json").read_text())["stages"]
    second = json.loads((tmp_path / "cli2" / "evomerge_report.json").read_text())["stages"]
    assert [p["details"].get("cached") for p in second["baseline"]["parents"]] == [True, True]
    assert [p["value"] for p in second["baseline"]["parents"]] == [p["value"] for p in first["baseline"]["parents"]]
    assert second["test"]["best_parent"]["details"]["correct"] == first["test"]["best_parent"]["details"]["correct"]
    assert second["test"]["best_parent"]["details"]["cached"]
    rows = dict(summary_rows(json.loads((tmp_path / "cli2" / "evomerge_report.json").read_text())))
    assert "scored by an earlier run" in rows["best parent (test accuracy)"]
    assert "scored by an earlier run" not in rows["champion (test accuracy)"]
    assert rows["memory plan"].startswith("parents in memory: about ") and "GB free" in rows["memory plan"]
