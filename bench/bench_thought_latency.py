"""How much slower is decoding with token-level thoughts than plain decoding?

Same prompts, same number of new tokens (EOS off, so every row writes exactly --new tokens),
greedy, batch of --batch prompts:

  plain_hf    model.generate (KV cache): what inference.py does today
  plain_loop  a minimal KV-cached greedy loop with the same calls our decoder makes
  all         ThoughtDecoder mode "all": a thought of L tokens before every visible token
  difficult@f ThoughtDecoder mode "difficult" with the entropy threshold set to the (1 - f)
              quantile of the base next-token entropies met while decoding these prompts
              (measured by one calibration decode), so about a fraction f of steps think
  nocache     (optional, --nocache) a reference-style loop without any KV cache: every
              visible and thought token recomputes the whole sequence, as the Quiet-STaR
              reference code does

`x plain` divides by the faster of the two plain baselines. Models have random weights
(tiny, or SmolLM2-135M's shape); the start/end tokens are the last two ids. Prints a table;
writes bench/results/thought_latency.json.

    python bench/bench_thought_latency.py --config tiny --nocache
    python bench/bench_thought_latency.py --config smol-shape --repeats 2
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from _common import model_parser, save_result, timed  # noqa: E402
from bench_thought_step import build_model  # noqa: E402

from agent_forge.quietstar.injector import next_token_entropy  # noqa: E402
from agent_forge.quietstar.mixing import MixingHead  # noqa: E402
from agent_forge.quietstar.thought_inference import ThoughtDecoder  # noqa: E402
from agent_forge.quietstar.thoughts import backbone, lm_logits  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "thought_latency.json"


@torch.inference_mode()
def plain_loop(model, ids, n_new, banned, entropies: list | None = None):
    """Greedy decoding with the KV cache, one token per pass, nothing else."""
    cache, seq = DynamicCache(), ids
    h = backbone(model)(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    for _ in range(n_new):
        logits = lm_logits(model, h).float()
        if entropies is not None:
            entropies.append(next_token_entropy(logits))
        logits[:, banned] = float("-inf")
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], 1)
        h = backbone(model)(input_ids=tok, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    return seq


@torch.inference_mode()
def nocache_decode(model, head, ids, n_new, L, start, end, banned):
    """Thinking before every token the reference way: full forwards, no cache at all."""
    seq = ids
    B = ids.shape[0]
    col = lambda t: torch.full((B, 1), t, dtype=torch.long)  # noqa: E731
    for _ in range(n_new):
        h = backbone(model)(input_ids=seq).last_hidden_state[:, -1]
        th = torch.cat([seq, col(start)], 1)
        for _ in range(L - 2):
            lg = lm_logits(model, backbone(model)(input_ids=th).last_hidden_state[:, -1]).float()
            lg[:, [start, end]] = float("-inf")
            th = torch.cat([th, lg.argmax(-1, keepdim=True)], 1)
        h_end = backbone(model)(input_ids=torch.cat([th, col(end)], 1)).last_hidden_state[:, -1]
        logits = lm_logits(model, head(h, h_end)).float()
        logits[:, banned] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = build_model(args.config, args.device).eval()
    V = model.config.vocab_size
    start, end, banned = V - 2, V - 1, [V - 2, V - 1]
    head = MixingHead(model.config.hidden_size).to(args.device)
    ids = torch.randint(0, V - 2, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    rows, seqs = {}, {}

    ents: list = []
    plain_loop(model, ids, args.new, banned, ents)
    ents = torch.stack(ents).flatten().float()

    def decoder(mode, fraction=None):
        thr = float(torch.quantile(ents, 1 - fraction)) if fraction is not None else None
        return ThoughtDecoder(model, head, start, end, mode=mode, thought_len=args.thought_len,
                              entropy_threshold=thr, banned_visible=banned)

    hf = lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,  # noqa: E731
                                min_new_tokens=args.new, do_sample=False, suppress_tokens=banned,
                                pad_token_id=0, eos_token_id=None)
    rows["plain_hf"], seqs["plain_hf"] = timed(hf, args.repeats)
    rows["plain_loop"], seqs["plain_loop"] = timed(lambda: plain_loop(model, ids, args.new, banned), args.repeats)
    fractions = {}
    for mode, frac in [("all", None)] + [("difficult", f) for f in args.fractions]:
        name = mode if frac is None else f"difficult@{frac:g}"
        dec = decoder(mode, frac)
        rows[name], seqs[name] = timed(lambda: dec.generate(input_ids=ids, attention_mask=mask,
                                                            max_new_tokens=args.new, pad_token_id=0), args.repeats)
        fractions[name] = dec.stats.thought_fraction
    if args.nocache:
        rows["nocache"], seqs["nocache"] = timed(lambda: nocache_decode(model, head, ids, args.new, args.thought_len,
                                                                        start, end, banned), max(1, args.repeats // 2))
        fractions["nocache"] = 1.0
    base = min(rows["plain_hf"], rows["plain_loop"])
    same = {k: bool(torch.equal(v.cpu(), seqs["plain_hf"].cpu())) for k, v in seqs.items()}
    table = {k: {"seconds": v, "x_plain": v / base, "thought_fraction": fractions.get(k, 0.0),
                 "ms_per_token": 1000 * v / args.new, "same_tokens_as_plain": same[k]} for k, v in rows.items()}
    return {"config": args.config, "device": args.device, "threads": args.threads, "batch": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new, "thought_len": args.thought_len,
            "difficult_fractions": args.fractions, "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)"
            if not args.device.startswith("cuda") else torch.cuda.get_device_name(0),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": table}


def print_table(rec: dict) -> None:
    print(f"\nconfig={rec['config']} device={rec['device']} ({rec['machine']}) batch={rec['batch']} "
          f"prompt={rec['prompt_len']} new={rec['new_tokens']} L={rec['thought_len']}")
    print(f"{'variant':<14} {'seconds':>9} {'ms/token':>9} {'x plain':>8} {'thought at':>10} {'same tokens':>12}")
    for name, r in rec["rows"].items():
        print(f"{name:<14} {r['seconds']:>9.4f} {r['ms_per_token']:>9.2f} {r['x_plain']:>8.2f} "
              f"{r['thought_fraction']:>10.2f} {str(r['same_tokens_as_plain']):>12}")
    print("seconds = fastest repeat; x plain against the faster plain baseline; the mixing head is "
          "zero-initialised, so every variant must produce the plain tokens")


def main(argv=None) -> None:
    p = model_parser(__doc__)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--thought-len", type=int, default=8)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.15, 0.25])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nocache", action="store_true")
    rec = run(p.parse_args(argv))
    print_table(rec)
    save_result(rec, RESULTS, f"{rec['config']}@{rec['device']}@B{rec['batch']}")


if __name__ == "__main__":
    main()
