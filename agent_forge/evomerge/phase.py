"""`forge evomerge`: Phase 2 end to end, from several parents to a measured champion.

    parents -> baseline -> search -> test -> save -> plot -> register -> handoff

Each stage's result goes to `out/evomerge_state.json` when it finishes; the search itself
writes its state after every generation, so `--resume` after a kill continues from the
last finished generation, and no recipe is evaluated twice (the fitness cache). The search
selects on the validation split; the champion and the best parent (best on validation)
are then measured on the test split, question by question, and the gain is paired.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent_forge.config import preset_config
from agent_forge.evomerge.fitness import Fitness, FitnessConfig
from agent_forge.evomerge.parents import ParentsConfig
from agent_forge.evomerge.search import SearchConfig
from agent_forge.stages import PhaseContext, run_phase, stage_runner, timings

STATE_FILE = "evomerge_state.json"
REPORT_FILE = "evomerge_report.json"
SEARCH_FILE = "search_state.json"


@dataclass
class EvoMergeConfig:
    """Everything `forge evomerge` does; presets below, YAML overrides any field."""

    models: tuple[str, ...] = ()
    """Parent models (HF dirs or hub ids) of one architecture and tokenizer; empty with
    make_parents = True: specialists of `base` are trained first."""
    base: str | None = None
    """Common ancestor of the parents (TIES/DARE task vectors are taken against it); with
    make_parents it is the model the specialists are fine-tuned from."""
    make_parents: bool = False
    out: str = "runs/evomerge"
    preset: str = "quick"
    device: str | None = None
    parents: ParentsConfig = field(default_factory=ParentsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    control: bool = False
    """Also train one model on all the parents' families with their summed budget, and
    measure it on the test split beside the champion: is merging better than that?"""
    adapt_to_size: bool = True
    """Scale the validation items and the population down for parents larger than the
    default model the presets are sized for (a candidate's cost grows with the parameter
    count), so a preset keeps its time; False keeps the sizes as given."""
    target_relative_gain: float = 0.20
    """The design's bar: the champion beats the best parent by this fraction on the test split."""
    tracking: str = "offline"
    registry: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # seconds on tiny models: proves every stage runs.
    "smoke": {"search": {"generations": 2, "population": 8},
              "fitness": {"samples": 8, "test_samples": 12, "max_new_tokens": 16},
              "parents": {"records": 24, "steps": 2, "batch_size": 2}},
    # <= 15 minutes on a 2-core CPU from the default model once the parents are cached
    # (with their validation and test scores: fitness.measure_dir). Selection by the
    # trace-likelihood proxy (no generation: ~20 s a candidate, 8-18 s more to merge);
    # generation 0 and one GA generation, 14 candidates. The champion and the best parent
    # are then scored by accuracy on the test split (2.5-4.5 minutes a model).
    # Parents: 40 steps each (~5 minutes apiece on 2 cores), built once and then reused.
    "quick": {"search": {"generations": 2, "population": 8},
              "fitness": {"samples": 90, "test_samples": 300, "max_new_tokens": 128, "loglik_weight": 1.0},
              "parents": {"records": 320, "steps": 40}},
    # a GPU's hours: the design's 50 generations.
    "standard": {"search": {"generations": 50, "population": 16},
                 "fitness": {"samples": 200, "test_samples": 1000},
                 "parents": {"records": 4000, "steps": 600}},
}


def make_config(preset: str = "quick", yaml_path: str | Path | None = None, **overrides) -> EvoMergeConfig:
    return preset_config(EvoMergeConfig(preset=preset), PRESETS, preset, yaml_path, overrides, "evomerge config")


class EvoMergePhaseError(RuntimeError):
    """A stage found a problem the user must fix; the message says what."""


Context = PhaseContext  # the stages of this phase take one (agent_forge/stages.py)


# ---------------------------------------------------------------------------------------
# Shared pieces, built once per process


def parent_set(ctx: Context, rec: dict | None = None):
    """The checked parents (weights loaded once per process); `rec` is the parents stage's
    result, read from the state when not given."""
    if "parents" not in ctx.cache:
        from agent_forge.evomerge.merge import check_parents

        rec = rec or ctx.state.result("parents")
        ctx.cache["parents"] = check_parents(rec["paths"], base=rec.get("base"))
        ctx.cache["parents"].stream = rec.get("memory", {}).get("mode") == "streamed"
    return ctx.cache["parents"]


def champion_state(ctx: Context) -> dict:
    """The champion's merged weights, merged once for the test and save stages."""
    if "champion" not in ctx.cache:
        from agent_forge.evomerge.genome import Genome
        from agent_forge.evomerge.merge import merge_state_dicts

        ps = parent_set(ctx)
        genome = Genome.from_dict(ctx.state.result("search")["best"])
        ctx.cache["champion"] = merge_state_dicts(genome, ps.states(), ps.base_state())
    return ctx.cache["champion"]


def items(ctx: Context, split: str):
    from agent_forge.evomerge.fitness import load_items

    if split not in ctx.cache:
        f = ctx.cfg.fitness
        ctx.cache[split] = load_items(f.val_set, f.samples) if split == "val" else load_items(f.test_set,
                                                                                             f.test_samples)
    return ctx.cache[split]


def _load(path: str):
    from agent_forge.models import load_model

    model, tok = load_model(path)
    return model.eval(), tok


def measure_path(ctx: Context, path: str, split: str) -> Fitness:
    from agent_forge.evomerge.fitness import accuracy_only, measure_dir

    cfg = ctx.cfg.fitness if split == "val" else accuracy_only(ctx.cfg.fitness)
    return measure_dir(path, items(ctx, split), cfg, _load)


# ---------------------------------------------------------------------------------------
# The stages


def stage_parents(ctx: Context) -> dict:
    """The parents: given, or specialists of `base` trained here (cached by their settings);
    then the checks that the search fits in memory (merge.memory_plan) and that they can
    merge (architecture, tokenizer), before the control is trained or any weight is loaded."""
    from agent_forge.evomerge.parents import make_control, make_parents, train_control

    cfg, out, recipe = ctx.cfg, {}, None
    if cfg.make_parents:
        base = cfg.base or "default"
        made = make_parents(base, ctx.out / "parents", cfg.parents, progress=ctx.progress)
        out = {"paths": [m["path"] for m in made], "made": made, "base": str(ctx.out / "parents" / "base" / "model"),
               "input": _resolved(base)}
        if cfg.control:
            out["control"] = make_control(base, ctx.out / "parents", cfg.parents, progress=ctx.progress)
    else:
        if len(cfg.models) < 2:
            raise EvoMergePhaseError("a merge needs at least two --models (or --make-parents)")
        out = {"paths": list(cfg.models), "base": cfg.base}
        recipe = _recipe(cfg.models) if cfg.control else None  # refused before any work
    out["memory"] = _memory_plan(out)
    ps = parent_set(ctx, out)
    if recipe:
        out["control"] = train_control(*recipe, ctx.out / "parents", progress=ctx.progress)
    n_params = _parameter_count(ps.paths[0])
    changes = size_adaptation(cfg, n_params)
    ctx.cfg = adapted(cfg, changes)
    return {**out, "n_layers": ps.n_layers, "architecture": ps.architecture, "n_params": n_params,
            "adapted": changes}


def _parameter_count(path) -> int:
    from agent_forge.evomerge.merge import meta_model

    return sum(p.numel() for p in meta_model(path).parameters())


REFERENCE_PARAMS = 135e6
"""The default model's parameter count: what the presets' sizes are set for."""


def size_adaptation(cfg: EvoMergeConfig, n_params: int) -> dict:
    """{field: [preset value, adapted value]} for parents of `n_params` parameters: a model
    k times the default's gets 1/k of the validation items (at least 30) and of the
    population (at least 4). The test split is never shrunk: it carries the reported gain."""
    ratio = REFERENCE_PARAMS / max(1, n_params)
    if not cfg.adapt_to_size or ratio >= 1:
        return {}
    changes = {"fitness.samples": [cfg.fitness.samples, max(30, int(cfg.fitness.samples * ratio))],
               "search.population": [cfg.search.population, max(4, int(cfg.search.population * ratio))]}
    return {k: v for k, v in changes.items() if v[1] < v[0]}


def adapted(cfg: EvoMergeConfig, changes: dict) -> EvoMergeConfig:
    """`cfg` with the recorded adaptation applied (the parents stage records it, so a
    resumed run searches with the same sizes)."""
    out = cfg
    for name, (_, value) in changes.items():
        section, key = name.split(".")
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **{key: value})})
    return out


def _memory_plan(parents: dict) -> dict:
    """The search's memory plan (parents held in memory, or streamed from their files when
    they do not fit together; `parent_set` reads which), or the phase's error before any
    weight is loaded."""
    from agent_forge.evomerge.merge import memory_plan, plan_problem

    dirs = list(parents["paths"]) + ([parents["base"]] if parents.get("base") else [])
    plan = memory_plan(dirs)
    problem = plan_problem(plan, len(parents["paths"]))
    if problem:
        raise EvoMergePhaseError(problem)
    return plan


def _recipe(models):
    """The given parents' recipe for the control, or the phase's error saying why there is none."""
    from agent_forge.evomerge.parents import recipe_of

    try:
        return recipe_of(models)
    except ValueError as e:
        raise EvoMergePhaseError(str(e)) from None


def _resolved(spec: str) -> str:
    """The default model's local directory (the merge reads weights from disk)."""
    from agent_forge.models import default_model_dir

    return str(default_model_dir()) if spec == "default" else spec


def stage_baseline(ctx: Context) -> dict:
    """Every parent on the validation split: the bar a merge has to clear."""
    rows = [{"path": p, **measure_path(ctx, p, "val").to_dict()} for p in ctx.state.result("parents")["paths"]]
    best = max(range(len(rows)), key=lambda i: rows[i]["value"])
    return {"parents": rows, "best_index": best, "best_value": rows[best]["value"]}


def stage_search(ctx: Context) -> dict:
    """The evolutionary search over recipes, fitness on the validation split."""
    from agent_forge.evomerge.fitness import measure
    from agent_forge.evomerge.merge import merge_to_model
    from agent_forge.evomerge.search import run_search

    ps = parent_set(ctx)
    scfg = dataclasses.replace(ctx.cfg.search, n_parents=len(ps.paths), n_layers=ps.n_layers)

    def fitness(genome) -> Fitness:
        model = merge_to_model(genome, ps)
        return measure(model, ps.tokenizer, items(ctx, "val"), ctx.cfg.fitness)

    def on_generation(row: dict) -> None:
        ctx.tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, row["generation"], "search")
        if ctx.progress is not None:
            ctx.progress(row["generation"] + 1, scfg.generations, row)

    result = run_search(scfg, fitness, ctx.out / SEARCH_FILE, on_generation=on_generation)
    return {"best": result.best.to_dict(), "best_fitness": result.best_fitness.to_dict(),
            "history": result.history, "evaluated": len(result.evaluated), "config": dataclasses.asdict(scfg)}


def stage_test(ctx: Context) -> dict:
    """Champion and best parent (chosen on validation) on the test split, paired; the
    control (one model on all families) beside them when it was trained."""
    from agent_forge.evomerge.fitness import accuracy_only, measure, paired_report
    from agent_forge.evomerge.genome import Genome
    from agent_forge.evomerge.merge import build_model, merged_config

    parents, baseline = ctx.state.result("parents"), ctx.state.result("baseline")
    best_parent = measure_path(ctx, parents["paths"][baseline["best_index"]], "test")
    ps = parent_set(ctx)
    genome = Genome.from_dict(ctx.state.result("search")["best"])
    model = build_model(champion_state(ctx), merged_config(ps, genome))
    champion = measure(model, ps.tokenizer, items(ctx, "test"), accuracy_only(ctx.cfg.fitness))
    out = {"best_parent": best_parent.to_dict(), "champion": champion.to_dict(),
           "gain": paired_report(best_parent, champion, ctx.cfg.target_relative_gain),
           "budget_warning": budget_warning([best_parent, champion], ctx.cfg.fitness.max_new_tokens)}
    if parents.get("control"):
        control = measure_path(ctx, parents["control"]["path"], "test")
        out["control"] = control.to_dict()
        out["gain_vs_control"] = paired_report(control, champion, 0.0)
    return out


def budget_warning(scored: list, max_new_tokens: int, at_least: float = 0.9) -> str | None:
    """A sentence when nearly every test reply of every model scored gave no answer: the
    budget ended the thinking first (the smoke preset's 16 tokens on a real thinking model),
    so the accuracies measure the budget, not the merge."""
    rates = [f.details.get("no_answer_rate") for f in scored]
    if not rates or any(r is None or r < at_least for r in rates):
        return None
    return (f"{100 * min(rates):.0f}%+ of test replies gave no answer within fitness.max_new_tokens="
            f"{max_new_tokens}: too few tokens for these models to finish thinking, so the accuracies say "
            "nothing about the merge (smoke is for tiny models; use --preset quick or raise max_new_tokens)")


def stage_save(ctx: Context) -> dict:
    """The champion as a plain HF directory; forge_meta.json carries what Phase 3 reads."""
    from agent_forge.evomerge.genome import Genome
    from agent_forge.evomerge.merge import save_merged

    ps, test = parent_set(ctx), ctx.state.result("test")
    genome = Genome.from_dict(ctx.state.result("search")["best"])
    gain = test["gain"]
    meta = {"metrics": {"fitness": test["champion"]["value"], "fitness_ci95": [test["champion"]["low"],
                                                                              test["champion"]["high"]],
                        "best_parent_fitness": test["best_parent"]["value"],
                        "fitness_gain": gain["relative_gain"], "gain_points": gain["points"],
                        "gain_ci95_points": gain["ci95_points"], "target_met": gain["target_met"],
                        "test_set": ctx.cfg.fitness.test_set, "n": test["champion"]["n"]}}
    dst = ctx.out / "model"
    save_merged(champion_state(ctx), ps, dst, genome, meta)
    return {"model_dir": str(dst), "meta": meta}


def stage_plot(ctx: Context) -> dict:
    """fitness.png: best, mean and worst validation fitness per generation, diversity beside."""
    from agent_forge.evomerge.report import plot_history

    path = ctx.out / "fitness.png"
    plot_history(ctx.state.result("search")["history"], ctx.state.result("baseline")["best_value"], path)
    return {"path": str(path)}


def stage_register(ctx: Context) -> dict:
    """A row per parent (reused when the registry has it) and the champion, with lineage."""
    from agent_forge.registry import Registry

    reg = Registry(ctx.cfg.registry)
    base, source = ctx.state.result("parents").get("base"), ctx.state.result("parents").get("input")
    name = f"input:{Path(source).name}" if source else f"input:{Path(base).name}" if base else ""
    base_id = (reg.find_by_path(base) or reg.register_model(name, 0, base)) \
        if base and Path(base).is_dir() else None  # phase 0: a model no phase made
    parent_ids = []
    for row in ctx.state.result("baseline")["parents"]:
        parent_ids.append(reg.find_by_path(row["path"]) or reg.register_model(
            f"evomerge-parent:{Path(row['path']).parent.name}", 2, row["path"], parent_id=base_id,
            metrics={"val_fitness": row["value"], "role": "parent"}))
    champion = reg.register_model(f"evomerge:{ctx.out.name}", 2, ctx.out / "model",
                                  metrics=ctx.state.result("save")["meta"]["metrics"])
    reg.add_parents(champion, parent_ids)
    return {"model_id": champion, "parent_ids": parent_ids, "registry": str(reg.path)}


def stage_handoff(ctx: Context) -> dict:
    from agent_forge.handoff import validate_phase2_to_3
    from agent_forge.registry import Registry

    result = validate_phase2_to_3(ctx.out / "model")
    Registry(ctx.cfg.registry).update_handoff(ctx.state.result("register")["model_id"],
                                              "passed" if result.ok else "failed", result.to_dict())
    return result.to_dict()


STAGES = [("parents", stage_parents), ("baseline", stage_baseline), ("search", stage_search),
          ("test", stage_test), ("save", stage_save), ("plot", stage_plot), ("register", stage_register),
          ("handoff", stage_handoff)]


# ---------------------------------------------------------------------------------------
# Running


def run_evomerge(cfg: EvoMergeConfig, resume: bool = False, on_stage: Callable | None = None,
                 progress: Callable | None = None) -> dict:
    """Run (or resume) every stage; returns the report also written to out/evomerge_report.json."""
    out = Path(cfg.out)

    def context(st, tr) -> Context:  # a resumed run searches with the sizes its parents stage chose
        return Context(adapted(cfg, st.result("parents").get("adapted", {})), out, st, tr, progress, resume)

    state = run_phase(STAGES, out, STATE_FILE, resume, context,
                      EvoMergePhaseError, cfg.tracking, cfg.to_dict(), on_stage,
                      stage_runner(EvoMergePhaseError, _user_errors()))
    per_stage, total = timings(state)
    report = {"models": list(cfg.models), "preset": cfg.preset, "out": cfg.out, "config": cfg.to_dict(),
              "stages": state.data["stages"], "timings": per_stage, "total_seconds": total}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can act on (a merge that cannot be made, a model that does not load)."""
    from agent_forge.evomerge.merge import MergeError
    from agent_forge.models import ModelLoadError

    return MergeError, ModelLoadError
