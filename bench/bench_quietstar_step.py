"""What does one REAL token-level Quiet-STaR training step (token_rl.step_loss: reference-model
forward, injection, parallel thoughts, mixing head, the full loss) cost, forward + backward?

Variants, each in a fresh subprocess (so peak memory belongs to that variant alone):

  plain      forward + backward of the LM loss: the unit of cost
  all        token_rl.step_loss with injection "all" + backward
  top25      the same with injection "top_fraction" 0.25 (entropy-based, per sequence)
  reference  reference_thoughts (plain forwards per position and thought, no shared cache)
             + the same loss + backward; timed on `--ref-positions` evenly spaced positions
             and scaled linearly to all T (the per-sequence parts - base forward, KL - get
             scaled too, so the reference is over-estimated by about that many plain steps)

Pass-count floor, in plain steps: the frozen reference forward (~1/3: no backward) + the base
forward + f * K * (L + n_true - 1) thought/true-token passes over the selected fraction f of
positions. `x_floor` = (variant / plain) / floor; 1.0 = the step costs what its pass count
says. Prints a table; writes bench/results/quietstar_step.json.

    python bench/bench_quietstar_step.py --config tiny
    python bench/bench_quietstar_step.py --config smol-shape --device cuda --ref-positions 4
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save_result, thought_step_parser  # noqa: E402
from bench_thought_step import _current_rss_mb, _peak_rss_mb, build_model, make_batch  # noqa: E402

from agent_forge.quietstar.mixing import MixingHead  # noqa: E402
from agent_forge.quietstar.thoughts import reference_thoughts  # noqa: E402
from agent_forge.quietstar.token_rl import TokenRLConfig, step_loss, token_rl_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quietstar_step.json"
VARIANTS = ("plain", "all", "top25", "reference")


def step_fn(variant: str, model, ref, head, ids, args):
    """A closure running one full forward + backward of `variant`."""
    V = model.config.vocab_size
    mask = torch.ones_like(ids)
    injection = {"top25": "top_fraction"}.get(variant, "all")
    cfg = TokenRLConfig(n_thoughts=args.k, thought_len=args.thought_len, n_true=args.n_true,
                        injection=injection, fraction=0.25, kl_coefficient=0.1)
    out = {}

    def plain():
        model(ids, labels=ids).loss.backward()

    def ours():
        gen = torch.Generator(device=ids.device).manual_seed(0)
        parts, tb = step_loss(model, ref, head, ids, mask, cfg, V - 2, V - 1, gen)
        parts["loss"].backward()
        out["fraction"] = float(tb.selected.float().mean())

    def reference():
        gen = torch.Generator(device=ids.device).manual_seed(0)
        sel = torch.zeros_like(ids, dtype=torch.bool)
        sel[:, torch.linspace(0, ids.shape[1] - 2, args.ref_positions).round().long()] = True
        with torch.no_grad():
            ref_logits = ref(input_ids=ids).logits
        tb = reference_thoughts(model, ids, selected=sel, start_id=V - 2, end_id=V - 1, n_thoughts=args.k,
                                thought_len=args.thought_len, n_true=args.n_true, generator=gen,
                                banned_ids=[V - 2, V - 1])
        token_rl_loss(model, head, tb, ids, mask, ref_logits, cfg)["loss"].backward()
        out["fraction"] = (ids.shape[1] - 1) / ids.shape[1]

    return {"plain": plain, "all": ours, "top25": ours, "reference": reference}[variant], out


def measure(variant: str, args) -> dict:
    """In a child process: warm up once, time `repeats` steps, report peak memory."""
    torch.set_num_threads(args.threads)
    model = build_model(args.config, args.device)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    head = MixingHead(model.config.hidden_size).to(args.device)
    ids = make_batch(model.config.vocab_size, args.batch, args.seq_len, args.device)
    fn, info = step_fn(variant, model, ref, head, ids, args)
    cuda = args.device.startswith("cuda")
    rss0 = _current_rss_mb()
    times = []
    for i in range(args.repeats + 1):
        if cuda and i == 1:
            torch.cuda.reset_peak_memory_stats()
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    scale = args.seq_len / args.ref_positions if variant == "reference" else 1.0
    return {"variant": variant, "seconds": min(times[1:]) * scale,
            "seconds_median": statistics.median(times[1:]) * scale, "seconds_all": times[1:],
            "scaled_by": scale, "fraction_thought": info.get("fraction", 0.0),
            "peak_rss_delta_mb": _peak_rss_mb() - rss0,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def floor_units(fraction: float, args) -> float:
    """Plain-step units the pass count implies (see the module docstring)."""
    return 1 / 3 + 1 + fraction * args.k * (args.thought_len + args.n_true - 1)


def run_all(args) -> dict:
    rows = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant] + _passthrough(args)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows[variant] = {"variant": variant, "error": res.stderr.strip().splitlines()[-1:]}
            continue
        rows[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    plain = rows.get("plain", {}).get("seconds")
    for name, r in rows.items():
        if "seconds" not in r:
            continue
        r["x_plain"] = r["seconds"] / plain if plain else None
        if plain and name in ("all", "top25"):
            r["floor_units"] = floor_units(r["fraction_thought"], args)
            r["x_floor"] = r["x_plain"] / r["floor_units"]
        if "seconds" in rows.get("reference", {}) and name != "reference":
            r["reference_speedup"] = rows["reference"]["seconds"] / r["seconds"]
    return {"config": args.config, "device": args.device, "threads": args.threads,
            "batch": args.batch, "seq_len": args.seq_len, "k": args.k, "thought_len": args.thought_len,
            "n_true": args.n_true, "ref_positions": args.ref_positions,
            "machine": _machine(args.device), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}


def _machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} {os.cpu_count()} cpus (shared)"


def _passthrough(args) -> list[str]:
    keys = ("config", "device", "threads", "batch", "seq_len", "k", "thought_len", "n_true",
            "ref_positions", "repeats")
    return [x for key in keys for x in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]


def print_table(rec: dict) -> None:
    print(f"\nconfig={rec['config']} device={rec['device']} ({rec['machine']}) B={rec['batch']} "
          f"T={rec['seq_len']} K={rec['k']} L={rec['thought_len']} n_true={rec['n_true']}")
    print(f"{'variant':<10} {'s/step':>10} {'median':>10} {'x plain':>9} {'thought at':>10} "
          f"{'floor':>7} {'x floor':>8} {'ref/this':>9} {'peak RSS MB':>12} {'peak CUDA MB':>13}")

    def fmt(v, spec):
        return format(v, spec) if v is not None else format("-", spec.split(".")[0])
    for name, r in rec["rows"].items():
        if "error" in r:
            print(f"{name:<10} failed: {r['error']}")
            continue
        print(f"{name:<10} {r['seconds']:>10.4f} {r['seconds_median']:>10.4f} {fmt(r.get('x_plain'), '>9.2f')} "
              f"{r['fraction_thought']:>10.2f} {fmt(r.get('floor_units'), '>7.1f')} "
              f"{fmt(r.get('x_floor'), '>8.2f')} {fmt(r.get('reference_speedup'), '>9.1f')} "
              f"{r['peak_rss_delta_mb']:>12.1f} {fmt(r.get('peak_cuda_mb'), '>13.1f')}")
    print("s/step = fastest timed repeat; floor = plain-step units implied by the pass count; "
          f"reference timed on {rec['ref_positions']} positions and scaled to all {rec['seq_len']}")


def main(argv=None) -> None:
    p = thought_step_parser(__doc__, VARIANTS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rec = run_all(args)
    print_table(rec)
    save_result(rec, RESULTS, f"{rec['config']}@{rec['device']}@T{rec['seq_len']}")


if __name__ == "__main__":
    main()
