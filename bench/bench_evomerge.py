"""EvoMerge: seconds per merge (each of the 8 technique combinations) and per fitness
evaluation, on a tiny model or on parents of the default model's shape.

`--parents tiny` builds three 2-layer Llamas nudged from one base (seconds). `--parents
DIR,DIR,...` times real parents (e.g. runs/evomerge/parents/*/model) with `--base` their
common ancestor. Fitness is timed both ways the phase offers: the trace-likelihood proxy
and generated accuracy. Prints the table, writes bench/results/evomerge.json. For a whole
search's time, see the `search` and `timings` entries of a run's evomerge_report.json.

    python bench/bench_evomerge.py --parents tiny
    python bench/bench_evomerge.py --parents runs/evomerge/parents/chain_sum/model,... \
        --base runs/evomerge/parents/base/model --items 48
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save_result

from agent_forge.evomerge.fitness import FitnessConfig, load_items, measure
from agent_forge.evomerge.genome import first_generation
from agent_forge.evomerge.merge import check_parents, merge_to_model


def tiny_parents(where: Path) -> tuple[list[str], str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_model, make_tiny_tokenizer

    from agent_forge.models import save_model
    from agent_forge.vocab import add_thinking_tokens

    tok = make_tiny_tokenizer()
    paths = []
    for k in range(4):
        model = make_tiny_model("llama", len(tok), seed=0)
        add_thinking_tokens(model, tok)
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        paths.append(str(save_model(model, tok, where / f"m{k}")))
    return paths[1:], paths[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parents", default="tiny")
    ap.add_argument("--base", default=None)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, base = tiny_parents(Path(tmp)) if args.parents == "tiny" else (args.parents.split(","), args.base)
        ps = check_parents(paths, base=base)
        t0 = time.perf_counter()
        ps.states(), ps.base_state()
        load_s = time.perf_counter() - t0
        rows, model = [], None
        for genome in first_generation(len(paths)):
            t0 = time.perf_counter()
            model = merge_to_model(genome, ps)
            rows.append({"what": f"merge {genome.combination}", "seconds": time.perf_counter() - t0})
        items = load_items("easy_arithmetic_val", args.items)
        for name, weight in (("trace likelihood", 1.0), ("accuracy (generation)", 0.0)):
            cfg = FitnessConfig(loglik_weight=weight, max_new_tokens=args.max_new_tokens)
            t0 = time.perf_counter()
            measure(model, ps.tokenizer, items, cfg)
            rows.append({"what": f"fitness: {name}, {len(items)} items", "seconds": time.perf_counter() - t0})
    rec = {"parents": args.parents, "n_parents": len(paths), "threads": torch.get_num_threads(),
           "load_parents_s": load_s, "rows": rows}
    print(f"{'what':<52} {'seconds':>8}")
    print(f"{'load parents (once per search)':<52} {load_s:8.2f}")
    for r in rows:
        print(f"{r['what']:<52} {r['seconds']:8.2f}")
    save_result(rec, Path(__file__).parent / "results" / "evomerge.json",
                "tiny" if args.parents == "tiny" else "real")


if __name__ == "__main__":
    main()
