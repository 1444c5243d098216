"""BitNet: size, sparsity, accuracy and decode speed of `forge bitnet`, on a tiny model and on a real one.

`--model tiny` builds a 2-layer random Llama with the thinking tokens (seconds; the figures
prove the measuring, not the method). `--model DIR` runs the phase on a Phase 3 output
(e.g. runs/demo/model, with --force when its 3 -> 4 handoff failed). Every row comes from
the run's own report; prints the table, writes bench/results/bitnet.json.

    python bench/bench_bitnet.py --model tiny
    python bench/bench_bitnet.py --model runs/demo/model --preset quick --force   # ~10 min, 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import save_result

from agent_forge.bitnet.commands import summary_rows
from agent_forge.bitnet.phase import make_config, run_bitnet


def tiny_phase3(where: Path) -> Path:
    """A tiny random Llama with the thinking vocabulary, saved as a Phase 3 output."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_model, make_tiny_tokenizer

    from agent_forge.models import save_model
    from agent_forge.vocab import add_thinking_tokens, thinking_token_ids

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    meta = {"phase": 3, "thinking_tokens": thinking_token_ids(tok),
            "metrics": {"baking_accuracy": 1.0, "anti_theater_passed": True}}
    return save_model(model, tok, where / "tiny-phase3", meta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a Phase 3 model directory")
    p.add_argument("--preset", default=None, help="default: smoke for tiny, quick otherwise")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one for tiny, runs/bench-bitnet)")
    p.add_argument("--config", default=None, help="YAML overriding BitNetConfig fields")
    p.add_argument("--force", action="store_true", help="go on past a failed Phase 3 -> 4 handoff")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-bitnet-"))
    tiny = args.model == "tiny"
    model = tiny_phase3(tmp) if tiny else Path(args.model)
    out = Path(args.out) if args.out else (tmp / "run" if tiny else Path("runs/bench-bitnet"))
    cfg = make_config(args.preset or ("smoke" if tiny else "quick"), args.config, model=str(model), out=str(out),
                      tracking="disabled", registry=str(tmp / "registry.sqlite"), force=args.force or None)
    report = run_bitnet(cfg)
    rows = summary_rows(report)
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    key = "tiny" if tiny else f"{model.name}:{cfg.preset}"
    save_result({"model": str(args.model), "preset": cfg.preset, "rows": rows,
                 "stages": {k: v for k, v in report["stages"].items() if k != "data"},
                 "total_seconds": report["total_seconds"]}, Path("bench/results/bitnet.json"), key)
    if tiny:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
