"""What every Cognate run measures: validation loss, halting, throughput, diversity, merging,
accuracy on the easy reasoning questions.

Diversity of the three specialisations (the design asks for > 0.3), over the same
validation tokens, for every pair of models (a, b):

    disagreement(a, b) = share of positions where a's and b's greedy next-token predictions differ
    halting_distance(a, b) = total-variation distance between the two distributions of ACT
                             steps per token (histograms over 1 .. the largest max_steps)
    pair score = (disagreement + halting_distance) / 2          (each term in [0, 1])
    diversity = mean pair score over the pairs

So 0 means three copies of one model, and 1 means they never agree on a token and never
halt after the same number of steps. Both parts are reported beside the score. Read it
beside the validation losses: barely trained models disagree a lot by chance, and
different max_recursion_steps alone give a large halting distance while no token has yet
learnt to halt early (in a smoke run every token runs to its cap).

Merging check: the 50/50 weight average of two specialisations (same shapes, one shared
trunk) against its parents and the unigram baseline; a merge of unaligned models would
land near or above the baseline.
"""

from __future__ import annotations

import copy
import itertools
import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_model(model, blocks: torch.Tensor, batch_size: int = 8) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(figures, greedy predictions (N,), halting steps (N,)) over the next-token positions of
    `blocks` (rows of token ids): mean validation loss (LM only) with its 95% interval over
    blocks and each block's loss (`block_losses`, for paired comparisons on the same blocks),
    perplexity, mean ponder cost, mean halting steps and their histogram, forward tokens per second."""
    from agent_forge.evaluation.metrics import mean_interval

    model.eval()
    device = next(model.parameters()).device
    ponder_sum, per_block, preds, steps = 0.0, [], [], []
    started = time.perf_counter()
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        out = model(input_ids=ids, use_cache=False)
        per_block.append(block_losses(out.logits, ids).cpu())
        ponder_sum += float(out.ponder_cost) * ids.numel()
        preds.append(out.logits[:, :-1].argmax(-1).flatten().cpu())
        steps.append(out.halting_steps[:, :-1].flatten().cpu())
    seconds = time.perf_counter() - started
    preds, steps, per_block = torch.cat(preds), torch.cat(steps), torch.cat(per_block)
    loss = float(per_block.mean())  # every block has the same length: the mean over tokens
    figures = {"val_loss": loss, "val_loss_ci95": mean_interval(per_block.tolist())["ci95"],
               "block_losses": per_block.tolist(), "val_perplexity": math.exp(min(loss, 50.0)),
               "ponder": ponder_sum / blocks.numel(),
               "mean_halting_steps": float(steps.float().mean()),
               "halting_histogram": halting_histogram(steps, model.config.max_recursion_steps).tolist(),
               "max_recursion_steps": model.config.max_recursion_steps, "val_tokens": blocks[:, 1:].numel(),
               "forward_tokens_per_s": blocks.numel() / seconds if seconds > 0 else None}
    return figures, preds, steps


def block_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row of `ids` under `logits` (batch, length, vocab)."""
    tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return tokens.view(len(ids), -1).mean(1)


def halting_histogram(steps: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Share of tokens that ran 1, 2, ..., max_steps recursion steps."""
    counts = torch.bincount(steps.long().flatten() - 1, minlength=max_steps)[:max_steps].double()
    return counts / counts.sum().clamp_min(1)


def diversity(predictions: dict[str, torch.Tensor], halting_steps: dict[str, torch.Tensor]) -> dict:
    """The diversity metric of the module docstring, with every pair's parts."""
    names = sorted(predictions)
    if len(names) < 2:
        raise ValueError("diversity needs at least two models")
    top = int(max(int(s.max()) for s in halting_steps.values()))
    hists = {n: halting_histogram(halting_steps[n], top) for n in names}
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        disagree = float((predictions[a] != predictions[b]).double().mean())
        distance = float(0.5 * (hists[a] - hists[b]).abs().sum())
        pairs[f"{a}-{b}"] = {"disagreement": disagree, "halting_distance": distance,
                             "score": (disagree + distance) / 2}
    mean = lambda key: sum(p[key] for p in pairs.values()) / len(pairs)  # noqa: E731
    return {"pairs": pairs, "mean_disagreement": mean("disagreement"),
            "mean_halting_distance": mean("halting_distance"), "diversity": mean("score")}


def diversity_ci(predictions: dict[str, torch.Tensor], halting_steps: dict[str, torch.Tensor], n_blocks: int,
                 n_boot: int = 500, seed: int = 0) -> list[float]:
    """A percentile bootstrap 95% interval of the diversity score, resampling whole validation
    blocks (a block's tokens are not independent of each other): every model's predictions
    and halting steps (flattened, N = n_blocks x positions) are indexed by the same blocks."""
    rows = lambda t: t.reshape(n_blocks, -1)  # noqa: E731
    preds, steps = ({n: rows(t) for n, t in d.items()} for d in (predictions, halting_steps))
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(n_boot):
        idx = torch.randint(0, n_blocks, (n_blocks,), generator=gen)
        scores.append(diversity({n: t[idx].flatten() for n, t in preds.items()},
                                {n: t[idx].flatten() for n, t in steps.items()})["diversity"])
    lo, hi = torch.tensor(scores, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(lo), float(hi)]


def average_weights(model_a, model_b, weight: float = 0.5):
    """A copy of model_a (its config) whose floating-point weights are weight * a + (1 - weight) * b."""
    merged = copy.deepcopy(model_a)
    state_b = model_b.state_dict()
    merged.load_state_dict({k: weight * v + (1 - weight) * state_b[k] if v.is_floating_point() else v
                            for k, v in model_a.state_dict().items()})
    return merged


def merge_check(models: dict, blocks: torch.Tensor, batch_size: int, unigram_losses: list[float],
                parent_losses: dict[str, list[float]]) -> dict:
    """Validation loss of the 50/50 merge of the first two models, with its interval, and its
    paired differences (over `blocks`) from the better parent and the unigram baseline."""
    from agent_forge.evaluation.metrics import clearly_below, paired_difference

    a, b = sorted(models)[:2]
    merged_figures, _, _ = evaluate_model(average_weights(models[a], models[b]), blocks, batch_size)
    merged = merged_figures["block_losses"]
    best = min((a, b), key=lambda n: sum(parent_losses[n]))
    return {"parents": [a, b], "merged_val_loss": merged_figures["val_loss"],
            "merged_val_loss_ci95": merged_figures["val_loss_ci95"], "merged_block_losses": merged,
            "merged_mean_halting_steps": merged_figures["mean_halting_steps"],
            "vs_better_parent": {"parent": best, **paired_difference(merged, parent_losses[best])},
            "better_than_unigram": clearly_below(paired_difference(merged, unigram_losses))}


def extract_answer(completion: str) -> str | None:
    """The text after the first "Answer:" up to the end of its line (the training format)."""
    if "Answer:" not in completion:
        return None
    rest = completion.split("Answer:", 1)[1].strip()
    return rest.splitlines()[0].strip() if rest else None


@torch.no_grad()
def reasoning_accuracy(model, tokenizer, items, max_new_tokens: int = 48, batch_size: int = 8) -> dict:
    """Greedy answers to evaluation questions, prompted in the training format ("Question: q
    / Reasoning:"), the answer read after "Answer:"; accuracy with its 95% interval, and the
    share of completions that never wrote an answer."""
    from agent_forge.data.parse import answers_match
    from agent_forge.evaluation.metrics import accuracy_summary

    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    correct, missing = [], 0
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            enc = tokenizer([f"Question: {it.question}\nReasoning:" for it in chunk], return_tensors="pt",
                            padding=True).to(next(model.parameters()).device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for item, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                pred = extract_answer(tokenizer.decode(row, skip_special_tokens=True))
                missing += pred is None
                correct.append(answers_match(pred, item.answer))
    finally:
        tokenizer.padding_side = side
    return {**accuracy_summary(correct), "no_answer_rate": missing / max(1, len(items))}
