"""Batch size and sequence length from the memory this machine has (`train.batch_size: 0`,
`data.seq_len: 0` mean "choose for me").

The memory of one training step is a fixed part (weights, gradients, optimiser state) plus a
part that grows with the tokens in the batch (activations, the recursion's unrolled steps,
the memory's per-token gradients, logits over a 49k vocabulary). Rather than model all of
that from the architecture, we measure it: one optimiser step at four and at eight sequences of
PROBE_LEN tokens gives the fixed bytes and the bytes per token (CUDA: the allocator's peak,
in this process; CPU: the peak resident size of a fresh process, since CPU allocations leave
no other trace). The longest sequence (a power of two up to max_len) that still fits a batch
of MIN_BATCH, and then the largest batch (a power of two up to max_batch), whose predicted
peak stays under `memory_fraction` of the free memory is chosen. The data stage records the
choice, so a resumed run draws exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

PROBE_LEN = 128  # tokens per probe sequence
PROBE_BATCHES = (4, 8)  # sequences per probe step: below ~512 tokens the allocator's slack hides the slope
MIN_LEN = 64  # the shortest sequence chosen automatically
MIN_BATCH = 4  # an automatic sequence length leaves room for at least this many sequences


@dataclass
class Sizing:
    """The choice and the measurements behind it (bytes)."""

    batch_size: int
    seq_len: int
    chosen: list[str]  # which of the two were chosen here ("batch_size", "seq_len"); the rest came from config
    free_bytes: int
    budget_bytes: int
    fixed_bytes: int
    bytes_per_token: float
    predicted_bytes: int
    device: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SizingError(ValueError):
    """Not even one sequence fits in the memory there is; the message says how much is needed."""


def choose(fixed: float, per_token: float, budget: float, batch_size: int = 0, seq_len: int = 0,
           max_batch: int = 32, max_len: int = 512) -> tuple[int, int]:
    """(batch, seq_len) whose predicted peak fixed + batch * seq_len * per_token fits the budget;
    a non-zero batch_size or seq_len is kept as given."""
    def fits(b: int, s: int) -> bool:
        return fixed + b * s * per_token <= budget

    def largest_batch(s: int) -> int:
        if batch_size:
            return batch_size if fits(batch_size, s) else 0
        b = max_batch
        while b >= 1 and not fits(b, s):
            b //= 2
        return b

    lengths = [seq_len] if seq_len else _powers_of_two_down(max_len, MIN_LEN)
    for s in lengths:  # longest first: an automatic length keeps room for MIN_BATCH sequences
        b = largest_batch(s)
        if b and (seq_len or batch_size or b >= min(MIN_BATCH, max_batch) or s == lengths[-1]):
            return b, s
    s, b = lengths[-1], batch_size or 1
    need = fixed + b * s * per_token
    raise SizingError(f"a training step of {b} x {s} tokens needs about {need / 2**30:.2f} GiB "
                      f"({fixed / 2**30:.2f} fixed + {per_token / 2**10:.0f} KiB per token); the budget is "
                      f"{budget / 2**30:.2f} GiB: free memory, use a smaller model, or set batch_size/seq_len")


def _powers_of_two_down(top: int, bottom: int) -> list[int]:
    s = 1 << (max(top, bottom).bit_length() - 1)
    out = []
    while s >= bottom:
        out.append(s)
        s //= 2
    return out


def resolve(model_config: dict, train, batch_size: int, seq_len: int, device: str,
            memory_fraction: float = 0.6, max_batch: int = 32, max_len: int = 512) -> Sizing:
    """Measure a training step of the model `CognateConfig.from_dict(model_config)` on `device` and
    choose what is 0 among batch_size and seq_len."""
    from agent_forge.models import free_memory

    (b1, b2), (one, two) = PROBE_BATCHES, (measure_step_bytes(model_config, train, b, PROBE_LEN, device)
                                          for b in PROBE_BATCHES)
    if two > one:
        per_token = (two - one) / ((b2 - b1) * PROBE_LEN)
        fixed = max(0.0, one - per_token * b1 * PROBE_LEN)
    else:  # a noisy reading: count all of it as per-token (the safe side)
        per_token, fixed = max(1.0, two / (b2 * PROBE_LEN)), 0.0
    free = free_memory(device)
    budget = free * memory_fraction
    max_len = min(max_len, int(model_config.get("max_position_embeddings", 2048)))
    b, s = choose(fixed, per_token, budget, batch_size, seq_len, max_batch, max_len)
    chosen = [name for name, v in (("batch_size", batch_size), ("seq_len", seq_len)) if not v]
    return Sizing(b, s, chosen, int(free), int(budget), int(fixed), per_token, int(fixed + b * s * per_token), device)


def measure_step_bytes(model_config: dict, train, batch: int, seq_len: int, device: str) -> int:
    """Peak bytes of building the model and its optimiser and taking one training step at
    (batch, seq_len), above what the process held before."""
    if device.startswith("cuda"):
        return _step_bytes(model_config, dataclasses.asdict(train), batch, seq_len, device)
    import json
    import subprocess
    import sys

    job = json.dumps({"model_config": model_config, "train": dataclasses.asdict(train), "batch": batch,
                      "seq_len": seq_len})
    run = subprocess.run([sys.executable, "-m", "agent_forge.cognate.sizing"], input=job, capture_output=True,
                         text=True, timeout=900)  # a fresh process: its peak is this step's alone
    if run.returncode != 0:
        raise SizingError(f"measuring a training step of {batch} x {seq_len} tokens failed: "
                          f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
    return int(run.stdout.strip().splitlines()[-1])


def _step_bytes(model_config: dict, train: dict, batch: int, seq_len: int, device: str) -> int:
    import torch

    from agent_forge.cognate.config import CognateConfig
    from agent_forge.cognate.model import CognateForCausalLM
    from agent_forge.cognate.train import CognateTrainConfig, build_cognate_optimizer

    torch.manual_seed(0)
    config = CognateConfig.from_dict(model_config)
    base = _peak_or_current(device, reset=True)
    model = CognateForCausalLM(config).to(device).train()
    ids = torch.randint(config.vocab_size, (batch, seq_len), device=device)
    optimizer = build_cognate_optimizer(model, CognateTrainConfig(**train))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    return max(0, _peak_or_current(device) - base)


def _peak_or_current(device: str, reset: bool = False) -> int:
    """CUDA: bytes allocated now (after resetting the peak) or the peak since. CPU: resident
    bytes now (after resetting the peak, where Linux allows it) or the peak resident size."""
    import torch

    if device.startswith("cuda"):
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():  # Linux: VmHWM is the peak resident size; clear_refs "5" resets it
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        field = "VmRSS:" if reset else "VmHWM:"
        line = next(x for x in status.read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024
    import resource

    import psutil

    return psutil.Process().memory_info().rss if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":  # the CPU probe's fresh process: a JSON job on stdin, bytes on stdout
    import json
    import sys

    job = json.loads(sys.stdin.read())
    print(_step_bytes(job["model_config"], job["train"], job["batch"], job["seq_len"], "cpu"))
