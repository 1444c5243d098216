"""The one training loop every trainer runs on (Step 1 SFT and KL, answer-level RL,
token-level RL; next BitNet QAT and Cognate).

The loop owns what every trainer needs and none should re-implement: HF Accelerate (one code
path for CPU, one GPU and many processes under `accelerate launch` / torchrun), gradient
accumulation, clipping, the warm-up (then constant or linear-decay) schedule, the NaN /
explosion guard (checked before saving, so a bad step never becomes the "last good"
checkpoint), atomic checkpoints that resume exactly (weights, optimiser, scheduler, RNG,
step, the step history, the stage's own state), the batch log, metrics (history, tracker)
and progress.

A trainer is a `Stage`: it says what one step's micro-batches are and what each one's loss
is, turns the step's figures into a metrics row, and may hook evaluation after a step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from agent_forge.optim.mugrokfast import qk_clip_log
from agent_forge.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from agent_forge.training.guards import check_loss

BATCH_LOG = "batches.jsonl"


@dataclass
class LoopConfig:
    """What the loop needs from a trainer's config."""

    steps: int  # optimiser steps of the whole run
    stage: str  # tracker stage name of the step rows
    warmup_steps: int = 0  # linear warm-up over this many steps (at least 1) ...
    decay: bool = False  # ... then linear decay to 0 at `steps` (True) or constant (False)
    grad_accum: int = 1  # each micro-batch's loss is divided by this (equal-weight accumulation)
    max_grad_norm: float = 1.0
    save_every: int = 0  # steps between checkpoints; 0 = never
    explode_factor: float | None = None  # stop when loss > this x the first loss; None: NaN/inf only
    mixed_precision: str = "auto"  # "auto" (bf16 on capable GPUs), "no", "bf16", "fp16"
    seed: int | None = None  # torch.manual_seed before the optimiser is built; None = leave the RNG
    batch_log: str | None = None  # row key written to batches.jsonl per step (and kept out of metrics)


class Stage(Protocol):
    """What a trainer supplies. Optional hooks (looked up with getattr): `before_update()` and
    `after_update()` around optimizer.step(); `on_step_end(step, row) -> bool` (evaluation,
    monitors; True stops the run); `state() -> dict` saved with each checkpoint and
    `load_state(state)` on resume."""

    def micro_batches(self, step: int) -> Iterable[Any]:
        """The micro-batches of step `step` (any per-step work, e.g. sampling, happens here)."""

    def loss(self, micro: Any) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, figures of this micro-batch to sum over the step)."""

    def step_row(self, step: int, sums: dict) -> dict:
        """The step's metrics from the summed figures; a "loss" here overrides the loop's sum."""


def rolling_mean(history: list[dict], key: str, value: float, window: int) -> float:
    """Mean of `value` and the `key` of the last window - 1 history rows that have it: a
    rolling figure that needs no state of its own (the history resumes with the checkpoint)."""
    earlier = [h[key] for h in history if key in h][-(window - 1):] if window > 1 else []
    return (sum(earlier) + value) / (len(earlier) + 1)


def precision(name: str) -> str:
    """Accelerate's mixed_precision for a config value; "auto" = bf16 where the GPU has it."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def warmup_factor(step: int, warmup: int, total: int, decay: bool) -> float:
    """The learning-rate multiplier of step `step`: (step+1)/warmup during warm-up, then 1
    (constant) or a linear decay reaching 0 at `total`."""
    warm = max(1, warmup)
    if step < warm:
        return (step + 1) / warm
    if not decay:
        return 1.0
    return max(0.0, (total - step) / max(1, total - warm))


class TrainingLoop:
    """Trains one prepared model with one optimiser; resumable from `out_dir/checkpoints`."""

    def __init__(self, model, cfg: LoopConfig, out_dir: str | Path, tracker=None):
        from accelerate import Accelerator

        self.cfg, self.tracker, self.model = cfg, tracker, model
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # cpu=True is what makes torchrun on CPU real DDP (gloo); without it every rank trains alone.
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.accelerator = Accelerator(mixed_precision=precision(cfg.mixed_precision), cpu=on_cpu)
        self.optimizer = self.scheduler = None
        self.history: list[dict] = []
        self.first_loss: float | None = None

    # -- setup ----------------------------------------------------------------------------
    def setup(self, build_optimizer: Callable, stage: Stage, resume: bool = False) -> int:
        """Build the optimiser and schedule, restore the latest checkpoint when resuming,
        prepare for Accelerate; returns the step to start from."""
        cfg = self.cfg
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        self.optimizer = build_optimizer(self.model)
        schedule = partial(warmup_factor, warmup=cfg.warmup_steps, total=cfg.steps, decay=cfg.decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        start, ckpt = 0, latest_checkpoint(self.ckpt_dir) if resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            start = state["step"]
            loop = state.get("loop", {})  # the steps before the kill: reports read the first step's row
            self.history, self.first_loss = list(loop.get("history", [])), loop.get("first_loss")
            if hasattr(stage, "load_state"):
                stage.load_state(state)
            if cfg.batch_log and self.accelerator.is_main_process:
                truncate_log(self.out_dir / BATCH_LOG, start)
        elif cfg.batch_log and self.accelerator.is_main_process:
            (self.out_dir / BATCH_LOG).unlink(missing_ok=True)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        return start

    # -- one step -------------------------------------------------------------------------
    def accumulate(self, stage: Stage, micros: Iterable) -> dict:
        """Forward and backward every micro-batch (gradients accumulate); returns the summed
        figures, with "loss" the step's loss (mean over processes)."""
        acc, total, sums = self.accelerator, 0.0, {}
        for micro in micros:
            with acc.autocast():
                loss, parts = stage.loss(micro)
            acc.backward(loss / self.cfg.grad_accum)
            total += float(loss.detach()) / self.cfg.grad_accum
            for k, v in parts.items():
                sums[k] = v if sums.get(k) is None else (sums[k] if v is None else sums[k] + v)
        sums["loss"] = acc.reduce(torch.tensor(total, device=acc.device), reduction="mean").item()
        return sums

    def train_step(self, step: int, stage: Stage) -> dict:
        """One optimiser step: accumulate, clip, update, schedule; the stage's row plus
        loss, grad_norm, lr and (MuGrokfast) what QK-clip did."""
        sums = self.accumulate(stage, stage.micro_batches(step))
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        _hook(stage, "before_update")
        self.optimizer.step()
        _hook(stage, "after_update")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        row = {"loss": sums["loss"], **stage.step_row(step, sums)}
        return {**row, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                **qk_clip_log(self.optimizer)}

    # -- the loop -------------------------------------------------------------------------
    def run(self, stage: Stage, start: int, end: int | None = None, progress: Callable | None = None) -> int:
        """Steps start .. end-1 (default: to cfg.steps); returns the step reached (less than
        `end` when the stage's on_step_end asked to stop). Each step: train, log, guard, the
        stage's on_step_end (an evaluation it records goes into the checkpoint's state, so a
        resume keeps it), checkpoint, progress(step, total, row)."""
        cfg = self.cfg
        end = cfg.steps if end is None else end
        step, started = start, time.time()
        while step < end:
            row = self.train_step(step, stage)
            step += 1
            self.log_step(step, row, (time.time() - started) / (step - start))
            if self.first_loss is None:
                self.first_loss = row["loss"]
            first = self.first_loss if cfg.explode_factor else None
            check_loss(row["loss"], first, step, self.ckpt_dir, cfg.explode_factor or 0.0)  # before saving
            stop = _hook(stage, "on_step_end", step, row)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                self.save(step, stage)
            if progress is not None:
                progress(step, cfg.steps, row)
            if stop:
                break
        return step

    def log_step(self, step: int, row: dict, sec_per_step: float) -> None:
        """The row to the history and the tracker; its batch (cfg.batch_log) to batches.jsonl."""
        entry = dict(row)
        if self.cfg.batch_log:
            batch = entry.pop(self.cfg.batch_log)
            if self.accelerator.is_main_process:
                with open(self.out_dir / BATCH_LOG, "a") as f:
                    f.write(json.dumps({"step": step, self.cfg.batch_log: batch}) + "\n")
        entry["sec_per_step"] = sec_per_step
        self.history.append({"step": step, **entry})
        if self.tracker is not None:  # with the stage's total, so a reader of metrics.jsonl can show n / N
            self.tracker.log({**entry, "steps_total": self.cfg.steps}, step=step, stage=self.cfg.stage)

    def save(self, step: int, stage: Stage) -> None:
        """An atomic checkpoint of everything resume needs (main process writes it)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            opt = getattr(self.optimizer, "optimizer", self.optimizer)
            state = {**(stage.state() if hasattr(stage, "state") else {}),
                     "loop": {"history": self.history, "first_loss": self.first_loss}}
            save_checkpoint(self.ckpt_dir, step, acc.unwrap_model(self.model), opt, self.scheduler, state)
        acc.wait_for_everyone()

    def unwrapped(self):
        """The model without Accelerate's wrappers."""
        return self.accelerator.unwrap_model(self.model)


class LoopTrainer:
    """What a trainer that keeps its TrainingLoop in `self.loop` exposes: the model being
    trained (as prepared), the step history, the accelerator, checkpoints."""

    loop: TrainingLoop

    @property
    def model(self):
        return self.loop.model

    @property
    def history(self) -> list[dict]:
        return self.loop.history

    @property
    def accelerator(self):
        return self.loop.accelerator

    @property
    def ckpt_dir(self) -> Path:
        return self.loop.ckpt_dir

    def save_checkpoint(self, step: int) -> None:
        self.loop.save(step, self)


def _hook(stage, name: str, *args):
    fn = getattr(stage, name, None)
    return fn(*args) if fn is not None else None
