"""Atomic training checkpoints that resume exactly: weights, optimizer, scheduler, RNG, step.

Weights go to safetensors; optimizer/scheduler state to torch files that are read back with
`weights_only=True` (tensors, numbers, lists and dicts only: nothing executable). A
checkpoint directory appears under its final name only once it is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


KEEP_CHECKPOINTS = 2  # newest checkpoints kept per run (a new one is written before the oldest goes)

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_lists(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict, contiguous, with tied storage saved once."""
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler=None,
                    extra: dict | None = None, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write `directory/step-XXXXXXX` atomically and prune all but the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:07d}"
    tmp = directory / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state()}, tmp / "optim.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        return []
    done = [p for p in directory.glob("step-*") if (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler=None) -> dict:
    """Restore everything saved by save_checkpoint; returns the trainer state (step, extra)."""
    path = Path(path)
    weights = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"{path}: checkpoint has unexpected weights {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / STATE_FILE).read_text())


def truncate_log(path: Path, step: int) -> None:
    """Drop lines of a JSONL step log past `step`: on resume, steps after the checkpoint
    never happened as far as the model is concerned, and will be logged again."""
    path = Path(path)
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
