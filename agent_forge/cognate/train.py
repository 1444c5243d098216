"""Training a Cognate model on the curriculum, as a Stage of the project's one training loop.

`CurriculumTrainer` draws each step's blocks from one curriculum pool, the pools taking equal
shares of the run in order (foundation alone; reasoning then advanced for a specialisation).
Its loss is the model's own: next-token cross-entropy + ponder_cost_weight x mean ponder
cost (ACT). The loop owns Accelerate, checkpoints, --resume, the NaN guard and progress.
Blocks are drawn by a generator seeded from (seed, step, micro-batch, process), so a resumed
run sees exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from agent_forge.training.loop import LoopConfig, LoopTrainer, TrainingLoop


@dataclass
class CognateTrainConfig:
    """Optimisation settings shared by the foundation and the specialisation runs."""

    foundation_steps: int = 2000  # steps of the shared trunk on the foundation stage
    specialise_steps: int = 1000  # steps of each specialisation (reasoning, then advanced data)
    batch_size: int = 0  # blocks per micro-batch; 0 = the most the free memory holds (sizing.py)
    grad_accum: int = 1
    lr: float = 2e-3  # peak learning rate (Muon and AdamW); warm-up then linear decay
    warmup_steps: int = 50
    optimizer: str = "mugrokfast"  # mugrokfast (the "cognate" preset) or adamw
    max_grad_norm: float = 1.0
    save_every: int = 100  # steps between resume checkpoints
    seed: int = 0
    mixed_precision: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_cognate_optimizer(model, cfg: CognateTrainConfig):
    from agent_forge.optim.mugrokfast import build_optimizer

    return build_optimizer(model, cfg.optimizer, "cognate", lr=cfg.lr)


class CurriculumTrainer(LoopTrainer):
    """One training run of a Cognate model over curriculum pools (each (blocks, seq_len))."""

    def __init__(self, model, pools: list[torch.Tensor], steps: int, cfg: CognateTrainConfig,
                 out_dir: str | Path, stage: str, tracker=None):
        if not pools or any(len(p) == 0 for p in pools):
            raise ValueError("every curriculum pool needs at least one block")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size {cfg.batch_size}: choose it before training (phase.train_config)")
        self.cfg, self.pools, self.tokens_seen = cfg, pools, 0
        self.loop = TrainingLoop(model, LoopConfig(
            steps=steps, stage=stage, warmup_steps=cfg.warmup_steps, decay=True, grad_accum=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm, save_every=cfg.save_every, mixed_precision=cfg.mixed_precision,
            seed=cfg.seed), out_dir, tracker)

    # -- the Stage ------------------------------------------------------------------------
    def pool_for(self, step: int) -> int:
        return min(step * len(self.pools) // max(1, self.loop.cfg.steps), len(self.pools) - 1)

    def micro_batches(self, step: int):
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        pool = self.pools[self.pool_for(step)]
        self.step_tokens = 0
        for micro in range(cfg.grad_accum):
            seed = ((cfg.seed * 1_000_003 + step) * 131 + micro) * 1009 + acc.process_index
            idx = torch.randint(len(pool), (cfg.batch_size,), generator=torch.Generator().manual_seed(seed))
            batch = pool[idx]
            self.step_tokens += batch.numel()
            yield batch.to(acc.device)

    def loss(self, ids: torch.Tensor):
        """The model's loss; LM loss, ponder cost and halting steps apart (a plain causal LM,
        as the transformer control is, has no ponder: 0)."""
        out = self.model(input_ids=ids, labels=ids, use_cache=False)
        lm = getattr(out, "lm_loss", None)
        ponder, steps = getattr(out, "ponder_cost", None), getattr(out, "halting_steps", None)
        return out.loss, {"lm_loss": float((out.loss if lm is None else lm).detach()),
                          "ponder": 0.0 if ponder is None else float(ponder.detach()),
                          "halting_steps": 0.0 if steps is None else float(steps.float().mean())}

    def step_row(self, step: int, sums: dict) -> dict:
        self.tokens_seen += self.step_tokens
        k = self.cfg.grad_accum
        return {"lm_loss": sums["lm_loss"] / k, "ponder": sums["ponder"] / k,
                "halting_steps": sums["halting_steps"] / k, "pool": self.pool_for(step),
                "tokens": self.tokens_seen}

    def state(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state(self, state: dict) -> None:
        self.tokens_seen = int(state.get("tokens_seen", 0))

    # -- run ------------------------------------------------------------------------------
    def run(self, resume: bool = False, progress=None) -> dict:
        """Train to the configured steps; returns first/last figures and throughput."""
        start = self.loop.setup(lambda m: build_cognate_optimizer(m, self.cfg), self, resume)
        reached = self.loop.run(self, start, progress=progress)
        rows = [h for h in self.history if "loss" in h]  # the steps this process ran
        seconds = rows[-1]["sec_per_step"] * len(rows) if rows else 0.0  # sec_per_step: running mean
        tokens = len(rows) * self.cfg.batch_size * self.cfg.grad_accum * self.pools[0].shape[1]
        return {"steps": reached, "resumed_from": start, "tokens_seen": self.tokens_seen,
                "first": _figures(rows[0]) if rows else None, "last": _figures(rows[-1]) if rows else None,
                "train_tokens_per_s": tokens / seconds if seconds else None}


def _figures(row: dict) -> dict:
    return {k: row.get(k) for k in ("step", "loss", "lm_loss", "ponder", "halting_steps", "tokens")}
