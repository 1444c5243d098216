"""What every bench script shares: merging a result into its JSON file, and the options
that pick the model and the thought shape."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def save_result(rec: dict, path: Path, key: str) -> None:
    """Merge `rec` into the JSON object at `path` under `key` (atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = rec
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def timed(fn, repeats: int) -> tuple[float, object]:
    """(best wall seconds of `repeats` calls after one warm-up call, the last result)."""
    out, best = fn(), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def model_parser(doc: str) -> argparse.ArgumentParser:
    """--config (tiny | smol-shape | default), --device, --threads, --batch."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=["tiny", "smol-shape", "default"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--batch", type=int, default=1)
    return p


def thought_step_parser(doc: str, variants) -> argparse.ArgumentParser:
    """model_parser plus the token-level step's shape, repeats and variants."""
    p = model_parser(doc)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--thought-len", type=int, default=8)
    p.add_argument("--n-true", type=int, default=4)
    p.add_argument("--ref-positions", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    p.add_argument("--child", choices=variants, help=argparse.SUPPRESS)
    return p
