"""Checks before long work: is there room on disk for checkpoints and in memory for training?

They run in seconds and fail with a message that says what to free or change, instead of
a crash an hour in.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from agent_forge.training.checkpoint import KEEP_CHECKPOINTS


class PreflightError(RuntimeError):
    """Not enough disk or memory; the message says how much is needed and how much is free."""


@dataclass
class Needs:
    disk_bytes: int
    memory_bytes: int


def checkpoints_on_disk(steps: int, save_every: int, keep: int = KEEP_CHECKPOINTS) -> int:
    """How many checkpoints a training run holds at its peak: it saves every `save_every`
    steps before the last, keeps the newest `keep`, and writes a new one before pruning."""
    written = (steps - 1) // save_every if save_every and steps > 0 else 0
    return min(written, keep + 1)


def training_memory(n_param_bytes: int) -> int:
    """Weights, gradients, two optimiser moments, a frozen reference copy, and activations
    (budgeted as one more copy of the weights)."""
    return n_param_bytes * 6


def check(out_dir: str | Path, needs: Needs, free_memory_bytes: int) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(out).free
    report = {"disk_needed_gb": needs.disk_bytes / 1e9, "disk_free_gb": free_disk / 1e9,
              "memory_needed_gb": needs.memory_bytes / 1e9, "memory_free_gb": free_memory_bytes / 1e9}
    if free_disk < needs.disk_bytes:
        raise PreflightError(f"not enough disk in {out}: {free_disk / 1e9:.1f} GB free, about "
                             f"{needs.disk_bytes / 1e9:.1f} GB needed for checkpoints and models")
    if free_memory_bytes < needs.memory_bytes:
        raise PreflightError(f"not enough memory: {free_memory_bytes / 1e9:.1f} GB free, about "
                             f"{needs.memory_bytes / 1e9:.1f} GB needed to train this model; use a smaller "
                             "model, LoRA (bake.lora: true) or a device with more memory")
    return report
