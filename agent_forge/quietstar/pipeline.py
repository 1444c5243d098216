"""`forge bake-quietstar`: one command from a Phase 2 champion to a validated reasoning model.

Stages run in order and each writes its result into `out/pipeline_state.json` as soon as it
finishes, so `--resume` after a kill continues from the first unfinished stage (and a
training stage from its last checkpoint). Nothing already done is redone.

    validate_input -> vocab -> data -> step1 -> step2 -> trace_baking -> anti_theater
        -> ab_test -> save -> register -> handoff

Settings and presets: pipeline_config.py; the measuring stages (anti-theater, A/B, fresh
split, general tasks): pipeline_checks.py.

Trace baking comes before the checks (the issue lists it after A/B) so that the model we
save is exactly the model anti-theater and A/B measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from agent_forge.quietstar.bake import Baker
from agent_forge.quietstar.pipeline_checks import (GREEDY_ON_FILE, Context, anti_theater_thresholds,
                                                   current_model_dir, greedy_on_key, stage_ab_test,
                                                   stage_anti_theater, stage_fresh_split, stage_general)
# The settings live in pipeline_config.py; importers of the pipeline get them from here too.
from agent_forge.quietstar.pipeline_config import PRESETS, DataConfig, PipelineConfig, make_config  # noqa: F401
from agent_forge.stages import StageState, resume_refusal, run_stages, timings

STATE_FILE = "pipeline_state.json"
REPORT_FILE = "forge_report.json"
CONFIG_FILE = "pipeline_config.json"  # written at the start, so a watcher knows the totals


# ---------------------------------------------------------------------------------------
# State that survives a kill


PipelineState = StageState  # the name the job API and the dashboard use


# ---------------------------------------------------------------------------------------
# The stages, in order. Each takes the context and returns a JSON-able result.


def stage_validate_input(ctx: Context) -> dict:
    from agent_forge.handoff import validate_phase2_to_3

    result = validate_phase2_to_3(ctx.cfg.model, ctx.cfg.min_fitness_gain)
    if not result.ok:
        from agent_forge.handoff import format_result

        raise PipelineError(f"input model failed the Phase 2 -> 3 handoff:\n{format_result(result)}")
    return result.to_dict()


def stage_vocab(ctx: Context) -> dict:
    """Measure the thinking vocabulary on the input model (added for real in Step 1)."""
    from agent_forge.models import load_model, measure_model
    from agent_forge.vocab import add_thinking_tokens

    from agent_forge.preflight import check

    model, tok = load_model(ctx.cfg.model, device="cpu")
    size = measure_model(model, ctx.cfg.device)
    preflight = check(ctx.out, disk_plan(ctx.cfg, size.n_bytes), size.free_memory_bytes)
    before = len(tok)
    ids = add_thinking_tokens(model, tok)
    return {"thinking_tokens": ids, "added": len(tok) - before, "model_size": size.to_dict(),
            "preflight": preflight}


def disk_plan(cfg: PipelineConfig, n_bytes: int):
    """Disk at the run's peak, in copies of the model: a checkpoint is three (weights and two
    Adam moments). Step 1 holds its checkpoints and then its model; Step 2 adds its own; at the
    end the Step 1, Step 2 and trace-baking models remain (out/model is hard-linked). A
    finished step's checkpoints are deleted unless keep_checkpoints (then the newest two stay).
    Plus a tenth for tokenizers, logs and caches. (Smoke preset on SmolLM2-135M: a 2.69 GB
    peak measured by sampling `du` each second, against 2.69 GB before the tenth.)"""
    from agent_forge.preflight import Needs, checkpoints_on_disk, training_memory
    from agent_forge.training.checkpoint import KEEP_CHECKPOINTS as KEEP

    c1 = checkpoints_on_disk(cfg.bake.steps, cfg.bake.save_every)
    c2 = checkpoints_on_disk(cfg.rl.steps, cfg.rl.save_every) if cfg.rl_enabled else 0
    kept1, kept2 = (min(c1, KEEP), min(c2, KEEP)) if cfg.keep_checkpoints else (0, 0)
    models = 1 + int(cfg.rl_enabled) + int(cfg.trace_bake_questions > 0)
    copies = max(3 * c1 + 1, 3 * kept1 + 1 + 3 * c2 + int(cfg.rl_enabled), 3 * (kept1 + kept2) + models)
    return Needs(disk_bytes=int(n_bytes * copies * 1.1), memory_bytes=training_memory(n_bytes))


def stage_data(ctx: Context) -> dict:
    from agent_forge.data.general import build_mixture
    from agent_forge.data.overlap import asked_by, eval_sets_for, gsm8k_contamination
    from agent_forge.data.schema import write_records

    d = ctx.cfg.data
    t0, stats = time.time(), {}
    kept, n_general = build_mixture(d, exclude=asked_by(eval_sets_for(ctx.cfg.eval_dataset, ctx.cfg.val_dataset)),
                                    exclude_general=asked_by(tuple(ctx.cfg.general_sets)), stats=stats)
    path = ctx.out / "data" / "train.jsonl"
    write_records(path, kept)
    strategies: dict[str, int] = {}
    for r in kept:
        for s in r.strategies:
            strategies[s] = strategies.get(s, 0) + 1
    flags = [gsm8k_contamination(d.families, name) for name in (ctx.cfg.eval_dataset, ctx.cfg.val_dataset)]
    return {"path": str(path), "records": len(kept), "general_records": n_general,
            "dropped_overlap": stats.get("eval_overlap", 0),
            "strategy_counts": strategies, "seconds": round(time.time() - t0, 1),
            "gsm8k_contamination": next((f for f in flags if f), None)}


def stage_step1(ctx: Context) -> dict:
    from agent_forge.quietstar.step1 import run_step1

    data_path = ctx.state.result("data")["path"]
    bake_overrides = dataclasses.asdict(ctx.cfg.bake)
    return run_step1(ctx.cfg.model, data_path, ctx.out / "step1", bake_overrides, None,
                     ctx.cfg.val_dataset, resume=ctx.resume, device=ctx.cfg.device,
                     tracker=ctx.tracker, progress=ctx.progress)


def stage_step2(ctx: Context) -> dict:
    """Answer-level Quiet-STaR RL on the Step 1 model, KL-leashed to it."""
    if not ctx.cfg.rl_enabled:
        return {"status": "skipped", "note": "rl_enabled is false in this config, so the Step 1 model goes "
                "forward; a few CPU steps change nothing measurable: run Step 2 with `forge rl --model "
                f"{ctx.out / 'step1' / 'model'} --config configs/rl_answer_cpu.yaml` (about 17 min on 2 cores)"}
    from agent_forge.quietstar.rl import run_step2

    step1_model = ctx.out / "step1" / "model"
    overrides = dataclasses.asdict(ctx.cfg.rl)
    result = run_step2(str(step1_model), ctx.out / "step2", overrides, eval_data=ctx.cfg.val_dataset,
                       resume=ctx.resume, device=ctx.cfg.device, tracker=ctx.tracker, progress=ctx.progress,
                       monitor=AntiTheaterMonitor(ctx))
    return keep_or_roll_back(result, val_accuracy_so_far(ctx), result.get("accuracy_thinking_on"), "Step 2")


def keep_or_roll_back(result: dict, before: float | None, after: float | None, label: str) -> dict:
    """Keep a stage's model only if validation accuracy with thinking did not fall.

    Both numbers come from the same validation questions (never the test set). A rolled-back
    stage keeps its metrics in the report, its model is not carried forward, and it says so.
    """
    kept = before is None or after is None or after >= before
    verdict = {"kept": kept, "val_accuracy_before": before, "val_accuracy_after": after}
    if kept:
        return {**result, **verdict}
    note = (f"rolled back: validation accuracy with thinking fell from {100 * before:.1f}% to "
            f"{100 * after:.1f}% after {label}; the previous model goes forward")
    return {**{k: v for k, v in result.items() if k != "model_dir"}, **verdict,
            "rolled_back_model_dir": result.get("model_dir"), "note": note}


def val_accuracy_so_far(ctx: Context) -> float | None:
    """Validation accuracy (thinking on) of the model current_model_dir() points at."""
    from agent_forge.report import carried_val_accuracy

    return carried_val_accuracy(ctx.state.data["stages"])


class AntiTheaterMonitor:
    """Anti-theater on a slice of the eval set during RL; two failures in a row stop RL.

    A stop is a result, not a crash: Step 2 saves what it has and says why it stopped, and the
    final anti-theater stage then decides keep or roll back.
    """

    def __init__(self, ctx: Context, limit: int = 32, patience: int = 2):  # one generation batch
        self.ctx, self.limit, self.patience, self.failures = ctx, limit, patience, 0

    def __call__(self, step: int, model) -> dict:
        from agent_forge.data.evalsets import load_eval_set
        from agent_forge.validation.anti_theater import run_anti_theater

        tok = self._tokenizer()
        items = load_eval_set(self.ctx.cfg.val_dataset, limit=self.limit)
        report = run_anti_theater(model, tok, items, max_new_tokens=self.ctx.cfg.max_new_tokens,
                                  thresholds=anti_theater_thresholds(self.ctx.cfg))
        model.train()
        self.failures = 0 if report.passed else self.failures + 1
        figures = {t["name"]: t["value"] for t in report.tests}
        stop = self.failures >= self.patience
        reason = (f"anti-theater failed {self.failures} times in a row (step {step}): {report.sentence}"
                  if stop else None)
        return {"step": step, "passed": report.passed, **figures, "stop": stop, "reason": reason}

    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.ctx.out / "step1" / "model")


def stage_trace_baking(ctx: Context) -> dict:
    """Bake the model's own successful thoughts back into its weights (STaR-style).

    Sample traces on fresh questions, keep only those whose answer verifies, fine-tune
    briefly on them. Runs before anti-theater and A/B, so the model shipped is the one tested.
    """
    cfg = ctx.cfg
    if not cfg.trace_bake_questions or not cfg.trace_bake_steps:
        return {"status": "skipped", "note": "trace_bake_questions or trace_bake_steps is 0 in this config (the "
                "quick preset turns it off: its few steps were rolled back in two of the last three demo runs)"}
    import torch

    from agent_forge.data.overlap import asked_by, eval_sets_for
    from agent_forge.data.procedural import build_gym_records
    from agent_forge.data.star import star_records
    from agent_forge.models import load_model, read_meta, save_model

    src = current_model_dir(ctx)
    model, tok = load_model(str(src), device=cfg.device)
    fresh = build_gym_records(cfg.trace_bake_questions, seed=cfg.data.seed + 2, families=tuple(cfg.data.families),
                              difficulty=cfg.data.difficulty,
                              exclude=asked_by(eval_sets_for(cfg.eval_dataset, cfg.val_dataset)))
    from agent_forge.data.schema import write_records
    from agent_forge.quietstar.rl import TRAIN_QUESTIONS_FILE

    write_records(ctx.out / "trace_baking" / TRAIN_QUESTIONS_FILE, fresh)  # the fresh split leaves them out
    questions = [{"id": r.id, "question": r.question, "gold": r.gold, "family": r.family} for r in fresh]
    with torch.random.fork_rng():  # seeded sampling: the same run keeps the same traces
        torch.manual_seed(cfg.data.seed)
        kept, report = star_records(model, tok, questions, k=cfg.trace_bake_samples,
                                    max_new_tokens=cfg.max_new_tokens, temperature=0.8)
    result = {"questions": len(questions), "samples": report.samples, "kept_traces": len(kept),
              "yield": report.yield_rate}
    if len(kept) < 8:
        return {**result, "status": "skipped", "note": "fewer than 8 verified traces; nothing baked"}
    bake_cfg = dataclasses.replace(cfg.bake, steps=cfg.trace_bake_steps, lr=cfg.bake.lr / 4, warmup_steps=2,
                                   save_every=0, eval_every=0)
    baker = Baker(model, tok, bake_cfg, ctx.out / "trace_baking", tracker=ctx.tracker)
    baked = baker.run(kept, kept[-8:], resume=False, progress=ctx.progress)
    model = baker.merged_model()
    after = _val_accuracy(ctx, model, tok)
    meta = {**read_meta(src), "parent": str(src), "trace_baking": result}
    out_dir = save_model(model, tok, ctx.out / "trace_baking" / "model", meta)
    result = {**result, "status": "done", "steps": baked.steps_done, "final_loss": baked.metrics["final_loss"],
              "model_dir": str(out_dir)}
    return keep_or_roll_back(result, val_accuracy_so_far(ctx), after, "trace baking")


def _val_accuracy(ctx: Context, model, tokenizer) -> float:
    """Validation accuracy with thinking, measured as Step 1 measured its own."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.quietstar.step1 import generation_metrics

    items = load_eval_set(ctx.cfg.val_dataset, limit=ctx.cfg.bake.eval_samples)
    return generation_metrics(model, tokenizer, items, ctx.cfg.bake.eval_max_new_tokens,
                              with_off=False)["accuracy_thinking_on"]


def stage_save(ctx: Context) -> dict:
    """Copy the final model to out/model with forge_meta.json carrying every stage's verdict."""
    from agent_forge.models import META_FILE, read_meta, weights_digest

    src, dst = current_model_dir(ctx), ctx.out / "model"
    meta = read_meta(src)
    step1 = ctx.state.result("step1")
    anti = ctx.state.result("anti_theater")
    meta["metrics"] = {**meta.get("metrics", {}), "baking_accuracy": step1.get("baking_accuracy"),
                       "anti_theater_passed": bool(anti.get("passed")),
                       "ab_winner": ctx.state.result("ab_test").get("winner"),
                       "general_passed": _general_passed(ctx)}
    meta["pipeline"] = {"preset": ctx.cfg.preset, "config": ctx.cfg.to_dict()}
    if (ctx.out / GREEDY_ON_FILE).is_file():  # Phase 4 replays it as its 'before' (same weights, budget, batching)
        meta["greedy_on"] = {"file": str(Path("..") / GREEDY_ON_FILE), "key": greedy_on_key(ctx, src),
                             "weights_sha256": weights_digest(src)}
    tmp = ctx.out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    (tmp / META_FILE).unlink(missing_ok=True)  # a link: writing through it would change src's meta
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)
    return {"model_dir": str(dst)}


def _general_passed(ctx: Context) -> bool | None:
    """The general-task verdict the handoff reads: None when not measured or not gating."""
    general = ctx.state.result("general")
    return general.get("passed") if ctx.cfg.general_gate and "passed" in general else None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (models are written whole and replaced, never edited in place), or
    copy it where the filesystem cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_register(ctx: Context) -> dict:
    from agent_forge.registry import Registry
    from agent_forge.report import headline

    reg = Registry(ctx.cfg.registry)
    test = headline({"stages": ctx.state.data["stages"]})
    metrics = {"baking_accuracy": ctx.state.result("step1").get("baking_accuracy"),
               "val_accuracy_thinking_on": val_accuracy_so_far(ctx),
               "test_accuracy_thinking_on": test["accuracy_on"], "test_accuracy_thinking_off": test["accuracy_off"],
               "input_accuracy": test["input_accuracy_greedy"], "ab_diff_points": test["ab_diff_points"],
               "anti_theater_passed": ctx.state.result("anti_theater").get("passed"), "ab_winner": test["ab_winner"]}
    model_id = reg.register_model(f"quietstar:{Path(ctx.cfg.out).name}", 3, ctx.out / "model",
                                  parent_id=_input_row(reg, ctx.cfg.model), metrics=metrics)
    return {"model_id": model_id, "registry": str(reg.path)}


def _input_row(reg, model: str) -> int:
    """The registry row of the model Phase 3 started from: the existing one (e.g. the Phase 2
    champion), else a phase-0 row for it (the default model, a hub id, a plain directory), so
    a lineage always runs back to the model the user gave."""
    from agent_forge.models import default_model_dir

    path = default_model_dir() if model == "default" else Path(model)
    found = reg.find_by_path(path) if path.is_dir() else None
    return found if found is not None else reg.register_model(f"input:{model if model == 'default' else path.name}",
                                                             0, path if path.is_dir() else model)


def stage_handoff(ctx: Context) -> dict:
    from agent_forge.handoff import validate_phase3_to_4
    from agent_forge.registry import Registry

    result = validate_phase3_to_4(ctx.out / "model", ctx.cfg.min_baking_accuracy)
    reg = Registry(ctx.cfg.registry)
    reg.update_handoff(ctx.state.result("register")["model_id"], "passed" if result.ok else "failed",
                       result.to_dict())
    return result.to_dict()


STAGES: list[tuple[str, Callable[[Context], dict]]] = [
    ("validate_input", stage_validate_input), ("vocab", stage_vocab), ("data", stage_data),
    ("step1", stage_step1), ("step2", stage_step2), ("trace_baking", stage_trace_baking),
    ("anti_theater", stage_anti_theater),
    ("ab_test", stage_ab_test), ("fresh_split", stage_fresh_split), ("general", stage_general),
    ("save", stage_save), ("register", stage_register),
    ("handoff", stage_handoff),
]


class PipelineError(RuntimeError):
    """A stage found a problem the user must fix; the message says what."""


# ---------------------------------------------------------------------------------------
# Running


def run_pipeline(cfg: PipelineConfig, resume: bool = False, on_stage: Callable | None = None,
                 progress: Callable | None = None) -> dict:
    """Run (or resume) every stage; returns the report also written to out/forge_report.json."""
    from agent_forge.tracking import Tracker

    out = Path(cfg.out)
    state = PipelineState(out, resume)
    changes = state.adopt_config(cfg.to_dict())
    if changes:
        raise PipelineError(resume_refusal(out, changes))
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    tracker = Tracker(out, mode=cfg.tracking, config=cfg.to_dict())
    ctx = Context(cfg, out, state, tracker, progress, resume)

    def drop_checkpoints(name: str) -> None:
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / name / "checkpoints", ignore_errors=True)  # resume is per stage now

    try:
        run_stages(STAGES, ctx, state, on_stage, run_one=run_stage, after=drop_checkpoints)
    finally:
        tracker.finish()
    report = build_report(cfg, state)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report


def run_stage(name: str, fn, ctx: Context) -> dict:
    """Run one stage; turn the problems a user can act on into one clear PipelineError."""
    from agent_forge.preflight import PreflightError

    try:
        return fn(ctx)
    except FloatingPointError as e:
        raise PipelineError(f"stage {name} stopped: {e}. Rerun with --resume after lowering the "
                            "learning rate in --config; training restarts from that checkpoint.") from e
    except PreflightError as e:
        raise PipelineError(f"pre-flight check failed: {e}") from e


def build_report(cfg: PipelineConfig, state: PipelineState) -> dict:
    from agent_forge.report import headline

    stages = state.data["stages"]
    per_stage, total = timings(state)
    return {"model": cfg.model, "preset": cfg.preset, "out": cfg.out, "config": cfg.to_dict(),
            "headline": headline({"stages": stages}), "stages": stages,
            "timings": per_stage, "total_seconds": total}
