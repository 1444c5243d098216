"""Step 2 answer mode's rollouts: K thought+answer completions per question sampled from
the policy itself (one batched generate with the KV cache), their parse (thought, answer
slot, closed or not), and their rewards (right answer; the log-likelihood gain
log p(gold | prompt, thought) - log p(gold | prompt, empty thinking); claim consistency).
rl.py's module docstring says why each choice is what it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from agent_forge.data.schema import render_prompt
from agent_forge.evaluation.answers import answer_slot, strip_thinking_tokens
from agent_forge.inference import AnswerSlotStop, eos_ids, left_padded
from agent_forge.training.logprobs import continuation_logprob
from agent_forge.vocab import get_vocab


# ---------------------------------------------------------------------------------------
# Sampling


@dataclass
class Samples:
    """K samples per question, question-major. Tensors are on the model's device.

    sequences: (N, P + T) left-padded prompt then generated tokens; mask: its attention
    mask (prompt padding and everything after a row stopped are 0); new_mask (N, T) the
    sampled tokens; prompt_ids: each row's unpadded prompt ids; scores: generate's
    per-step scores (only when asked for, for tests).
    """

    sequences: torch.Tensor
    mask: torch.Tensor
    new_mask: torch.Tensor
    prompt_ids: list[list[int]]
    new_ids: list[list[int]]  # the valid sampled ids of each row
    completions: list[str]
    thoughts: list[str]
    answers: list[str]
    closed: list[bool]
    thought_lengths: list[int]
    seconds: float
    scores: tuple | None = None

    @property
    def n_new(self) -> int:
        return self.new_mask.shape[1]


def valid_lengths(tokenizer, new: torch.Tensor, eos: set[int], close_id: int) -> list[int]:
    """How many generated tokens of each row were really sampled: replay generate's stop
    rules (EOS, or AnswerSlotStop) column by column; the stopping token counts."""
    n, width = new.shape
    stop = AnswerSlotStop(tokenizer, n, True, close_id)
    lengths = [width] * n
    ended = [False] * n
    for t in range(width):
        done = stop(new[:, t:t + 1]).tolist()
        for row in range(n):
            if not ended[row] and (int(new[row, t]) in eos or done[row]):
                lengths[row], ended[row] = t + 1, True
    return lengths


@torch.no_grad()
def sample(model, tokenizer, questions: list[str], k: int, cfg, vocab="default",
           return_scores: bool = False) -> Samples:
    """K sampled thought+answer completions per question (see the module docstring)."""
    from transformers import GenerationConfig

    vocab = get_vocab(vocab)
    prompts = [render_prompt(q) + vocab.open for q in questions for _ in range(k)]
    device = next(model.parameters()).device
    ids, pmask = left_padded(tokenizer, prompts, True, device)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    close_id = tokenizer.convert_tokens_to_ids(vocab.close)
    gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                               max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                               use_cache=True, output_scores=return_scores, return_dict_in_generate=True)
    # generate() fills unset fields from model.generation_config (a hub model may carry
    # top_k, repetition_penalty, min_p ...); a blank one keeps the samples the policy's own.
    saved, model.generation_config = model.generation_config, GenerationConfig()
    t0 = time.perf_counter()
    try:
        out = model.generate(input_ids=ids, attention_mask=pmask, generation_config=gen_cfg,
                             stopping_criteria=[AnswerSlotStop(tokenizer, len(prompts), True, close_id)])
    finally:
        model.generation_config = saved
    seconds = time.perf_counter() - t0
    new = out.sequences[:, ids.shape[1]:]
    lengths = valid_lengths(tokenizer, new.cpu(), set(eos), close_id)
    new_mask = torch.arange(new.shape[1], device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), pmask.cpu())]
    new_ids = [row[:n].tolist() for row, n in zip(new.cpu(), lengths)]
    parsed = [_parse(tokenizer, r, set(eos), close_id, vocab) for r in new_ids]
    return Samples(out.sequences, torch.cat([pmask, new_mask.long()], 1), new_mask, prompt_ids, new_ids,
                   [p[0] for p in parsed], [p[1] for p in parsed], [p[2] for p in parsed],
                   [p[3] for p in parsed], [p[4] for p in parsed], seconds,
                   out.scores if return_scores else None)


def _parse(tokenizer, ids: list[int], eos: set[int], close_id: int, vocab):
    """(completion, thinking text, answer text, closed, thought length in tokens)."""
    body = ids[:-1] if ids and ids[-1] in eos else ids
    completion = vocab.open + tokenizer.decode(body, skip_special_tokens=False)
    closed = close_id in body
    n_thought = body.index(close_id) if closed else len(body)
    thinking = completion[len(vocab.open):].split(vocab.close, 1)[0]
    slot = answer_slot(completion, vocab) if closed else None
    answer = strip_thinking_tokens(slot or "", vocab).strip()
    return completion, thinking, answer, closed, n_thought


# ---------------------------------------------------------------------------------------
# The log-likelihood reward


@torch.no_grad()
def loglik_gains(model, tokenizer, samples: Samples, golds: list[str], k: int, vocab="default") -> list[float]:
    """Per sample: log p(" gold" EOS | prompt, thought) - log p(same | prompt, empty thinking)."""
    vocab = get_vocab(vocab)
    close_id = tokenizer.convert_tokens_to_ids(vocab.close)
    eos = set(eos_ids(model, tokenizer))
    answers = [tokenizer(" " + str(g).strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for g in golds]
    contexts, conts = [], []
    for i, (prompt, new) in enumerate(zip(samples.prompt_ids, samples.new_ids)):
        thought = _thought_ids(new, close_id, eos)
        contexts.append(prompt + thought)
        conts.append(answers[i // k])
    for q in range(len(golds)):  # the empty-thinking baseline, once per question
        contexts.append(samples.prompt_ids[q * k] + [close_id])
        conts.append(answers[q])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lp = continuation_logprob(model, contexts, conts, pad)
    n = len(samples.new_ids)
    return [lp[i] - lp[n + i // k] for i in range(n)]


def _thought_ids(new: list[int], close_id: int, eos: set[int]) -> list[int]:
    """The sampled thought up to and including the closer; an unclosed one gets a closer."""
    if close_id in new:
        return new[:new.index(close_id) + 1]
    return [t for t in new if t not in eos] + [close_id]


# ---------------------------------------------------------------------------------------
# Rewards and advantages


def is_correct(answer_text: str | None, gold: str) -> bool:
    """The evaluation's rule (runner.score): first number of the slot vs gold, exactly."""
    from agent_forge.evaluation.runner import score

    return score(_GoldItem(gold), answer_text)[0]


@dataclass
class _GoldItem:
    answer: str
    choices: list | None = None


def combine_rewards(correct: list[float], gains: list[float] | None, cfg,
                    consistency: list[float] | None = None, honesty: list[float] | None = None) -> list[float]:
    """The `reward` of each sample, plus consistency_weight * consistency and honesty_weight *
    honesty when those weights are on (None, a thought with nothing to score, earns 0)."""
    rewards = _base_rewards(correct, gains, cfg)
    for name, weight, shares in (("claim consistency", cfg.consistency_weight, consistency),
                                 ("check honesty", cfg.honesty_weight, honesty)):
        if not weight:
            continue
        if shares is None:
            raise ValueError(f"a {name} weight > 0 needs the samples' {name}")
        rewards = [r + weight * (0.0 if c is None else c) for r, c in zip(rewards, shares)]
    return rewards


def _base_rewards(correct: list[float], gains: list[float] | None, cfg) -> list[float]:
    if cfg.reward == "correct":
        return list(correct)
    if gains is None:
        raise ValueError(f"reward {cfg.reward!r} needs the loglik gains")
    if cfg.reward == "loglik":
        return list(gains)
    if cfg.reward == "both":
        c = cfg.loglik_clip
        return [r + cfg.loglik_weight * max(-c, min(c, g)) for r, g in zip(correct, gains)]
    raise ValueError(f"reward must be 'correct', 'loglik' or 'both', not {cfg.reward!r}")


def mean_or_none(xs: list[float]) -> float | None:
    """Mean, or None for no values (a rate over nothing is unknown, not 0)."""
    return sum(xs) / len(xs) if xs else None
