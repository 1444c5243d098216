"""How fast does a model write? Greedy decode rate, one prompt at a time, for Phase 4's
speed comparison (BitNet model vs the full-precision parent).

`decode_speed` measures what a CPU chat user waits for: each prompt is answered alone
(batch 1, KV cache on) with greedy decoding of exactly `new_tokens` tokens (EOS is
suppressed until then, so every run does the same work), on the device the model is on,
under torch.inference_mode. A run's rate is all new tokens over the wall time of all its
prompts; the time includes each prompt's prefill, as the user's wait does, which for short
prompts and 64 new tokens is a small share. Nothing else (no separate prefill time) is
reported. `warmup` untimed runs come first: they absorb one-off costs such as torch.compile
(transformers' BitLinear compiles its helpers on first call; on CPU that takes tens of
seconds even for a tiny model) and allocator growth. The result is the median over
`repeats` timed runs, with every run listed, and the number of torch threads used, since
CPU rates scale with it.

`speed_table` lines such results up against a baseline row (tokens/s ratio; > 1 is faster).
"""

from __future__ import annotations

import statistics
import time

import torch

from agent_forge.inference import eos_ids


def _device(model) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(model, tokenizer, prompts: list[str], new_tokens: int = 64, warmup: int = 1,
                 repeats: int = 3) -> dict:
    """Greedy decode rate in new tokens per second, batch 1; median over `repeats` runs.

    Returns {"tokens_per_s": median, "runs": [tokens/s of each timed run], "new_tokens":
    tokens per prompt, "prompts": number of prompts, "threads": torch.get_num_threads()}.
    Raises RuntimeError if generate returns any other number of tokens than `new_tokens`.
    """
    if not prompts:
        raise ValueError("decode_speed needs at least one prompt")
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need new_tokens >= 1, repeats >= 1, warmup >= 0 (got {new_tokens}, {repeats}, {warmup})")
    device = _device(model)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    encoded = [tokenizer(p, return_tensors="pt") for p in prompts]
    encoded = [(e["input_ids"].to(device), e["attention_mask"].to(device)) for e in encoded]
    # min_new_tokens == max_new_tokens: every EOS id is masked until the last step, so no
    # row can stop early; there is no other stopping criterion.
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                  eos_token_id=eos or None, pad_token_id=pad, use_cache=True)

    def one_run() -> float:
        total, seconds = 0, 0.0
        for input_ids, mask in encoded:
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            _sync(device)
            seconds += time.perf_counter() - t0
            n = out.shape[1] - input_ids.shape[1]
            if n != new_tokens:
                raise RuntimeError(f"generate returned {n} new tokens, expected exactly {new_tokens}")
            total += n
        return total / seconds

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                one_run()
            runs = [one_run() for _ in range(repeats)]
    finally:
        model.train(was_training)
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "new_tokens": new_tokens,
            "prompts": len(prompts), "threads": torch.get_num_threads()}


def speed_table(rows: dict[str, dict], baseline: str) -> list[dict]:
    """[{"name", "tokens_per_s", "ratio"}] in the order of `rows`; ratio is the row's tokens/s
    over the baseline row's (the baseline's own ratio is 1.0)."""
    if baseline not in rows:
        raise KeyError(f"baseline {baseline!r} is not one of the rows {list(rows)}")
    base = rows[baseline]["tokens_per_s"]
    if not base > 0:
        raise ValueError(f"baseline {baseline!r} has tokens_per_s = {base}; cannot divide by it")
    return [{"name": name, "tokens_per_s": row["tokens_per_s"], "ratio": row["tokens_per_s"] / base}
            for name, row in rows.items()]
