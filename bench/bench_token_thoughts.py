"""Do a trained model's token-level thoughts help, on questions it never trained on?

The paper's measurement, on held-out questions (a fresh split; with --exclude-seen, every
question the training data asks is left out), each rendered the way `records_as:
answer_only` renders training text ("Question: ...\\nAnswer: N" + EOS). The same weights read
each question three ways:

  none       plain next-token predictions
  all        a greedy thought after every position, mixed in by the learned head (the paper)
  difficult  thoughts only where the plain next-token entropy exceeds the (1 - f) quantile
             of the entropies met on OTHER questions (--calibrate), plain elsewhere

A thought sees only the text before it, so one pass with a thought at every position gives
all three. Reported: NLL per token of the true next token (every token, and the answer's
tokens), paired per question with a 95% bootstrap interval over questions; the mixing weight
the head gives; the share of the all-positions NLL gain the difficult positions keep;
--base: the model before training without thoughts (what training did to the weights, apart
from the thoughts). Then greedy accuracy answering directly (the thinking block forced
empty) with thoughts none / difficult / all, and decoding latency at batch 1 and 8: the
thought decoder against plain greedy decoding, the same prompts and the same number of new
tokens (end-of-sequence off). Prints tables; writes bench/results/token_thoughts.json.

    python bench/bench_token_thoughts.py --model runs/token_cpu/model \\
        --base runs/demo/quietstar/step1/model --exclude-seen runs/demo/quietstar/data/train.jsonl
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save_result, timed  # noqa: E402

from agent_forge.evaluation.metrics import bootstrap_ci  # noqa: E402
from agent_forge.quietstar.injector import next_token_entropy  # noqa: E402
from agent_forge.quietstar.mixing import load_head  # noqa: E402
from agent_forge.quietstar.thought_inference import HEAD_FILE, load_decoder  # noqa: E402
from agent_forge.quietstar.thoughts import generate_thoughts, lm_logits  # noqa: E402
from agent_forge.training.logprobs import token_logprobs  # noqa: E402
from agent_forge.validation.stats import bootstrap_mean_diff, paired_gain  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "token_thoughts.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a token-level model directory (with its mixing head)")
    p.add_argument("--base", help="the model before token-level training (NLL without thoughts)")
    p.add_argument("--data", default="easy_arithmetic_fresh:9101", help="held-out questions (evalsets name)")
    p.add_argument("--calibrate", default="easy_arithmetic_fresh:9102", help="questions that set the threshold")
    p.add_argument("--exclude-seen", help="records JSONL whose questions are left out of both sets")
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--batch", type=int, default=8, help="questions per NLL pass")
    p.add_argument("--acc-limit", type=int, default=60, help="questions for the accuracy rows (0: skip)")
    p.add_argument("--acc-new", type=int, default=10, help="new tokens per answer in the accuracy rows")
    p.add_argument("--latency-batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--new", type=int, default=16, help="new tokens per timed decode")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--key", default="default")
    return p.parse_args(argv)


def questions(name: str, limit: int, exclude: str | None) -> list:
    """Up to `limit` items of `name`, leaving out questions the `exclude` records ask."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.schema import read_records

    seen = {r.question.strip() for r in read_records(exclude)} if exclude else set()
    items = [it for it in load_eval_set(name, limit=2 * limit) if it.question.strip() not in seen]
    return items[:limit]


def encode(tokenizer, item) -> tuple[list[int], int]:
    """(ids of prompt + answer + EOS, index of the first answer token)."""
    from agent_forge.data.schema import render_prompt

    prompt = render_prompt(item.question)
    ids = tokenizer(f"{prompt} {item.answer.strip()}", add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id], n_prompt


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.inference_mode()
def read_batch(model, head, ids, mask, start_id, end_id, thought_len) -> dict:
    """Per position j (predicting x[j+1]): plain and thought-mixed log-likelihood, the plain
    next-token entropy and the mixing weight; (B, T-1) each (callers cut each row to its length)."""
    tb = generate_thoughts(model, ids, mask, None, start_id=start_id, end_id=end_id, n_thoughts=1,
                           thought_len=thought_len, n_true=1, temperature=0.0, banned_ids=[start_id, end_id])
    h_base, h_thought = tb.base_true_hidden[:, :, 0], tb.thought_hidden[:, :, 0, 0]
    ll_mixed = token_logprobs(lm_logits(model, head(h_base, h_thought)), tb.true_tokens[..., 0])
    return {"plain": tb.ll_without[..., 0][:, :-1].float(), "mixed": ll_mixed[:, :-1].float(),
            "entropy": next_token_entropy(tb.base_logits.float())[:, :-1],
            "weight": head.weight(h_base, h_thought)[..., 0][:, :-1].float()}


@torch.inference_mode()
def plain_ll(model, ids, mask) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return token_logprobs(logits, ids[:, 1:])


def read_all(model, head, tok, items, start_id, end_id, L, batch, base=None) -> list[dict]:
    """One row per question: per-position tensors (1-D over its real positions) and its answer mask."""
    rows = []
    for i in range(0, len(items), batch):
        enc = [encode(tok, it) for it in items[i:i + batch]]
        ids, mask = pad([e[0] for e in enc], tok.pad_token_id or tok.eos_token_id)
        got = read_batch(model, head, ids, mask, start_id, end_id, L)
        base_ll = plain_ll(base, ids, mask) if base is not None else None
        for b, (row_ids, n_prompt) in enumerate(enc):
            n = len(row_ids) - 1  # predictions x[1..n]
            r = {k: v[b, :n] for k, v in got.items()}
            r["answer"] = torch.arange(n) >= n_prompt - 1  # predicts a token of the answer (or EOS)
            if base_ll is not None:
                r["base"] = base_ll[b, :n]
            rows.append(r)
        print(f"  read {min(i + batch, len(items))}/{len(items)}", flush=True)
    return rows


def nll(rows, key: str, scope: str, thr: float | None = None) -> np.ndarray:
    """Per question: mean NLL over the scope's positions; `mixed` only where entropy > thr."""
    out = []
    for r in rows:
        keep = r["answer"] if scope == "answer" else torch.ones_like(r["answer"])
        ll = r[key]
        if thr is not None:
            ll = torch.where(r["entropy"] > thr, r["mixed"], r["plain"])
        out.append(float(-ll[keep].mean()))
    return np.array(out)


def share_kept(none, every, difficult, seed: int = 0) -> dict:
    """(none - difficult) / (none - all): point value and a bootstrap interval over questions."""
    d_all, d_diff = none - every, none - difficult
    point = float(d_diff.mean() / d_all.mean()) if d_all.mean() else float("nan")
    idx = np.arange(len(none))
    lo, hi = bootstrap_ci(idx, lambda s: d_diff[s.astype(int)].mean() / d_all[s.astype(int)].mean(), seed=seed)
    return {"share": point, "ci": [lo, hi]}


def nll_table(rows, thresholds: dict, has_base: bool) -> dict:
    """The NLL rows: mean (per question), paired differences with their intervals."""
    out = {}
    for scope in ("all_tokens", "answer"):
        sc = "answer" if scope == "answer" else "all"
        none, every = nll(rows, "plain", sc), nll(rows, "mixed", sc)
        res = {"none": float(none.mean()), "all": float(every.mean()),
               "all_minus_none": bootstrap_mean_diff(none, every)}
        if has_base:
            base = nll(rows, "base", sc)
            res["before_training"] = float(base.mean())
            res["none_minus_before"] = bootstrap_mean_diff(base, none)
        for f, thr in thresholds.items():
            diff = nll(rows, "plain", sc, thr)
            res[f"difficult@{f:g}"] = {"nll": float(diff.mean()), "minus_none": bootstrap_mean_diff(none, diff),
                                       "share_of_all_gain": share_kept(none, every, diff),
                                       "thought_fraction": thought_fraction(rows, sc, thr)}
        out[scope] = res
    return out


def thought_fraction(rows, scope: str, thr: float) -> float:
    keep = [r["answer"] if scope == "answer" else torch.ones_like(r["answer"]) for r in rows]
    return float(sum(int((r["entropy"][k] > thr).sum()) for r, k in zip(rows, keep)) / sum(int(k.sum()) for k in keep))


def weight_stats(rows, thresholds: dict) -> dict:
    """The mixing weight the head gives: mean and quartiles, everywhere, on answer tokens, at
    the difficult positions of each threshold."""
    def stats(w: torch.Tensor) -> dict:
        q = torch.quantile(w, torch.tensor([0.25, 0.5, 0.75])).tolist() if w.numel() else [float("nan")] * 3
        return {"mean": float(w.mean()) if w.numel() else float("nan"), "q25_50_75": q, "n": int(w.numel())}
    out = {"all": stats(torch.cat([r["weight"] for r in rows])),
           "answer": stats(torch.cat([r["weight"][r["answer"]] for r in rows]))}
    for f, thr in thresholds.items():
        out[f"difficult@{f:g}"] = stats(torch.cat([r["weight"][r["entropy"] > thr] for r in rows]))
    return out


def calibrate(model, tok, items, fractions, batch: int) -> dict:
    """Thresholds: the (1 - f) quantile of plain next-token entropies over the calibration questions."""
    ents = []
    with torch.inference_mode():
        for i in range(0, len(items), batch):
            enc = [encode(tok, it)[0][:-1] for it in items[i:i + batch]]  # the questions' text, no EOS target
            ids, mask = pad(enc, tok.pad_token_id or tok.eos_token_id)
            ent = next_token_entropy(model(input_ids=ids, attention_mask=mask).logits.float())
            ents.append(ent[mask.bool()])
    ent = torch.cat(ents)
    return {f: float(torch.quantile(ent, 1 - f)) for f in fractions}


def accuracy_rows(model, tok, items, model_dir, thresholds: dict, max_new: int) -> dict:
    """Greedy accuracy answering directly (thinking block forced empty), thoughts none / difficult / all."""
    from agent_forge.evaluation.runner import evaluate

    def run(mode, thr=None):
        kw = {"thought_mode": mode, "model_dir": str(model_dir), "thought_threshold": thr} if mode else {}
        res = evaluate(model, tok, items, thinking="off", max_new_tokens=max_new, loglik=False, progress=False, **kw)
        return res, [bool(r["correct"]) for r in res.per_example]

    none, ok_none = run(None)
    out = {"none": {"accuracy": none.accuracy, "ci95": none.ci95, "ms_per_example": none.ms_per_example}}
    for name, mode, thr in [("all", "all", None)] + [(f"difficult@{f:g}", "difficult", t) for f, t in thresholds.items()]:
        res, ok = run(mode, thr)
        out[name] = {"accuracy": res.accuracy, "ci95": res.ci95, "ms_per_example": res.ms_per_example,
                     "minus_none": paired_gain(ok_none, ok)}
    return out


def same_length_prompts(tok, items, batch: int) -> torch.Tensor:
    """`batch` prompts of one token length (no padding: every row decodes the same way)."""
    from collections import defaultdict

    from agent_forge.data.schema import render_prompt

    by_len = defaultdict(list)
    for it in items:
        ids = tok(render_prompt(it.question), add_special_tokens=False)["input_ids"]
        by_len[len(ids)].append(ids)
    rows = max(by_len.values(), key=len)[:batch]
    if len(rows) < batch:
        raise ValueError(f"no {batch} held-out prompts share a length; lower --latency-batches")
    return torch.tensor(rows)


def latency(model, tok, model_dir, items, thresholds: dict, batch: int, n_new: int) -> dict:
    """Seconds to decode n_new tokens for a batch of held-out prompts: plain greedy
    (model.generate with the KV cache) against the thought decoder, all / difficult."""
    ids = same_length_prompts(tok, items, batch)
    mask = torch.ones_like(ids)
    decoders = {"all": load_decoder(model, tok, model_dir, mode="all")}
    decoders.update({f"difficult@{f:g}": load_decoder(model, tok, model_dir, mode="difficult", entropy_threshold=t)
                     for f, t in thresholds.items()})
    banned = decoders["all"].banned
    with torch.inference_mode():
        plain = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                             min_new_tokens=n_new, do_sample=False, suppress_tokens=banned,
                                             pad_token_id=tok.eos_token_id, eos_token_id=None), 2)[0]
    rows = {"plain": {"seconds": plain, "x_plain": 1.0, "thought_fraction": 0.0}}
    for name, dec in decoders.items():
        sec = timed(lambda: dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                         pad_token_id=tok.eos_token_id), 2)[0]
        rows[name] = {"seconds": sec, "x_plain": sec / plain, "thought_fraction": dec.stats.thought_fraction}
    return {"batch": batch, "prompt_len": ids.shape[1], "new_tokens": n_new, "rows": rows}


def load(model_dir: str):
    from agent_forge.models import load_model, read_meta
    from agent_forge.vocab import get_vocab, thinking_token_ids

    model, tok = load_model(model_dir, device="cpu")
    vocab = get_vocab()
    ids = thinking_token_ids(tok, vocab)
    head = load_head(Path(model_dir) / HEAD_FILE)
    L = (read_meta(model_dir).get("config") or {}).get("thought_len") or 8
    return model, tok, head, ids[vocab.open], ids[vocab.close], L


def run(args) -> dict:
    from agent_forge.models import load_model

    torch.set_num_threads(args.threads)
    model, tok, head, start_id, end_id, L = load(args.model)
    held = questions(args.data, args.limit, args.exclude_seen)
    calib = questions(args.calibrate, args.limit, args.exclude_seen)
    if {it.question for it in held} & {it.question for it in calib}:
        raise ValueError("the calibration questions overlap the held-out ones")
    thresholds = calibrate(model, tok, calib, args.fractions, args.batch)
    base = load_model(args.base, device="cpu")[0] if args.base else None
    t0 = time.perf_counter()
    rows = read_all(model, head, tok, held, start_id, end_id, L, args.batch, base)
    rec = {"model": args.model, "base": args.base, "data": args.data, "calibrate": args.calibrate,
           "n": len(held), "n_calibrate": len(calib), "thought_len": L, "thresholds_nats": thresholds,
           "nll": nll_table(rows, thresholds, base is not None), "mixing_weight": weight_stats(rows, thresholds),
           "nll_seconds": time.perf_counter() - t0}
    if args.acc_limit:
        rec["accuracy"] = accuracy_rows(model, tok, held[:args.acc_limit], args.model, thresholds, args.acc_new)
    rec["latency"] = [latency(model, tok, args.model, held, thresholds, b, args.new) for b in args.latency_batches]
    rec.update(machine=f"{platform.machine()} {os.cpu_count()} cpus (shared)", threads=args.threads,
               torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return rec


def print_tables(rec: dict) -> None:
    print(f"\n{rec['model']} on {rec['data']} (n={rec['n']}; thresholds from {rec['calibrate']}: "
          + ", ".join(f"top {100 * f:g}% = {t:.2f} nats" for f, t in rec["thresholds_nats"].items()) + ")")
    print("| scope | no thoughts | thoughts everywhere | everywhere - none [95% CI] | before training |")
    print("|---|---|---|---|---|")
    for scope, r in rec["nll"].items():
        d = r["all_minus_none"]
        before = f"{r['before_training']:.3f}" if "before_training" in r else "-"
        print(f"| {scope} | {r['none']:.3f} | {r['all']:.3f} | {d['mean_diff']:+.3f} [{d['ci'][0]:+.3f}, "
              f"{d['ci'][1]:+.3f}] | {before} |")
    print("\n| scope | difficult positions | share thinking | NLL | - none [95% CI] | share of everywhere gain [CI] |")
    print("|---|---|---|---|---|---|")
    for scope, r in rec["nll"].items():
        for k, v in r.items():
            if k.startswith("difficult@"):
                d, s = v["minus_none"], v["share_of_all_gain"]
                print(f"| {scope} | {k} | {100 * v['thought_fraction']:.0f}% | {v['nll']:.3f} | {d['mean_diff']:+.3f} "
                      f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {s['share']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] |")
    print("\nmixing weight: " + ", ".join(f"{k} {v['mean']:.3f} (median {v['q25_50_75'][1]:.3f})"
                                        for k, v in rec["mixing_weight"].items()))
    for name, r in rec.get("accuracy", {}).items():
        g = r.get("minus_none")
        extra = f", {g['points']:+.1f} points [{g['ci95_points'][0]:+.1f}, {g['ci95_points'][1]:+.1f}]" if g else ""
        print(f"accuracy ({name}): {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
              f"{extra}, {r['ms_per_example']:.0f} ms/question")
    for lat in rec["latency"]:
        print(f"\nlatency, batch {lat['batch']}, {lat['new_tokens']} new tokens, prompt {lat['prompt_len']} tokens:")
        for name, r in lat["rows"].items():
            print(f"  {name:16s} {r['seconds']:.2f} s  x{r['x_plain']:.2f} plain  thinking at "
                  f"{100 * r['thought_fraction']:.0f}% of tokens")


def main(argv=None) -> None:
    args = parse_args(argv)
    rec = run(args)
    print_tables(rec)
    save_result(rec, RESULTS, args.key)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
