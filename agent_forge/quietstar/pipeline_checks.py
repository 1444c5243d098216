"""The measuring stages of `forge bake-quietstar`: anti-theater, the A/B test against the
input model, the fresh split and the general tasks, and what they share (the model the
earlier stages carried, the evaluation items, the greedy thinking-on pass the A/B replays).

They only read models and write verdicts; pipeline.py runs them in order with the training
stages and saves, registers and hands off what they measured.
"""

from __future__ import annotations

from pathlib import Path

from agent_forge.inference import DEFAULT_MAX_NEW, GENERATION_BATCH
from agent_forge.quietstar.pipeline_config import PipelineConfig
from agent_forge.stages import PhaseContext


Context = PhaseContext  # the stages of this phase take one (agent_forge/stages.py)


def anti_theater_thresholds(cfg: PipelineConfig) -> dict:
    """The anti-theater thresholds this config sets (the others keep their defaults)."""
    return {"check_honesty": cfg.check_honesty_threshold}


def current_model_dir(ctx: Context) -> Path:
    """The newest model a finished, kept stage produced: trace baking, else Step 2, else Step 1."""
    from agent_forge.report import carried_stage

    stage = carried_stage(ctx.state.data["stages"])
    return ctx.out / "step1" / "model" if stage == "step1" else Path(ctx.state.result(stage)["model_dir"])


def _eval_items(ctx: Context):
    from agent_forge.data.evalsets import load_eval_set

    return load_eval_set(ctx.cfg.eval_dataset, limit=ctx.cfg.eval_samples)


GREEDY_ON_FILE = "anti_theater/greedy_on.json"


def greedy_on_key(ctx: Context, model_dir: Path) -> dict:
    """What makes a greedy thinking-on generation pass reproducible: the A/B's first round
    replays anti-theater's pass only if all of these match."""
    from agent_forge.quietstar.thought_inference import resolve_thought_positions

    thought = resolve_thought_positions(model_dir)  # a token-level model's silent thoughts
    return {"model": str(model_dir), "mode": "on", "max_new_tokens": ctx.cfg.max_new_tokens,
            "batch_size": GENERATION_BATCH, **({"thought_mode": thought} if thought else {})}


def stage_anti_theater(ctx: Context) -> dict:
    from agent_forge.inference import generate_answers, save_generations
    from agent_forge.models import load_model
    from agent_forge.quietstar.thought_inference import resolve_thought_positions
    from agent_forge.validation.anti_theater import run_anti_theater

    model_dir = current_model_dir(ctx)
    model, tok = load_model(str(model_dir), device=ctx.cfg.device)

    def generate(questions: list[str], thinking: str):
        thought = resolve_thought_positions(model_dir) if thinking == "on" else None  # silent thoughts
        gens = generate_answers(model, tok, questions, thinking=thinking, batch_size=GENERATION_BATCH,
                                max_new_tokens=ctx.cfg.max_new_tokens, thought_mode=thought,
                                model_dir=str(model_dir))
        if thinking == "on":
            save_generations(ctx.out / GREEDY_ON_FILE, greedy_on_key(ctx, model_dir), questions, gens)
        return gens
    report = run_anti_theater(model, tok, _eval_items(ctx), generate_fn=generate, batch_size=GENERATION_BATCH,
                              thresholds=anti_theater_thresholds(ctx.cfg))
    recheck = (f"forge anti-theater --model {ctx.out / 'model'} --data {ctx.cfg.eval_dataset} --limit {ctx.cfg.eval_samples} "
               f"--max-new-tokens {ctx.cfg.max_new_tokens}")
    return {**report.to_dict(), "recheck": recheck}


def stage_ab_test(ctx: Context) -> dict:
    """The input model (answering directly, its best prompt) against the thinking model.

    The thinking model's greedy round is exactly anti-theater's thinking-on pass (same model,
    questions, budget and batching), so it is replayed from disk rather than generated twice.
    """
    from agent_forge.inference import load_generations
    from agent_forge.models import load_model
    from agent_forge.quietstar.thought_inference import resolve_thought_positions
    from agent_forge.validation.ab import model_arm, replay_first_round, run_ab

    cfg = ctx.cfg
    items = _eval_items(ctx)
    model_dir = current_model_dir(ctx)
    base_model, base_tok = load_model(cfg.model, device=cfg.device)
    cand_model, cand_tok = load_model(str(model_dir), device=cfg.device)
    # The input model answers directly with inference's direct budget, as in the fresh-split
    # and general-task comparisons: one reading of "the input model" across the report.
    baseline = model_arm(f"input ({cfg.model})", base_model, base_tok, thinking="auto",
                         batch_size=GENERATION_BATCH, max_new_tokens=DEFAULT_MAX_NEW["direct"])
    candidate = model_arm("phase 3 (thinking)", cand_model, cand_tok, thinking="on",
                          batch_size=GENERATION_BATCH, max_new_tokens=cfg.max_new_tokens,
                          thought_mode=resolve_thought_positions(model_dir), model_dir=str(model_dir))
    questions = [it.question for it in items]
    recorded = load_generations(ctx.out / GREEDY_ON_FILE, greedy_on_key(ctx, model_dir), questions)
    candidate = replay_first_round(candidate, recorded, questions)
    report = run_ab(baseline, candidate, items, rounds=cfg.ab_test_rounds, threshold=cfg.ab_threshold_points)
    return {**report.to_dict(), "replayed_greedy_round": recorded is not None}


def _training_files(ctx: Context) -> list[Path]:
    """Every file of questions this run trained on (data, Step 2, trace baking)."""
    from agent_forge.quietstar.rl import TRAIN_QUESTIONS_FILE

    files = [ctx.out / "data" / "train.jsonl", ctx.out / "step2" / TRAIN_QUESTIONS_FILE,
             ctx.out / "trace_baking" / TRAIN_QUESTIONS_FILE]
    return [f for f in files if f.exists()]


def _final_and_input_models(ctx: Context):
    from agent_forge.models import load_model

    model_dir = current_model_dir(ctx)
    return (*load_model(str(model_dir), device=ctx.cfg.device), *load_model(ctx.cfg.model, device=ctx.cfg.device))


def stage_fresh_split(ctx: Context) -> dict:
    """Test-split accuracy's companion: the final model, thinking on, on a fresh split of the
    whole easy range from a seed drawn now, less the questions any training file asks."""
    from agent_forge.data.evalsets import fresh_split_name, load_eval_set
    from agent_forge.data.overlap import unseen_items
    from agent_forge.validation.generalisation import compare_on

    cfg = ctx.cfg
    n = cfg.eval_samples if cfg.fresh_samples is None else cfg.fresh_samples
    if not n:
        return {"status": "skipped", "note": "fresh_samples is 0"}
    name = fresh_split_name(cfg.fresh_seed)
    files = _training_files(ctx)
    asked = load_eval_set(name, limit=n)
    items = unseen_items(asked, files)
    result = compare_on(items, *_final_and_input_models(ctx), max_new_tokens=cfg.max_new_tokens,
                        batch_size=GENERATION_BATCH)
    recheck = (f"forge eval --model {ctx.out / 'model'} --data {name} --limit {n} --thoughts on "
               f"--max-new-tokens {cfg.max_new_tokens} " + " ".join(f"--exclude-seen {f}" for f in files))
    return {"eval_set": name, "left_out_as_trained_on": len(asked) - len(items),
            "training_files": [str(f) for f in files], "recheck": recheck, **result}


def stage_general(ctx: Context) -> dict:
    """ARC-Easy and CommonsenseQA: with thinking vs the input model answering directly, the
    thinking block's closed rate, log-likelihood accuracy; the verdict the handoff reads."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.validation.generalisation import compare_on, general_verdict

    cfg = ctx.cfg
    if not cfg.general_samples or not cfg.general_sets:
        return {"status": "skipped", "note": "general_samples is 0"}
    models = _final_and_input_models(ctx)
    per_set = {name: compare_on(load_eval_set(name, limit=cfg.general_samples), *models,
                                max_new_tokens=cfg.max_new_tokens, batch_size=GENERATION_BATCH, loglik=True)
               for name in cfg.general_sets}
    return {"sets": per_set, **general_verdict(per_set), "gate": cfg.general_gate}
