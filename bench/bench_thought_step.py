"""What does one token-level Quiet-STaR training step cost?

Three ways to spend one step on the same batch, each in a fresh subprocess (so the peak
resident memory, `ru_maxrss`, belongs to that variant alone):

  plain      forward + backward of the LM loss (the unit of cost)
  parallel   generate_thoughts (1 base forward + L + n_true - 1 passes over B*K*T rows)
             + mixing head + REINFORCE loss + backward
  reference  reference_thoughts (plain forwards per position and thought) + the same loss;
             timed on `--ref-positions` evenly spaced positions and scaled linearly to all T
             (evenly spaced, so the mean prefix length is representative)

The parallel step needs about 1 + K * (L + n_true - 1) forward-equivalents of compute, so
`per_fwd_equiv` = (parallel / plain) / that number: near 1 means the method costs what its
pass count says and no more. Prints a table; writes bench/results/thought_step.json.

    python bench/bench_thought_step.py --config tiny
    python bench/bench_thought_step.py --config smol-shape --device cuda
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import save_result, thought_step_parser  # bench/ is on sys.path when run as a script

from agent_forge.quietstar.mixing import MixingHead, mixed_logits
from agent_forge.quietstar.thoughts import generate_thoughts, reference_thoughts
from agent_forge.training.logprobs import token_logprobs

RESULTS = Path(__file__).parent / "results" / "thought_step.json"
VARIANTS = ("plain", "parallel", "reference")


# ---------------------------------------------------------------- model and batch

def build_model(name: str, device: str):
    """'tiny', 'smol-shape' (random weights, SmolLM2-135M's shape) or 'default' (the real one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "default":
        from agent_forge.models import load_model
        model, _ = load_model("default", device=device)
        return model.train()
    shapes = {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=512),
        "smol-shape": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    }
    torch.manual_seed(0)
    cfg = LlamaConfig(tie_word_embeddings=True, max_position_embeddings=2048, **shapes[name])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device).train()


def make_batch(vocab: int, batch: int, seq_len: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab - 2, (batch, seq_len), generator=gen).to(device)


# ---------------------------------------------------------------- one step of each kind

def quietstar_loss(model, head, tb) -> torch.Tensor:
    """0.5 base NLL + 0.5 mixed NLL + REINFORCE with a per-position mean baseline."""
    valid = tb.true_valid[:, :, None].expand_as(tb.ll_with).float()
    n = valid.sum().clamp_min(1)
    h_base = tb.base_true_hidden[:, :, None].expand_as(tb.thought_hidden)
    targets = tb.true_tokens[:, :, None].expand_as(tb.ll_with)
    ll_mixed = token_logprobs(mixed_logits(model, head, h_base, tb.thought_hidden), targets)
    reward = ((tb.ll_with - tb.ll_without[:, :, None]) * valid).sum(-1).detach()   # (B, T, K)
    advantage = reward - reward.mean(-1, keepdim=True)
    rows = tb.selected.sum().clamp_min(1) * reward.shape[-1]
    policy = -(advantage * tb.logprob_sum).sum() / rows
    base_nll = -(tb.ll_without * tb.true_valid).sum() / tb.true_valid.sum().clamp_min(1)
    return 0.5 * base_nll + 0.5 * (-(ll_mixed * valid).sum() / n) + policy


def step_fn(variant: str, model, head, ids, args):
    """A closure running one full step (forward + loss + backward) of `variant`."""
    V = model.config.vocab_size
    kw = dict(start_id=V - 2, end_id=V - 1, n_thoughts=args.k, thought_len=args.thought_len,
              n_true=args.n_true, temperature=1.0)
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[:, torch.linspace(0, ids.shape[1] - 1, args.ref_positions).round().long()] = True

    def plain():
        model(ids, labels=ids).loss.backward()

    def parallel():
        gen = torch.Generator(device=ids.device).manual_seed(0)
        quietstar_loss(model, head, generate_thoughts(model, ids, generator=gen, **kw)).backward()

    def reference():
        gen = torch.Generator(device=ids.device).manual_seed(0)
        tb = reference_thoughts(model, ids, selected=selected, generator=gen, **kw)
        quietstar_loss(model, head, tb).backward()

    return {"plain": plain, "parallel": parallel, "reference": reference}[variant]


def measure(variant: str, args) -> dict:
    """Run in a child process: warm up once, then time `repeats` steps; report peak memory."""
    torch.set_num_threads(args.threads)
    model = build_model(args.config, args.device)
    head = MixingHead(model.config.hidden_size).to(args.device)
    ids = make_batch(model.config.vocab_size, args.batch, args.seq_len, args.device)
    fn = step_fn(variant, model, head, ids, args)
    cuda = args.device.startswith("cuda")
    rss0 = _current_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    scale = args.seq_len / args.ref_positions if variant == "reference" else 1.0
    # On a shared CPU other jobs only ever add time, so the fastest repeat is the headline.
    return {"variant": variant, "seconds": min(times[1:]) * scale,
            "seconds_median": statistics.median(times[1:]) * scale,
            "seconds_all": times[1:], "scaled_by": scale,
            "peak_rss_delta_mb": _peak_rss_mb() - rss0,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- driver

def run_all(args) -> dict:
    """Each variant in its own subprocess; collect, add ratios, return one result record."""
    rows = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant] + _passthrough(args)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    fwd_equiv = 1 + args.k * (args.thought_len + args.n_true - 1)
    plain = rows.get("plain", {}).get("seconds")
    for r in rows.values():
        r["x_plain"] = r["seconds"] / plain if plain else None
    if plain and "parallel" in rows:
        rows["parallel"]["per_fwd_equiv"] = rows["parallel"]["x_plain"] / fwd_equiv
    return {"config": args.config, "device": args.device, "threads": args.threads,
            "batch": args.batch, "seq_len": args.seq_len, "k": args.k,
            "thought_len": args.thought_len, "n_true": args.n_true,
            "ref_positions": args.ref_positions, "fwd_equiv_passes": fwd_equiv,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)",
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "rows": rows}


def _passthrough(args) -> list[str]:
    keys = ("config", "device", "threads", "batch", "seq_len", "k", "thought_len", "n_true",
            "ref_positions", "repeats")
    return [x for key in keys for x in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]


def print_table(rec: dict) -> None:
    print(f"\nconfig={rec['config']} device={rec['device']} B={rec['batch']} T={rec['seq_len']} "
          f"K={rec['k']} L={rec['thought_len']} n_true={rec['n_true']} "
          f"(fwd-equivalents of the method: {rec['fwd_equiv_passes']})")
    print(f"{'variant':<10} {'s/step':>10} {'median':>10} {'x plain':>9} {'per fwd-eq':>11} {'peak RSS MB':>12} {'peak CUDA MB':>13}")
    for name, r in rec["rows"].items():
        def fmt(v, spec):
            return format(v, spec) if v is not None else format("-", spec.split(".")[0])
        print(f"{name:<10} {r['seconds']:>10.4f} {r['seconds_median']:>10.4f} {fmt(r.get('x_plain'), '>9.2f')} "
              f"{fmt(r.get('per_fwd_equiv'), '>11.2f')} {r['peak_rss_delta_mb']:>12.1f} "
              f"{fmt(r.get('peak_cuda_mb'), '>13.1f')}")
    print("s/step = fastest of the timed repeats (shared CPU: contention only adds time)")
    if "reference" in rec["rows"]:
        print(f"(reference timed on {rec['ref_positions']} evenly spaced positions, scaled x"
              f"{rec['rows']['reference']['scaled_by']:.1f} to all {rec['seq_len']})")


def main(argv=None) -> None:
    p = thought_step_parser(__doc__, VARIANTS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rec = run_all(args)
    print_table(rec)
    save_result(rec, RESULTS, f"{rec['config']}@{rec['device']}")


if __name__ == "__main__":
    main()
