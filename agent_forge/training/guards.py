"""Stop a run whose loss has gone bad, and say where the last good checkpoint is."""

from __future__ import annotations

import math
from pathlib import Path

from agent_forge.training.checkpoint import latest_checkpoint


def check_loss(loss: float, first_loss: float | None, step: int, ckpt_dir: Path,
               explode_factor: float = 10.0) -> None:
    """Raise FloatingPointError if `loss` is NaN/inf or `explode_factor` x the first loss."""
    bad = not math.isfinite(loss)
    exploded = (not bad and first_loss is not None and math.isfinite(first_loss) and first_loss > 0
                and loss > explode_factor * first_loss)
    if not (bad or exploded):
        return
    last = latest_checkpoint(ckpt_dir)
    kept = f"last good checkpoint kept: {last}" if last else "no checkpoint was written yet"
    what = f"loss became {loss}" if bad else f"loss exploded to {loss:.4g} (> {explode_factor}x the first, {first_loss:.4g})"
    raise FloatingPointError(f"{what} at step {step}; {kept}")
