"""Step 1, Prompt Baking: put the reasoning strategies into the weights.

Two objectives share one loop:
- `sft`: supervised baking on rendered records, loss on the trace and the answer only;
- `kl`: true prompt baking (Bhargava et al. 2024). A frozen teacher sees a strategy prompt,
  the student does not; the student minimises KL(teacher || student) on response tokens.
  The responses are sampled from the prompted teacher (`kl_source="sampled"`, as the paper
  does) or are the records' own traces (`"dataset"`). The first prompt's teacher is the input
  model, also on --resume. Several prompts bake sequentially (the teacher becomes the
  freshly baked model plus the next prompt); `kl_target` stops early for half-baking.

Training runs on the shared loop (training/loop.py: Accelerate for CPU, one GPU and many
via torchrun, schedule, guard, checkpoints); Baker supplies the micro-batches and the loss.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would, and each rank takes its slice of the global batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from agent_forge.inference import GENERATION_BATCH
from agent_forge.quietstar.bake_data import (ANSWER, IGNORE, collate, encode_pairs, encode_records, sample_pairs,
                                             shifted)
from agent_forge.training.batching import epoch_permutation, read_positions
from agent_forge.training.checkpoint import trainable_state
from agent_forge.training.kl import kl_ref_to_policy
from agent_forge.training.loop import LoopConfig, LoopTrainer, TrainingLoop
from agent_forge.vocab import STRATEGIES, add_thinking_tokens

DEFAULT_BAKE_PROMPT = (
    "Think before answering. Open [thinking], write each partial result after <step>, "
    "re-check a step after <doubt>, fix mistakes after <correct>, then close [/endthinking] "
    "and give only the final answer.\n"
)


@dataclass
class BakeConfig:
    """Step 1 settings. Every field has a sane default for a ~100M model on a CPU."""

    mode: str = "sft"  # "sft" (supervised on traces) or "kl" (prompt baking)
    optimizer: str = "adamw"  # "adamw" or "mugrokfast"
    lr: float = 1e-4  # AdamW learning rate (also Muon's, via match_rms_adamw scaling)
    steps: int = 200  # optimiser steps
    batch_size: int = 8  # examples per optimiser step, over all processes
    grad_accum: int = 1  # micro-batches per step
    max_len: int = 192  # longer examples are dropped (counted)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    explode_factor: float = 10.0  # stop if the loss exceeds this multiple of the first loss
    seed: int = 0
    group_by_length: bool = True  # micro-batches of similar length: less padding, same examples per epoch
    eval_every: int = 0  # steps between held-out token-accuracy evals; 0 = end only
    eval_samples: int = 64  # held-out questions for the generation eval
    eval_max_new_tokens: int = 96
    eval_thinking_off: bool = True  # also evaluate with thinking forced off (one more pass)
    save_every: int = 50  # steps between checkpoints; 0 = never
    mixed_precision: str = "auto"  # "auto" (bf16 on capable GPUs), "no", "bf16", "fp16"
    lora: bool = False  # LoRA adapters (peft) instead of full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    kl_prompts: tuple[str, ...] = (DEFAULT_BAKE_PROMPT,)  # baked one after another in kl mode
    # kl mode's responses. "sampled" (Bhargava et al.): before each prompt's span, kl_samples
    # continuations per training question are sampled from the prompted teacher (seeded, no
    # grad, batched; every process samples all of them), each cut at max_len. "dataset": the
    # records' own traces (planted slips stay out of the KL, as out of the SFT loss).
    kl_source: str = "sampled"
    kl_samples: int = 1  # "sampled": continuations per question
    kl_max_new_tokens: int = 128  # "sampled": longest continuation
    kl_temperature: float = 1.0  # "sampled": 1.0 samples the teacher's own distribution
    kl_top_k: int | None = 64  # top-k KL (bounded memory); None = exact, chunked
    kl_target: float | None = None  # half-baking: stop a prompt once the KL falls below
    converge_overall: float = 0.85  # convergence: held-out token accuracy overall ...
    converge_strategy_frac: float = 0.9  # ... and each strategy >= this fraction of it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BakeResult:
    steps_done: int
    metrics: dict
    converged: bool
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Batches


def batch_indices(step: int, micro: int, cfg: BakeConfig, n: int, rank: int = 0, world: int = 1,
                  lengths: Sequence[int] | None = None) -> list[int]:
    """The examples of micro-batch `micro` of step `step`: epoch orders seeded by (seed,
    epoch), read in order; each process takes every world-th example. With `lengths` and
    cfg.group_by_length, each micro-batch holds examples of similar length (less padding)."""
    per_micro = max(1, cfg.batch_size // cfg.grad_accum)
    start = (step * cfg.grad_accum + micro) * per_micro
    grouped = tuple(lengths) if (lengths is not None and cfg.group_by_length) else None
    out = read_positions(start, per_micro, n, lambda epoch: _epoch_order(cfg.seed, epoch, n, per_micro, grouped))
    return out[rank::world]


_ORDER_CACHE: dict = {}
LENGTH_GROUP_MICROS = 16  # a length-sorted window spans this many micro-batches


def _epoch_order(seed: int, epoch: int, n: int, per_micro: int, lengths: tuple | None) -> list[int]:
    """A seeded permutation of range(n). Length grouping (as HF's group_by_length): cut the
    permutation into windows of LENGTH_GROUP_MICROS micro-batches, sort each window by
    length, cut into micro-batches, and shuffle the micro-batches (seeded) across the epoch.
    On the demo's data, 150 batches of 8 are 70.6% real tokens in random order, 96.3% grouped."""
    key = (seed, epoch, n, per_micro, lengths)
    if key not in _ORDER_CACHE:
        _ORDER_CACHE.clear()
        perm = list(epoch_permutation(seed, epoch, n))
        if lengths is not None:
            window = per_micro * LENGTH_GROUP_MICROS
            perm = [i for w in range(0, n, window) for i in sorted(perm[w:w + window], key=lambda i: -lengths[i])]
            full = n // per_micro * per_micro  # a short last block stays last: blocks stay aligned
            blocks = [perm[b:b + per_micro] for b in range(0, full, per_micro)]
            shuffle = epoch_permutation(seed, epoch, len(blocks), offset=1)
            perm = [i for b in shuffle for i in blocks[b]] + perm[full:]
        _ORDER_CACHE[key] = perm
    return _ORDER_CACHE[key]


# ---------------------------------------------------------------------------------------
# Losses


def sft_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels, _ = shifted(batch)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def kl_loss(student, teacher, student_batch, teacher_batch, top_k) -> torch.Tensor:
    """KL(teacher(. | u, x, y<t) || student(. | x, y<t)) averaged over response tokens.

    The two batches hold the same responses behind different prompts, so response token i
    sits at (prompt_len + i) in each; gather both to a common (B, R) layout.
    """
    s_logits = student(input_ids=student_batch["input_ids"], attention_mask=student_batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=teacher_batch["input_ids"], attention_mask=teacher_batch["attention_mask"]).logits
    s_resp, mask = _response_logits(s_logits, student_batch)
    t_resp, t_mask = _response_logits(t_logits, teacher_batch)
    if not torch.equal(mask, t_mask):
        raise ValueError("teacher and student batches hold different responses")
    return kl_ref_to_policy(t_resp, s_resp, mask, top_k)


def _response_logits(logits, batch):
    """(logits predicting response token i at [:, i], mask of the labelled ones), shape (B, R).

    The response runs from the first labelled token (the opener; the prompt never is) to the
    sequence's end. Labels inside it can be IGNORE (a planted slip), so the mask is read from
    the labels: the closing tag, answer and EOS after a slip stay in the window and the KL.
    """
    labels, _ = shifted(batch)  # labels[:, t] is the token logits[:, t] predicts
    starts = (labels != IGNORE).float().argmax(1)
    lengths = batch["attention_mask"].sum(1) - 1 - starts
    offsets = torch.arange(int(lengths.max()), device=logits.device)[None]
    idx = (starts[:, None] + offsets).clamp(max=labels.shape[1] - 1)
    mask = (offsets < lengths[:, None]) & (labels.gather(1, idx) != IGNORE)
    picked = logits[:, :-1].gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
    return picked, mask


# ---------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def token_accuracy(model, examples, pad_id: int, batch_size: int = 16) -> dict:
    """Teacher-forced next-token accuracy on held-out trace and answer tokens.

    overall: over every labelled token (trace, closer, answer, EOS); per strategy: over the
    tokens inside that strategy's segments; answer: over the answer tokens.
    """
    model.eval()
    hits = torch.zeros(len(STRATEGIES) + 2)
    counts = torch.zeros(len(STRATEGIES) + 2)
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels, group = shifted(batch)
        ok = (logits[:, :-1].argmax(-1) == labels) & (labels != IGNORE)
        valid = labels != IGNORE
        hits[-1] += ok.sum().item()
        counts[-1] += valid.sum().item()
        for g in range(len(STRATEGIES) + 1):
            sel = group == g
            hits[g] += (ok & sel).sum().item()
            counts[g] += (valid & sel).sum().item()
    rate = lambda g: (hits[g] / counts[g]).item() if counts[g] > 0 else None  # noqa: E731
    per = {s: rate(i) for i, s in enumerate(STRATEGIES) if counts[i] > 0}
    return {"token_accuracy": rate(-1), "answer_token_accuracy": rate(ANSWER), "per_strategy": per}


def convergence(acc: dict, cfg: BakeConfig) -> dict:
    """The rule: overall >= converge_overall and every strategy >= frac * that threshold."""
    overall = acc.get("token_accuracy") or 0.0
    floor = cfg.converge_overall * cfg.converge_strategy_frac
    lagging = sorted(s for s, v in acc.get("per_strategy", {}).items() if v is not None and v < floor)
    return {"converged": overall >= cfg.converge_overall and not lagging, "overall": overall,
            "overall_threshold": cfg.converge_overall, "strategy_threshold": floor,
            "lagging_strategies": lagging}


# ---------------------------------------------------------------------------------------
# The trainer: a Stage of training/loop.py


class Baker(LoopTrainer):
    """Runs Step 1 on (model, tokenizer); resumable from `out_dir/checkpoints`."""

    def __init__(self, model, tokenizer, cfg: BakeConfig, out_dir: str | Path, tracker=None):
        self.cfg, self.tokenizer, self.tracker = cfg, tokenizer, tracker
        self.out_dir = Path(out_dir)
        add_thinking_tokens(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.loop = TrainingLoop(_maybe_lora(model, tokenizer, cfg), LoopConfig(
            steps=cfg.steps, stage="bake", warmup_steps=cfg.warmup_steps, decay=True, grad_accum=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm, save_every=cfg.save_every, explode_factor=cfg.explode_factor,
            mixed_precision=cfg.mixed_precision, seed=cfg.seed, batch_log="examples"), out_dir, tracker)
        self.teacher = None
        self.kl_data: dict = {}  # kl mode: where the last prompt's responses came from, how many, how long
        self.examples, self.teacher_examples, self.held = [], None, []

    def _setup(self, resume: bool) -> int:
        return self.loop.setup(lambda m: build_step1_optimizer(m, self.cfg)[0], self, resume)

    # -- the Stage: one step's micro-batches, their loss, the step's row, evaluation ---------
    def micro_batches(self, step: int):
        """The step's grad_accum micro-batches (this process's slice of each), collated."""
        acc, cfg, n = self.accelerator, self.cfg, len(self.examples)
        self.model.train()
        self.used = []
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, cfg, n, acc.process_index, acc.num_processes, self.lengths)
            self.used += batch_indices(step, micro, cfg, n, lengths=self.lengths)  # the global batch, for the log
            batch = self._collate([self.examples[i] for i in idx])
            teacher = self._collate([self.teacher_examples[i] for i in idx]) if cfg.mode == "kl" else None
            yield batch, teacher

    def _collate(self, examples) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in collate(examples, self.pad_id).items()}

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        batch, teacher_batch = micro
        if self.cfg.mode == "kl":
            return kl_loss(self.model, self.teacher, batch, teacher_batch, self.cfg.kl_top_k), {}
        return sft_loss(self.model, batch), {}

    def step_row(self, step: int, sums: dict) -> dict:
        return {"examples": self.used}

    def on_step_end(self, step: int, row: dict) -> bool:
        """Held-out token accuracy every eval_every steps; True (this prompt is done) once a
        half-baking kl_target is reached."""
        cfg = self.cfg
        if cfg.eval_every and step % cfg.eval_every == 0:
            self._log_eval(step, self.held)
        return cfg.mode == "kl" and cfg.kl_target is not None and row["loss"] < cfg.kl_target

    def state(self) -> dict:
        return {"mode": self.cfg.mode}

    # -- run ------------------------------------------------------------------------------
    def run(self, train_records, eval_records, resume: bool = False, progress=None) -> BakeResult:
        """Train (sft: on the records' traces; kl: bake each prompt in turn) and measure."""
        cfg = self.cfg
        self.held, _ = encode_records(eval_records, self.tokenizer, max_len=cfg.max_len)
        if cfg.mode == "kl":
            step, dropped = self._run_kl(train_records, resume, progress)
        else:
            examples, dropped = encode_records(train_records, self.tokenizer, max_len=cfg.max_len)
            if not examples:
                raise ValueError("no training example fits in max_len; raise max_len or check the data")
            step = self._train_span(self._setup(resume), cfg.steps, examples, None, progress)
        metrics = self.final_metrics(self.held, dropped, step)
        return BakeResult(step, metrics, metrics["convergence"]["converged"], self.history)

    def _run_kl(self, records, resume: bool, progress) -> tuple[int, int]:
        """Bake cfg.kl_prompts one after another; returns (steps done, pairs dropped for length)."""
        cfg = self.cfg
        if cfg.kl_source not in ("sampled", "dataset"):
            raise ValueError(f"kl_source must be 'sampled' or 'dataset', not {cfg.kl_source!r}")
        # Copied before _setup: on --resume a checkpoint overwrites self.model, and the first
        # prompt's teacher is the input model, never the partly baked one.
        original = copy.deepcopy(self.model).eval().requires_grad_(False)
        step = self._setup(resume)
        per_prompt = math.ceil(cfg.steps / len(cfg.kl_prompts))
        dropped = 0
        for p_i, prompt in enumerate(cfg.kl_prompts):
            end = min(cfg.steps, (p_i + 1) * per_prompt)
            if step >= end:
                continue
            self.teacher = original if p_i == 0 else self._sequential_teacher(p_i, step > p_i * per_prompt)
            original = None
            students, teachers, dropped = self._kl_pairs(prompt, records, p_i)
            step = self._train_span(step, end, students, teachers, progress)
        return step, dropped

    def _train_span(self, step, end, examples, teacher_examples, progress) -> int:
        """Train on `examples` from `step` to `end`; a stop (kl_target reached) ends the span."""
        self.examples, self.teacher_examples = examples, teacher_examples
        self.lengths = tuple(len(e.input_ids) for e in examples)  # the length-grouping key, once per span
        reached = self.loop.run(self, step, end, progress)
        return end if reached < end else reached

    def _sequential_teacher(self, p_i: int, resumed: bool):
        """Prompt p_i's teacher: the model as the prompts before it baked it. Saved as the
        prompt starts, since a run resumed inside the prompt's span has moved on from it."""
        teacher = copy.deepcopy(self.loop.unwrapped()).eval().requires_grad_(False)
        path = self.ckpt_dir / f"teacher-{p_i}.safetensors"
        if resumed:
            if not path.exists():
                raise FileNotFoundError(f"{path}: prompt {p_i}'s teacher was not saved; bake again without --resume")
            teacher.load_state_dict(load_file(path), strict=False)  # tied weights are stored once
            if hasattr(teacher, "tie_weights"):
                teacher.tie_weights()
            return teacher
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(teacher), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        self.accelerator.wait_for_everyone()
        return teacher

    def _kl_pairs(self, prompt: str, records, p_i: int):
        """(student, teacher, dropped) examples for one prompt, from the source cfg.kl_source names."""
        cfg, context = self.cfg, _context_length(self.teacher)
        if cfg.kl_source == "dataset":
            students, teachers, dropped = encode_pairs(records, self.tokenizer, prompt, cfg.max_len, context)
        else:
            students, teachers, dropped = sample_pairs(
                self.teacher, self.tokenizer, [r.question for r in records], prompt, n=cfg.kl_samples,
                max_new_tokens=cfg.kl_max_new_tokens, max_len=cfg.max_len, temperature=cfg.kl_temperature,
                seed=cfg.seed * 1000 + p_i, context=context, batch_size=GENERATION_BATCH)
        if not students:
            raise ValueError("no training example fits in max_len; raise max_len or check the data")
        responses = [len(e.input_ids) - e.prompt_len for e in students]
        self.kl_data = {"kl_source": cfg.kl_source, "kl_pairs": len(students),
                        "kl_mean_response_tokens": sum(responses) / len(responses)}
        return students, teachers, dropped

    def _log_eval(self, step: int, held) -> None:
        model = self.loop.unwrapped()
        acc = token_accuracy(model, held, self.pad_id)
        self.history.append({"step": step, **acc})
        if self.tracker is not None:
            flat = {"token_accuracy": acc["token_accuracy"],
                    **{f"acc_{s}": v for s, v in acc["per_strategy"].items()}}
            self.tracker.log(flat, step=step, stage="bake_eval")

    def final_metrics(self, held, dropped: int, step: int) -> dict:
        model = self.loop.unwrapped()
        acc = token_accuracy(model, held, self.pad_id)
        losses = [h["loss"] for h in self.history if "loss" in h]
        return {"steps": step, "dropped_for_length": dropped, **acc, **self.kl_data,
                "final_loss": losses[-1] if losses else None,
                "first_loss": losses[0] if losses else None,
                "sec_per_step": next((h["sec_per_step"] for h in reversed(self.history) if "loss" in h), None),
                "convergence": convergence(acc, self.cfg)}

    def merged_model(self):
        """The trained model as a plain transformers model (LoRA merged in)."""
        model = self.loop.unwrapped()
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def build_step1_optimizer(model, cfg: BakeConfig):
    """(optimizer, qk_clip_stats_source): AdamW, or MuGrokfast's baking preset.

    MuGrokfast applies QK-clip itself after each step; `qk_clip_log` puts what it did in the step log.
    """
    from dataclasses import replace

    from agent_forge.optim.mugrokfast import build_optimizer, get_config

    preset = replace(get_config("baking"), weight_decay=cfg.weight_decay)
    return build_optimizer(model, cfg.optimizer, preset, lr=cfg.lr), None


def _context_length(model) -> int | None:
    """The longest sequence the model's positions cover, if its config says."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _maybe_lora(model, tokenizer, cfg: BakeConfig):
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    from agent_forge.vocab import thinking_token_ids

    new_ids = sorted(thinking_token_ids(tokenizer).values())
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                      trainable_token_indices=new_ids, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)
