"""Why not TRL? Our answer-level RL (Step 2) against TRL's GRPOTrainer, same budget.

The question: given the same Step 1 model, the same training questions, the same reward
and the same wall-clock budget, does our answer-level RL (quietstar/rl.py, the recipe
configs/rl_answer_cpu.yaml) raise held-out accuracy more or less than TRL's GRPOTrainer,
the tool a practitioner would reach for?

Held equal between the arms:
  - the model: `--model` (a Step 1 output dir), and the frozen reference (KL) is that model;
  - the questions: the records `forge rl` builds by default (easy arithmetic, data seed 2);
  - the prompt: render_prompt(q) + "[thinking]" as plain text (no chat template), so every
    completion starts inside the thinking block;
  - the reward: our verified answer check (rl_rollouts.is_correct, i.e. evaluation.runner.score
    on the answer slot) plus consistency_weight * claim consistency (both arms, or neither
    with --no-consistency); the TRL reward function calls our own parse and reward code;
  - 4 questions x 4 completions per step, max_new_tokens 80, temperature 1, lr 1e-5, AdamW
    (betas 0.9/0.999, no weight decay), the recipe's linear warm-up, grad clip 1.0, KL
    coefficient 0.05 (k3 estimator in both), token-level loss normalisation (TRL "dapo"),
    no std scaling of advantages (the recipe's normalize_std false = TRL scale_rewards "none"),
    one update per batch (TRL num_iterations 1: its clipped ratio is 1, a plain policy gradient);
  - the budget: each arm trains until `--budget-s` seconds of training have passed (checked
    after each step, so both overshoot by at most one step).
Each arm runs in its own subprocess, so its peak resident memory (ru_maxrss, read when
training ends) is its own. Accuracy with thinking on is measured with evaluation.runner's
`evaluate` on the same held-out questions, before (the Step 1 model) and after each arm,
with every question of the training pool left out (data/overlap.unseen_items); changes are
paired (validation/stats.paired_gain: a bootstrap 95% interval and McNemar's p).

    python bench/bench_rl_vs_trl.py --model runs/demo/step1/model --budget-s 900 --seeds 0,1
    python bench/bench_rl_vs_trl.py --model runs/demo/step1/model --our-lm-coefficient 0
    python bench/bench_rl_vs_trl.py --smoke          # a tiny random model, seconds

Prints a table; writes bench/results/rl_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # agent_forge and _common, however run
from _common import save_result  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rl_vs_trl.json"
RECIPE = ROOT / "configs" / "rl_answer_cpu.yaml"
ARMS = ("ours", "trl")
ENDLESS = 10 ** 6  # "steps" when the budget, not a step count, ends training


# ---------------------------------------------------------------- options

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the Step 1 model dir (e.g. runs/demo/step1/model)")
    p.add_argument("--budget-s", type=float, default=900.0, help="training seconds per arm and seed")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--eval-data", default="easy_arithmetic")
    p.add_argument("--eval-samples", type=int, default=300, help="held-out questions before leaving out seen ones")
    p.add_argument("--eval-max-new-tokens", type=int, default=96)
    p.add_argument("--no-consistency", action="store_true",
                   help="neither arm gets the claim-consistency term (default: both, the recipe's 0.5)")
    p.add_argument("--our-lm-coefficient", type=float, default=None,
                   help="our arm's LM term on gold traces (TRL has none); default: the recipe's 1.0")
    p.add_argument("--our-coherence", action="store_true",
                   help="also score coherence each step in our arm (logging only; costs time TRL does not spend)")
    p.add_argument("--trl-stop", choices=["answer", "eos"], default="answer",
                   help="TRL rows stop at the answer slot's newline as ours do (answer) or only at EOS")
    p.add_argument("--arms", default="ours,trl")
    p.add_argument("--smoke", action="store_true", help="tiny model, few questions, a few seconds")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.budget_s = min(args.budget_s, 3.0)
        args.eval_samples, args.eval_max_new_tokens = min(args.eval_samples, 2), min(args.eval_max_new_tokens, 16)
    return args


def rl_config(args, seed: int):
    """The recipe's RLConfig for one seed, with the budget (not a step count) ending training."""
    from agent_forge.quietstar.rl import make_config

    over = {"steps": ENDLESS, "seed": seed, "save_every": 0, "eval_before": False, "eval_thinking_off": False,
            "coherence": args.our_coherence, "mixed_precision": "no"}
    if args.no_consistency:
        over["consistency_weight"] = 0.0
    if args.our_lm_coefficient is not None:
        over["lm_coefficient"] = args.our_lm_coefficient
    if args.smoke:
        over.update(n_questions=16, max_new_tokens=12, coherence_embedder="none")
    return make_config(over, RECIPE)


def eval_items(args, seen_file: Path) -> list:
    """The held-out questions, with every question of the training pool left out."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.overlap import unseen_items

    items = unseen_items(load_eval_set(args.eval_data, limit=None if args.smoke else args.eval_samples),
                         [seen_file])
    return items[:args.eval_samples] if args.smoke else items


def measure(model, tokenizer, items, args) -> dict:
    """Accuracy with thinking on (Wilson interval) and the per-question verdicts for pairing."""
    from agent_forge.evaluation.runner import evaluate

    r = evaluate(model.eval(), tokenizer, items, thinking="on", max_new_tokens=args.eval_max_new_tokens,
                 progress=False, loglik=False)
    return {"accuracy": r.accuracy, "ci95": r.ci95, "n": r.n, "no_answer_rate": r.no_answer_rate,
            "correct": [bool(x["correct"]) for x in r.per_example]}


# ---------------------------------------------------------------- the reward TRL gets

def trl_reward(tokenizer, cfg, eos: list[int], vocab="default"):
    """A TRL reward function that is our RL's reward: our parse of the sampled ids (TRL's
    `completions` text has the thinking tokens stripped, so it reads `completion_ids`), our
    answer check on the answer slot, our claim consistency and check honesty, our
    combine_rewards."""
    from agent_forge.quietstar.coherence import claim_consistency
    from agent_forge.validation.check_honesty import honest_share
    from agent_forge.quietstar.rl_rollouts import _parse, combine_rewards, is_correct
    from agent_forge.vocab import get_vocab

    vocab = get_vocab(vocab)
    close_id = tokenizer.convert_tokens_to_ids(vocab.close)

    def forge_reward(prompts, completions, completion_ids, gold, **_) -> list[float]:
        parsed = [_parse(tokenizer, list(ids), set(eos), close_id, vocab) for ids in completion_ids]
        correct = [float(is_correct(p[2] if p[3] else None, g)) for p, g in zip(parsed, gold)]
        consistency = [claim_consistency(p[1], vocab) for p in parsed]
        honesty = [honest_share(p[1], vocab) for p in parsed]
        return combine_rewards(correct, None, cfg, consistency, honesty)

    return forge_reward


def answer_stop_generate(model, tokenizer, eos: list[int], vocab="default"):
    """Make `model.generate` stop each row at the end of its answer slot, as our sampler does
    (inference.AnswerSlotStop); what follows a stopped row becomes EOS, which TRL's own
    post-processing then masks (pad == EOS does this by itself)."""
    import torch

    from agent_forge.inference import AnswerSlotStop
    from agent_forge.quietstar.rl_rollouts import valid_lengths
    from agent_forge.vocab import get_vocab

    close_id = tokenizer.convert_tokens_to_ids(get_vocab(vocab).close)
    original = model.generate

    def generate(*a, **kw):
        n_rows, prompt_len = kw["input_ids"].shape
        out = original(*a, stopping_criteria=[AnswerSlotStop(tokenizer, n_rows, True, close_id)], **kw)
        new = out[:, prompt_len:]
        lengths = torch.tensor(valid_lengths(tokenizer, new.cpu(), set(eos), close_id), device=new.device)
        after = torch.arange(new.shape[1], device=new.device)[None] >= lengths[:, None]
        return torch.cat([out[:, :prompt_len], new.masked_fill(after, eos[0])], 1)

    model.generate = generate


# ---------------------------------------------------------------- the two arms (in a child process)

def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def train_ours(model, tokenizer, records, cfg, budget_s: float, work: Path) -> dict:
    """Our answer-level RL (RLTrainer, the recipe's settings) until `budget_s` seconds of
    training have passed: a subclass stops the loop through its on_step_end hook."""
    from agent_forge.quietstar.rl import RLTrainer

    class BudgetRL(RLTrainer):
        def _setup(self, resume):
            start = super()._setup(resume)
            self.t_start = time.perf_counter()
            return start

        def on_step_end(self, step, row):
            if time.perf_counter() - self.t_start >= budget_s:
                self.stopped_reason = "budget"
                return True
            return super().on_step_end(step, row)

    trainer = BudgetRL(model, tokenizer, cfg, work / "ours_run")
    result = trainer.run(records)
    seconds = time.perf_counter() - trainer.t_start
    h = [r for r in trainer.history if "reward_mean" in r]
    return {"model": trainer.trained_model(), "steps": result.steps_done, "train_seconds": seconds,
            "reward_mean": _mean([r["reward_mean"] for r in h]), "kl_last": h[-1].get("kl") if h else None}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def grpo_config(cfg, seed: int, out_dir: Path):
    """TRL's GRPOConfig set to our recipe: one optimiser step = 4 questions x 4 completions,
    generated in one batch (generation_batch_size 16) and trained in two micro-batches of 8
    (our micro_batch_rows), CPU, fp32, no vLLM, no reporting, no checkpoints, and no
    activation checkpointing (TRL turns it on by default; ours does not use it)."""
    from trl import GRPOConfig

    k, q, rows = cfg.samples_per_question, cfg.questions_per_step, cfg.micro_batch_rows
    per_device = min(rows, k * q)
    return GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, seed=seed, data_seed=seed, max_steps=ENDLESS,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=(k * q) // per_device,
        generation_batch_size=k * q, num_generations=k, num_iterations=1, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, learning_rate=cfg.lr, beta=cfg.kl_coefficient,
        loss_type="dapo" if cfg.loss_norm == "token" else "grpo",
        scale_rewards="group" if cfg.normalize_std else "none",
        max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay, disable_dropout=True,
        gradient_checkpointing=False,
        use_vllm=False, log_completions=False, dataloader_num_workers=0, disable_tqdm=True)


def budget_callback(budget_s: float):
    """A TrainerCallback that ends training once `budget_s` seconds have passed since it began."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        t_start = None

        def on_train_begin(self, args, state, control, **kw):
            self.t_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.t_start >= budget_s:
                control.should_training_stop = True
            return control

    return Budget()


def train_trl(model, tokenizer, records, cfg, budget_s: float, work: Path, stop: str) -> dict:
    """TRL's GRPOTrainer on the same prompts and reward; its optimiser and schedule are ours
    (AdamW with the rl preset's betas and eps, linear warm-up then constant), passed in."""
    from functools import partial

    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from agent_forge.data.schema import render_prompt
    from agent_forge.inference import eos_ids
    from agent_forge.optim.mugrokfast import build_optimizer
    from agent_forge.training.loop import warmup_factor
    from agent_forge.vocab import get_vocab

    vocab, eos = get_vocab("default"), eos_ids(model, tokenizer)
    data = Dataset.from_list([{"prompt": render_prompt(r.question) + vocab.open, "gold": str(r.gold)}
                              for r in records])
    if stop == "answer":
        answer_stop_generate(model, tokenizer, eos)
    opt = build_optimizer(model, "adamw", "rl", lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_factor, warmup=cfg.warmup_steps, total=ENDLESS,
                                                           decay=False))
    budget = budget_callback(budget_s)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(tokenizer, cfg, eos), args=grpo_config(
        cfg, cfg.seed, work / "trl_run"), train_dataset=data, processing_class=tokenizer,
        callbacks=[budget], optimizers=(opt, sched))
    trainer.train()
    seconds = time.perf_counter() - budget.t_start
    logs = [e for e in trainer.state.log_history if "reward" in e]
    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained.__dict__.pop("generate", None)  # back to the class's generate for the evaluation
    return {"model": trained, "steps": trainer.state.global_step, "train_seconds": seconds,
            "reward_mean": _mean([e["reward"] for e in logs]), "kl_last": logs[-1].get("kl") if logs else None}


def run_child(args) -> None:
    """One arm, one seed: load the Step 1 model, train to the budget, read the peak memory,
    evaluate on the held-out questions; writes `work/<arm>-<seed>.json`."""
    import torch

    from agent_forge.models import load_model
    from agent_forge.quietstar.rl import training_records
    from agent_forge.vocab import add_thinking_tokens

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = rl_config(args, args.seed)
    records, _ = training_records(cfg)
    model, tokenizer = load_model(args.model, device="cpu")
    add_thinking_tokens(model, tokenizer)
    torch.manual_seed(args.seed)
    if args.child == "ours":
        out = train_ours(model, tokenizer, records, cfg, args.budget_s, args.work)
    else:
        out = train_trl(model, tokenizer, records, cfg, args.budget_s, args.work, args.trl_stop)
    peak = peak_rss_mb()
    after = measure(out.pop("model"), tokenizer, eval_items(args, args.work / "train_pool.jsonl"), args)
    rec = {**out, "arm": args.child, "seed": args.seed, "peak_rss_mb": round(peak, 1),
           "sec_per_step": out["train_seconds"] / out["steps"] if out["steps"] else None, "after": after}
    (args.work / f"{args.child}-{args.seed}.json").write_text(json.dumps(rec))


def spawn(args, arm: str, seed: int, work: Path) -> dict:
    """Run one arm in a fresh interpreter (its own peak memory) and read its result."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--seed", str(seed),
            "--work", str(work), "--model", str(args.model), "--budget-s", str(args.budget_s),
            "--eval-data", args.eval_data, "--eval-samples", str(args.eval_samples),
            "--eval-max-new-tokens", str(args.eval_max_new_tokens), "--trl-stop", args.trl_stop]
    argv += [flag for flag, on in (("--no-consistency", args.no_consistency), ("--our-coherence", args.our_coherence),
                                   ("--smoke", args.smoke)) if on]
    if args.our_lm_coefficient is not None:
        argv += ["--our-lm-coefficient", str(args.our_lm_coefficient)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True)
    rec = json.loads((work / f"{arm}-{seed}.json").read_text())
    rec["process_seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# ---------------------------------------------------------------- the whole comparison

def tiny_model_dir(work: Path) -> Path:
    """--smoke without --model: a 2-layer, 64-wide Llama on the default model's tokenizer
    (read from the offline cache), with the thinking tokens, saved as a Step 1 dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from agent_forge.models import default_model_dir, save_model
    from agent_forge.vocab import add_thinking_tokens

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    add_thinking_tokens(model, tok)
    return save_model(model, tok, work / "tiny_step1", {"phase": 3, "step": 1, "note": "bench smoke"})


def prepare(args, work: Path) -> tuple[list, dict, dict]:
    """(held-out items, the Step 1 model's accuracy on them, the training pool's facts): the
    pool is written to work/train_pool.jsonl, which every process leaves out of the evaluation."""
    from agent_forge.data.schema import write_records
    from agent_forge.models import load_model
    from agent_forge.quietstar.rl import training_records

    cfg = rl_config(args, 0)
    records, dropped = training_records(cfg)
    write_records(work / "train_pool.jsonl", records)
    items = eval_items(args, work / "train_pool.jsonl")
    if not items:
        raise SystemExit("no held-out question is left after leaving out the training pool")
    model, tokenizer = load_model(args.model, device="cpu")
    before = measure(model, tokenizer, items, args)
    del model
    pool = {"questions": len(records), "dropped_eval_overlap": dropped, "data_seed": cfg.data_seed,
            "families": list(cfg.families)}
    return items, before, pool


def summarise(before: dict, runs: list[dict]) -> list[dict]:
    """Each run's paired change against the Step 1 model; then, per seed, ours minus TRL."""
    from agent_forge.validation.stats import paired_gain

    rows = []
    for r in runs:
        correct = r["after"].pop("correct")
        r["gain_vs_before"] = paired_gain(before["correct"], correct)
        r["_correct"] = correct
        rows.append(r)
    for seed in sorted({r["seed"] for r in runs}):
        pair = {r["arm"]: r for r in runs if r["seed"] == seed}
        if set(ARMS) <= set(pair):
            pair["ours"]["ours_minus_trl"] = paired_gain(pair["trl"]["_correct"], pair["ours"]["_correct"])
    for r in rows:
        r.pop("_correct")
    return rows


def show(rec: dict) -> None:
    """The table: per arm and seed, steps, s/step, peak memory, accuracy before/after, change."""
    from rich.console import Console
    from rich.table import Table

    def pct(a, ci):
        return f"{100 * a:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    def gain(g):
        lo, hi = g["ci95_points"]
        return f"{g['points']:+.1f} [{lo:+.1f}, {hi:+.1f}] p={g['mcnemar_p']:.2g}"

    b = rec["before"]
    t = Table(title=f"RL vs TRL GRPO, {rec['budget_s']:.0f} s each, n={b['n']} held-out, "
                    f"before {pct(b['accuracy'], b['ci95'])}")
    for col in ("arm", "seed", "steps", "s/step", "peak MB", "after", "after - before", "ours - TRL"):
        t.add_column(col)
    for r in rec["runs"]:
        a = r["after"]
        t.add_row(r["arm"], str(r["seed"]), str(r["steps"]), f"{r['sec_per_step'] or 0:.2f}",
                  f"{r['peak_rss_mb']:.0f}", pct(a["accuracy"], a["ci95"]), gain(r["gain_vs_before"]),
                  gain(r["ours_minus_trl"]) if "ours_minus_trl" in r else "")
    Console().print(t)


def settings(args) -> dict:
    """What ran: the shared settings and where the arms differ."""
    cfg = rl_config(args, 0)
    keys = ("questions_per_step", "samples_per_question", "max_new_tokens", "lr", "warmup_steps", "kl_coefficient",
            "reward", "consistency_weight", "normalize_std", "loss_norm", "max_grad_norm", "micro_batch_rows")
    return {"shared": {k: getattr(cfg, k) for k in keys}, "ours_lm_coefficient": cfg.lm_coefficient,
            "ours_coherence": cfg.coherence, "trl_stop": args.trl_stop, "trl_num_iterations": 1,
            "trl_loss_type": "dapo" if cfg.loss_norm == "token" else "grpo"}


def result_key(args, rec: dict) -> str:
    """'smoke', or model@budget@our LM coefficient (@no-consistency): one entry per setting."""
    if args.smoke:
        return "smoke"
    key = f"{args.model}@{args.budget_s:.0f}s@lm{rec['settings']['ours_lm_coefficient']:g}"
    return key + ("@no-consistency" if args.no_consistency else "")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    with tempfile.TemporaryDirectory(prefix="rl_vs_trl_") as tmp:
        work = Path(tmp)
        if args.model is None:
            if not args.smoke:
                raise SystemExit("--model (a Step 1 model dir) is required unless --smoke")
            args.model = str(tiny_model_dir(work))
        _, before, pool = prepare(args, work)
        runs = [spawn(args, arm, int(seed), work) for seed in args.seeds.split(",")
                for arm in args.arms.split(",")]
    import torch
    import trl

    rec = {"model": "tiny (smoke)" if args.smoke and "tiny_step1" in str(args.model) else str(args.model),
           "budget_s": args.budget_s, "eval_data": args.eval_data, "before": before, "pool": pool,
           "settings": settings(args), "runs": summarise(before, runs), "threads": torch.get_num_threads(),
           "trl_version": trl.__version__, "smoke": args.smoke}
    rec["before"] = {k: v for k, v in before.items() if k != "correct"}
    show(rec)
    save_result(rec, args.results, result_key(args, rec))
    return rec


if __name__ == "__main__":
    main()
