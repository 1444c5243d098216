"""Quantisation-aware fine-tuning: the ternary student learns from its full-precision self.

Converting a trained model to ternary weights in one step destroys it (Hugging Face's 1.58-bit
fine-tuning saw the loss jump to ~13). So the quantisation strength lambda rises linearly
from 0 to 1 over `strength_warmup` steps (each BitLinear blends full-precision and quantised
weights and activations; 0 is the original model exactly), and the student trains on
reasoning traces with two terms:

- distillation: KL(teacher || student) over the vocabulary at every trace and answer token,
  the teacher being the frozen Phase 3 model; this is what keeps the *thinking*, not only
  the answers (`training.kl.kl_ref_to_policy`);
- the plain next-token loss on the same tokens;
- optionally (`hidden_weight`), each decoder layer's output pulled towards the teacher's at
  every token, as TernaryBERT distils hidden states: a per-layer signal, so a layer far down
  the stack need not wait for the logits to tell it what broke.

With `progressive` set, the decoder layers are quantised one after another within the same
warm-in instead of all at once.

It is a Stage of the project's one training loop (checkpoints, --resume, NaN guard,
progress, W&B offline), so nothing here re-implements a loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from agent_forge.bitnet.convert import layer_groups, set_strength
from agent_forge.quietstar.bake import batch_indices, build_step1_optimizer  # AdamW or MuGrokfast, as Step 1
from agent_forge.quietstar.bake_data import IGNORE, collate, shifted
from agent_forge.training.kl import kl_ref_to_policy
from agent_forge.training.loop import LoopConfig, LoopTrainer, TrainingLoop


@dataclass
class QATConfig:
    """Quantisation-aware fine-tuning settings (sizes by preset in bitnet/phase.py)."""

    steps: int = 200  # optimiser steps
    batch_size: int = 8  # sequences per step (split into grad_accum micro-batches); 0 = by free memory (bitnet/phase.py)
    grad_accum: int = 1
    # Peak learning rate (linear warm-up, then linear decay to 0). Ternary weights only move
    # when a weight crosses a rounding boundary: bench/bench_bitnet_qat.py, 40 steps on the
    # default model, held-out distillation KL 1.65 at 2e-4, 0.92 at 1e-3, 1.19 at 3e-3.
    lr: float = 1e-3
    warmup_steps: int = 10  # learning-rate warm-up
    strength_warmup: int = 50  # lambda = min(step / strength_warmup, 1); 0 = fully ternary from step 0
    # "none": every layer follows lambda together. "forward" / "backward": decoder layers are
    # quantised one after another over the same strength_warmup steps (input side first, or
    # output side first), so the layers not yet quantised can adapt to the ones that are.
    progressive: str = "none"
    # Where the ternary codes start. "nearest": every weight rounded on its own (the paper's
    # recipe), eased in by the lambda warm-in. "gptq": GPTQ's error-compensating rounding on
    # calibration traces (bitnet/gptq.py), fully ternary from step 0 (strength_warmup 0).
    init: str = "nearest"
    gptq_batches: int = 8  # calibration batches of batch_size traces for init "gptq"
    kd_weight: float = 1.0  # weight of KL(teacher || student) on trace and answer tokens
    lm_weight: float = 0.5  # weight of the next-token loss on the same tokens
    # weight of the layer-output term (hidden_distill_loss): each decoder layer's output vs the
    # teacher's, squared error relative to the teacher's norm, per token; 0 = off
    hidden_weight: float = 0.0
    kl_top_k: int | None = 64  # top-k KL bound (bounded memory); None = exact over the vocabulary
    optimizer: str = "adamw"  # adamw or mugrokfast
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 256  # longest training sequence in tokens (longer records are dropped)
    group_by_length: bool = True  # micro-batches of similar length (less padding)
    save_every: int = 25  # steps between resume checkpoints
    # Stop when the loss exceeds this x the first loss. None (NaN/inf still stop the run):
    # at lambda ~ 0 the student is the teacher, so the first loss is only the LM term on
    # traces the teacher was trained on (0.079 on the demo model), and the warm-in itself
    # raises it 20x by step 10 (1.6): a ratio to the first loss stopped a healthy run.
    explode_factor: float | None = None
    mixed_precision: str = "auto"
    seed: int = 0
    eval_every: int = 0  # steps between validation accuracy measurements (0 = never): the curve
    eval_samples: int = 40  # validation questions per measurement

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROGRESSIVE = ("none", "forward", "backward")


def strength_at(step: int, warmup: int) -> float:
    """lambda for optimiser step `step` (0-based): min(step / warmup, 1); 1 when warmup is 0."""
    return 1.0 if warmup <= 0 else min(step / warmup, 1.0)


def strengths_at(step: int, warmup: int, n_groups: int, progressive: str = "none") -> list[float]:
    """lambda of each of `n_groups` layer groups (input side first) at optimiser step `step`.

    "none": all at strength_at(step, warmup). "forward": the warm-up is cut into n_groups
    equal windows and group i ramps 0 -> 1 in window i, i.e. clamp(step * n / warmup - i, 0, 1);
    "backward": the same with the groups taken from the output side. All are 1 from `warmup` on."""
    if progressive not in PROGRESSIVE:
        raise ValueError(f"qat.progressive must be one of {', '.join(PROGRESSIVE)}, not {progressive!r}")
    if progressive == "none" or warmup <= 0:
        return [strength_at(step, warmup)] * n_groups
    ramp = [min(max(step * n_groups / warmup - i, 0.0), 1.0) for i in range(n_groups)]
    return ramp if progressive == "forward" else ramp[::-1]


def distill_loss(student_logits, teacher_logits, labels, kd_weight: float, lm_weight: float,
                 top_k: int | None) -> tuple[torch.Tensor, dict]:
    """kd_weight * KL(teacher || student) + lm_weight * cross-entropy, both over the labelled
    (trace and answer) positions. Logits are already aligned with `labels` (B, T)."""
    mask = labels != IGNORE
    kd = kl_ref_to_policy(teacher_logits, student_logits, mask, top_k)
    lm = F.cross_entropy(student_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    return kd_weight * kd + lm_weight * lm, {"kd": float(kd.detach()), "lm": float(lm.detach())}


def hidden_distill_loss(student_hidden, teacher_hidden, mask) -> torch.Tensor:
    """Mean over layers and over the tokens where `mask` is true of ||h_s - h_t||^2 / ||h_t||^2.

    Relative per token, so the few tokens with very large activations (the attention sink)
    weigh no more than any other. Hidden states are (B, T, D) per layer; pass the layer outputs
    only (the embeddings are kept in full precision and are identical)."""
    sel = mask.bool()
    if not sel.any():
        return student_hidden[0].sum() * 0.0
    terms = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        s, t = hs[sel].float(), ht[sel].float()
        terms.append(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean())
    return torch.stack(terms).mean()


class QATTrainer(LoopTrainer):
    """Fine-tunes a converted (BitLinear) student against a frozen teacher; resumable."""

    def __init__(self, student, teacher, tokenizer, cfg: QATConfig, out_dir: str | Path, tracker=None,
                 evaluate=None):
        self.cfg, self.tokenizer, self.teacher = cfg, tokenizer, teacher.eval().requires_grad_(False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.evaluate = evaluate  # (step, model) -> dict, every cfg.eval_every steps
        self.curve: list[dict] = []
        self.tokens_seen = 0
        self.loop = TrainingLoop(student, LoopConfig(
            steps=cfg.steps, stage="bitnet_qat", warmup_steps=cfg.warmup_steps, decay=True,
            grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, save_every=cfg.save_every,
            explode_factor=cfg.explode_factor, mixed_precision=cfg.mixed_precision, seed=cfg.seed),
            out_dir, tracker)

    # -- the Stage ------------------------------------------------------------------------
    def micro_batches(self, step: int):
        """Set each layer's lambda for this step, then yield its micro-batches (this process's share)."""
        acc, cfg, n = self.accelerator, self.cfg, len(self.examples)
        strengths = strengths_at(step, cfg.strength_warmup, len(self.groups), cfg.progressive)
        for group, strength in zip(self.groups, strengths):
            for layer in group:
                layer.strength = strength
        self.strength = sum(strengths) / len(strengths)  # logged: the mean over layer groups
        self.model.train()
        self.step_tokens = 0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, cfg, n, acc.process_index, acc.num_processes, self.lengths)
            batch = collate([self.examples[i] for i in idx], self.pad_id)
            self.step_tokens += int(batch["attention_mask"].sum())
            yield {k: v.to(acc.device) for k, v in batch.items()}

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        ids, mask, hidden = batch["input_ids"], batch["attention_mask"], self.cfg.hidden_weight > 0
        student = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        labels, _ = shifted(batch)
        loss, parts = distill_loss(student.logits[:, :-1], teacher.logits[:, :-1], labels, self.cfg.kd_weight,
                                   self.cfg.lm_weight, self.cfg.kl_top_k)
        if hidden:
            h = hidden_distill_loss(student.hidden_states[1:], teacher.hidden_states[1:], mask)
            loss, parts["hidden"] = loss + self.cfg.hidden_weight * h, float(h.detach())
        return loss, parts

    def step_row(self, step: int, sums: dict) -> dict:
        self.tokens_seen += self.step_tokens
        k = self.cfg.grad_accum
        row = {"kd": sums["kd"] / k, "lm": sums["lm"] / k, "strength": self.strength, "tokens": self.tokens_seen}
        if "hidden" in sums:
            row["hidden"] = sums["hidden"] / k
        return row

    def on_step_end(self, step: int, row: dict) -> bool:
        if self.evaluate is not None and self.cfg.eval_every and step % self.cfg.eval_every == 0:
            point = {"step": step, "tokens": self.tokens_seen, "strength": self.strength,
                     **self.evaluate(step, self.loop.unwrapped())}
            self.curve.append(point)
            if self.loop.tracker is not None:  # the record carries the step itself
                self.loop.tracker.log({k: v for k, v in point.items() if k != "step"}, step=step,
                                      stage="bitnet_curve")
        return False

    def state(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "curve": self.curve}

    def load_state(self, state: dict) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.curve = list(state.get("curve", []))

    # -- run ------------------------------------------------------------------------------
    def run(self, examples, resume: bool = False, progress=None) -> dict:
        """Train for cfg.steps on the encoded examples; returns the run's figures."""
        if not examples:
            raise ValueError("no training example fits in max_len; raise max_len or check the data")
        self.examples = examples
        self.lengths = tuple(len(e.input_ids) for e in examples) if self.cfg.group_by_length else None
        start = self.loop.setup(lambda m: build_step1_optimizer(m, self.cfg)[0], self, resume)
        self.groups = layer_groups(self.loop.unwrapped())
        reached = self.loop.run(self, start, progress=progress)
        set_strength(self.loop.unwrapped(), 1.0)  # the saved and evaluated model is fully ternary
        losses = [h for h in self.history if "loss" in h]
        return {"steps": reached, "examples": len(examples), "tokens_seen": self.tokens_seen,
                "first": _figures(losses[0]) if losses else None, "last": _figures(losses[-1]) if losses else None,
                "sec_per_step": losses[-1]["sec_per_step"] if losses else None, "curve": self.curve}


def _figures(row: dict) -> dict:
    return {k: row.get(k) for k in ("step", "loss", "kd", "lm", "strength", "tokens")}
