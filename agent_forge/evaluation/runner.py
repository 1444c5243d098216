"""Evaluate a model on a list of EvalItems: generate, read the answer slot, score, summarise.

Scoring per item (answers.py has the extraction rules):
- multiple choice (item.choices set): the letter read from the answer slot vs the gold
  letter; and, separately, `choice_loglik_accuracy` ranks the choices by log-likelihood
  as lm-evaluation-harness does for ARC / CommonsenseQA (acc, and acc_norm by length).
- numeric gold: the FIRST number of the answer slot, compared exactly as a rational.
- anything else: case- and punctuation-insensitive exact match of the slot.
For plain-model replies we also report lm-eval's GSM8K flexible match (last number of
the whole reply, which runs to "Question:" or EOS as lm-eval's gsm8k generates it) as
`flexible_accuracy`, so the two readings can be compared. answers.py lists where our
readings differ from lm-evaluation-harness.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from agent_forge.evaluation.answers import (
    choice_letters, cut_at_until, extract_choice, extract_number, gsm8k_flexible, gsm8k_gold,
    is_numeric, numbers_equal,
)
from agent_forge.evaluation.metrics import accuracy_summary
from agent_forge.inference import GENERATION_BATCH, Generation, generate_answers
from agent_forge.training.logprobs import continuation_logprob
from agent_forge.vocab import analyze_usage, get_vocab, has_thinking_tokens


class PerExampleReport:
    """A report dataclass whose per-item rows (`per_example`) stay out of its dict unless asked for."""

    def to_dict(self, with_examples: bool = False) -> dict:
        d = asdict(self)
        if not with_examples:
            d.pop("per_example")
        return d


@dataclass
class EvalResult(PerExampleReport):
    """Accuracy with a Wilson 95% interval, overall and per family, plus cost and usage."""

    accuracy: float
    n: int
    ci95: list[float]
    per_family: dict[str, dict]
    ms_per_example: float
    no_answer_rate: float
    mode: str
    usage: dict | None = None
    flexible_accuracy: float | None = None
    loglik: dict | None = None
    per_example: list[dict] = field(default_factory=list)


def _normalise(s: str) -> str:
    return re.sub(r"[^\w]+", " ", s.lower()).strip()


def score(item, answer: str | None) -> tuple[bool, str | None]:
    """(correct, the prediction read from the answer slot) for one item."""
    if item.choices:
        pred = extract_choice(answer, len(item.choices), item.choices)
        return pred is not None and pred == item.answer.strip().upper(), pred
    gold = gsm8k_gold(item.answer)
    if is_numeric(gold):
        pred = extract_number(answer)
        return numbers_equal(pred, gold), pred
    pred = answer.strip() if answer else None
    return bool(pred) and _normalise(pred) == _normalise(item.answer), pred


def evaluate(model, tokenizer, items, thinking: str = "auto", batch_size: int = GENERATION_BATCH,
             max_new_tokens: int | None = None, limit: int | None = None, *,
             generate_fn: Callable[..., list[Generation]] = generate_answers,
             loglik: bool = True, progress: bool = True,
             vocab="default", **gen_kwargs) -> EvalResult:
    """Generate answers for `items` and score them; see the module docstring for rules."""
    items = list(items)[:limit] if limit else list(items)
    if not items:
        raise ValueError("no items to evaluate")
    gens = generate_fn(model, tokenizer, [it.question for it in items], thinking=thinking,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                       vocab=vocab, **gen_kwargs)
    rows = [_example_row(it, g) for it, g in zip(items, gens)]
    summary = accuracy_summary([r["correct"] for r in rows])
    per_family = {fam: accuracy_summary([r["correct"] for r in rows if r["family"] == fam])
                  for fam in sorted({r["family"] for r in rows})}
    mode = gens[0].mode
    plain = [r for r in rows if r["flexible"] is not None]
    result = EvalResult(
        accuracy=summary["accuracy"], n=summary["n"], ci95=summary["ci95"], per_family=per_family,
        ms_per_example=1000 * sum(g.seconds for g in gens) / len(gens),
        no_answer_rate=sum(r["answer"] is None for r in rows) / len(rows), mode=mode,
        usage=analyze_usage([g.completion for g in gens], vocab).to_dict()
        if has_thinking_tokens(tokenizer, vocab) else None,
        flexible_accuracy=sum(r["flexible"] for r in plain) / len(plain) if plain else None,
        per_example=rows,
    )
    choice_items = [it for it in items if it.choices]
    if loglik and choice_items:
        result.loglik = choice_loglik_accuracy(model, tokenizer, choice_items, batch_size=batch_size,
                                               vocab=vocab, progress=progress)
    return result


def _example_row(item, gen: Generation) -> dict:
    correct, pred = score(item, gen.answer_text if gen.closed else None)
    row = {"id": item.id, "correct": correct, "answer": pred, "gold": item.answer,
           "family": item.family, "closed": gen.closed, "reply": gen.answer_text, "thinking": gen.thinking,
           "flexible": None}
    gold = gsm8k_gold(item.answer)
    if gen.mode == "direct" and not item.choices and is_numeric(gold):
        row["flexible"] = numbers_equal(gsm8k_flexible(cut_at_until(gen.completion)) or "", gold)
    return row


# ---------------------------------------------------------------------------------------
# Multiple choice by log-likelihood (lm-eval's acc / acc_norm)


def bare_question(item) -> str:
    """The question without its trailing lettered choice lines ("A. ...")."""
    lines = item.question.rstrip().split("\n")
    letters = choice_letters(len(item.choices))
    tail = lines[-len(item.choices):]
    if len(lines) > len(item.choices) and all(
            ln.startswith(f"{l}.") or ln.startswith(f"{l})") for ln, l in zip(tail, letters)):
        lines = lines[:-len(item.choices)]
    return "\n".join(lines)


def loglik_context(tokenizer, item, vocab="default") -> str:
    """ARC-style context; a thinking model is scored in its answer slot (block forced empty)."""
    from agent_forge.data.schema import render_prompt

    ctx = render_prompt(bare_question(item))
    if has_thinking_tokens(tokenizer, vocab):
        v = get_vocab(vocab)
        ctx += v.open + v.close
    return ctx


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                          progress: bool = False) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair
    (training.logprobs.continuation_logprob on the token ids)."""
    contexts, conts = [], []
    for ctx, cont in pairs:
        ctx_ids = tokenizer(ctx)["input_ids"]
        whole = tokenizer(ctx + cont)["input_ids"]
        if whole[:len(ctx_ids)] != ctx_ids:  # a merge across the boundary: encode apart
            whole = ctx_ids + tokenizer(cont, add_special_tokens=False)["input_ids"]
        contexts.append(ctx_ids)
        conts.append(whole[len(ctx_ids):])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Batched by length (results put back in input order): a batch is padded to its longest
    # row, and callers interleave long and short contexts (with and without a thought).
    order = sorted(range(len(pairs)), key=lambda i: len(contexts[i]) + len(conts[i]))
    starts = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-likelihood", unit="batch")
    out = [0.0] * len(pairs)
    with torch.inference_mode():
        for s in starts:
            idx = order[s:s + batch_size]
            values = continuation_logprob(model, [contexts[i] for i in idx], [conts[i] for i in idx], pad, batch_size)
            for i, v in zip(idx, values):
                out[i] = v
    return out


def choice_loglik_accuracy(model, tokenizer, items, batch_size: int = 16, vocab="default",
                           progress: bool = False) -> dict:
    """acc (argmax total log-likelihood) and acc_norm (per character of the choice)."""
    pairs, owners = [], []
    for k, it in enumerate(items):
        ctx = loglik_context(tokenizer, it, vocab)
        for choice in it.choices:
            pairs.append((ctx, " " + choice.strip()))
            owners.append(k)
    lls = continuation_logprobs(model, tokenizer, pairs, batch_size, progress)
    correct, correct_norm, rows = [], [], []
    for k, it in enumerate(items):
        mine = [(ll, pairs[j][1]) for j, ll in enumerate(lls) if owners[j] == k]
        raw = max(range(len(mine)), key=lambda c: mine[c][0])
        norm = max(range(len(mine)), key=lambda c: mine[c][0] / max(1, len(mine[c][1])))
        gold = choice_letters(len(it.choices)).index(it.answer.strip().upper())
        correct.append(raw == gold)
        correct_norm.append(norm == gold)
        rows.append({"id": it.id, "pred": raw, "pred_norm": norm, "gold": gold})
    acc, acc_norm = accuracy_summary(correct), accuracy_summary(correct_norm)
    return {"acc": acc["accuracy"], "acc_ci95": acc["ci95"], "acc_norm": acc_norm["accuracy"],
            "acc_norm_ci95": acc_norm["ci95"], "n": acc["n"], "per_example": rows}
