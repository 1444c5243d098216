"""Step 2, Quiet-STaR RL in answer mode: reinforce thinking blocks that lead to right answers.

For question/answer data the thought is the `[thinking] ... [/endthinking]` block before
the answer (GRPO / STaR style, not Quiet-STaR's per-token thoughts; see research notes).
One optimiser step:

1. Questions: `questions_per_step` of them, a pure function of (seed, step).
2. Sampling: K completions per question from the policy at temperature 1, top_p 1, top_k
   off and no other logits processor (the model's own generation_config is set aside
   while sampling), so samples come from the policy itself; prompt render_prompt(q) +
   "[thinking]".
   One batched `model.generate` with the KV cache; a row stops at EOS or at the newline
   that ends its answer slot (inference.AnswerSlotStop), at most `max_new_tokens`.
3. Rewards (`reward`):
   - "correct": 1 if the answer slot's first number equals the gold (exact rational
     compare; non-numeric gold: normalised exact match, as evaluation.runner.score), else 0.
   - "loglik": log p(" gold" EOS | prompt, thought) - log p(" gold" EOS | prompt,
     "[thinking][/endthinking]") in nats (Quiet-STaR's "with thought beats without"). An
     unclosed thought is closed by appending "[/endthinking]" before scoring.
   - "both" (default): correct + loglik_weight * clip(gain, -loglik_clip, +loglik_clip);
     with the defaults (0.5, 2.0) the loglik part is worth at most +-1, like a right
     answer, so it breaks ties inside groups that are all right or all wrong.
   - plus `consistency_weight` * claim consistency (coherence.claim_consistency: the share
     of the thought's checkable "a op b = c" claims that hold), a process reward that needs
     no gold: of two right answers it prefers the thought without a false step, of two
     wrong ones the thought whose slip was smaller. A thought with no checkable claim
     earns 0 here (no step shown to hold), so it never outranks one with a slip, and RL
     is not paid to stop writing checkable steps; on tasks without arithmetic every
     sample earns 0 and the group baseline removes the term. Off by default.
4. Advantage: reward minus the mean reward of the K samples of the same question; with
   `normalize_std` (default, GRPO) divided by (population std of the group + 1e-4).
5. Loss = policy_coefficient * policy + kl_coefficient * KL + lm_coefficient * LM, where
   - policy = -sum_i A_i * sum_t log p(token_it) over the sampled thought+answer tokens
     (prompt and padding masked), recomputed with grad by one forward over prompt+sample
     (in length-sorted micro-batches of `micro_batch_rows`, columns that are padding in
     every row of a micro-batch trimmed; gradients accumulate, normalisers are global),
     divided by the number of sampled tokens in the batch ("token", default: every token
     weighs the same, as DAPO) or averaged per sequence ("sequence": mean over samples
     of A_i * mean_t log p, as the GRPO paper);
   - KL to the FROZEN Step 1 model on the sampled tokens, mean over tokens: "k3"
     (default; Schulman's estimator exp(r) - r - 1 with r = log p_ref - log p_policy,
     an unbiased estimate of KL(policy || ref) for tokens sampled from the policy, which
     ours are) or "full" (exact per-token KL(policy || ref) over the vocabulary, kl.py);
     kl_coefficient 0 skips the reference forward (kl is then logged as None);
   - LM = cross-entropy on the gold traces of the step's records (off by default).
   Then gradient clipping (max_grad_norm) and AdamW (default, lr 1e-5, constant after
   `warmup_steps`) or MuGrokfast's RL preset (which applies QK-clip itself).
   Dropout stays off (eval mode) so the recomputed log-probs are those that sampled.

Per-step metrics (tracker stage "rl"; the SPEC's list, then extras):
  reward_mean, reward_rolling (mean of the last `rolling_window` steps' reward_mean),
  coherence_semantic, coherence_syntactic, coherence_predictive, coherence_composite
  (coherence.py), thought_length (mean thought tokens, closer excluded), thought_diversity
  (distinct-2 of the K thoughts of a question, averaged over questions), num_thoughts
  (samples this step), kl, lr, accuracy (fraction of samples answered right),
  inference_seconds (sampling wall time this step), anti_theater_divergence,
  anti_theater_ablation, anti_theater_correlation, anti_theater_check_honesty (None here; the pipeline fills them
  when it runs anti-theater), loss, grad_norm;
  extras: policy_loss, lm_loss, loglik_gain, closed_rate, groups_with_signal,
  sec_per_step, and the step's time split: reward_seconds (answer check + loglik
  forward), update_seconds (policy/reference forwards, backward, optimiser),
  coherence_seconds.

Resume: checkpoints (training/checkpoint.py) hold weights, optimizer (incl. Grokfast
state), scheduler, RNG and step; the reference model is always the model the run started
from, and sampling draws from the restored RNG, so a resumed run reproduces the
uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from agent_forge.data.schema import Record, render_prompt
from agent_forge.evaluation.answers import answer_slot, strip_thinking_tokens
from agent_forge.inference import AnswerSlotStop, eos_ids, left_padded
from agent_forge.optim.mugrokfast import qk_clip_log
from agent_forge.quietstar.bake import _precision
from agent_forge.quietstar.coherence import claim_consistency
from agent_forge.quietstar.kl import forward_kl
from agent_forge.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from agent_forge.training.guards import check_loss
from agent_forge.vocab import add_thinking_tokens, get_vocab

ANTI_THEATER_KEYS = ("anti_theater_divergence", "anti_theater_ablation", "anti_theater_correlation",
                     "anti_theater_check_honesty")


@dataclass
class RLConfig:
    """Step 2 settings; defaults sized for a ~100M model on a 2-core CPU (a few s/step)."""

    steps: int = 30  # optimiser steps
    questions_per_step: int = 4  # distinct questions per step
    samples_per_question: int = 4  # K: thoughts+answers sampled per question (the group)
    temperature: float = 1.0  # sampling temperature (1 = the policy itself; the loss uses temperature-1
    #                           log-probs, so other values make the update slightly off-policy)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    max_new_tokens: int = 96  # per sample (thought + answer); easy traces: median 48, p90 71 tokens
    micro_batch_rows: int = 8  # samples per forward/backward (length-sorted, padding trimmed)
    reward: str = "both"  # "correct" | "loglik" | "both" (module docstring)
    loglik_weight: float = 0.5  # weight of the clipped loglik gain in "both"
    loglik_clip: float = 2.0  # clip (nats) of the loglik gain in "both"
    consistency_weight: float = 0.0  # + this * share of the thought's arithmetic claims that hold (no gold needed)
    normalize_std: bool = True  # divide advantages by the group's std (GRPO)
    loss_norm: str = "token"  # "token" (sum over tokens / all tokens) | "sequence"
    kl_coefficient: float = 0.1  # weight of the KL to the frozen Step 1 model; 0 = off (no ref forward)
    kl_estimator: str = "k3"  # "k3" (sampled-token estimator) | "full" (exact, over vocab)
    lm_coefficient: float = 0.0  # weight of an LM loss on gold traces; 0 = off
    policy_coefficient: float = 1.0  # weight of the REINFORCE term; 0 = LM (+ KL) only: the ablation that
    #                                  tells how much of a gain the policy gradient itself made
    optimizer: str = "adamw"  # "adamw" | "mugrokfast" (RL preset)
    lr: float = 1e-5  # learning rate (both of MuGrokfast's if chosen)
    weight_decay: float = 0.0
    warmup_steps: int = 2  # linear warm-up, then constant
    max_grad_norm: float = 1.0
    seed: int = 0  # question order and sampling RNG
    save_every: int = 10  # steps between checkpoints; 0 = never
    anti_theater_every: int = 0  # steps between anti-theater checks (a `monitor` supplies them); 0 = never
    coherence: bool = True  # score coherence every step (needs the loglik gain)
    coherence_embedder: str = "minilm"  # "minilm" | "policy" | "none"
    coherence_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    rolling_window: int = 20  # steps in reward_rolling
    n_questions: int = 600  # questions built when no data file is given
    data_seed: int = 2  # build_gym_records seed (Step 1's default data uses 1)
    families: tuple[str, ...] = ("chain_sum", "basic_arithmetic", "simple_equations")
    eval_samples: int = 100  # held-out questions for the final thinking on/off evaluation
    eval_max_new_tokens: int = 96
    eval_thinking_off: bool = True  # also evaluate with thinking forced off (one more pass)
    eval_before: bool = False  # also evaluate before training (costs one more evaluation)
    mixed_precision: str = "auto"  # "auto" (bf16 on capable GPUs), "no", "bf16", "fp16"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RLResult:
    steps_done: int
    metrics: dict
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Questions


def step_questions(step: int, cfg: RLConfig, n: int) -> list[int]:
    """Indices of the questions of `step`: epoch permutations seeded by (seed, epoch)."""
    out = []
    for pos in range(step * cfg.questions_per_step, (step + 1) * cfg.questions_per_step):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + 7 + epoch))
        out.append(int(perm[offset]))
    return out


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


def combine_rewards(correct: list[float], gains: list[float] | None, cfg: RLConfig,
                    consistency: list[float] | None = None) -> list[float]:
    """The `reward` of each sample, plus consistency_weight * consistency when given."""
    base = _base_rewards(correct, gains, cfg)
    if not cfg.consistency_weight:
        return base
    if consistency is None:
        raise ValueError("consistency_weight > 0 needs the samples' claim consistency")
    return [r + cfg.consistency_weight * (0.0 if c is None else c) for r, c in zip(base, consistency)]


def _base_rewards(correct: list[float], gains: list[float] | None, cfg: RLConfig) -> list[float]:
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


def _mean_or_none(xs: list[float]) -> float | None:
    """Mean, or None for no values (a rate over nothing is unknown, not 0)."""
    return sum(xs) / len(xs) if xs else None


def group_advantages(rewards: torch.Tensor, k: int, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Rows are question-major groups of k; advantage = r - group mean (/ (std + eps))."""
    g = rewards.float().view(-1, k)
    adv = g - g.mean(1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


# ---------------------------------------------------------------------------------------
# Log-probabilities, policy loss, KL


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions as generate() computes them for left-padded rows."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_logits(model, sequences: torch.Tensor, mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """Logits predicting the last `n_new` tokens of `sequences`: (B, n_new, V)."""
    kwargs = dict(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask))
    try:
        logits = model(**kwargs, logits_to_keep=n_new + 1).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -(n_new + 1):-1]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, computed without a full log-softmax copy."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def policy_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, norm: str = "token",
                total: float | None = None) -> torch.Tensor:
    """REINFORCE: -A * log p of the sampled tokens; logp/mask (B, T), adv (B,).

    `total` is the normaliser when the batch is split into micro-batches: the number of
    sampled tokens ("token") or of samples ("sequence") in the whole batch; default: this one's.
    """
    m = mask.float()
    weighted = torch.where(mask.bool(), logp, torch.zeros_like(logp)) * adv[:, None]
    if norm == "token":
        return -weighted.sum() / (m.sum().clamp(min=1.0) if total is None else max(total, 1.0))
    if norm == "sequence":
        per_seq = weighted.sum(1) / m.sum(1).clamp(min=1.0)
        return -per_seq.sum() / (per_seq.shape[0] if total is None else max(total, 1.0))
    raise ValueError(f"loss_norm must be 'token' or 'sequence', not {norm!r}")


def k3_kl(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref) for tokens sampled from the policy."""
    r = logp_ref - logp_policy
    return torch.exp(r) - r - 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Sum of x where mask, divided by the mask's count (or by `total`, for micro-batches)."""
    m = mask.bool()
    denom = m.sum().clamp(min=1) if total is None else max(total, 1.0)
    return torch.where(m, x, torch.zeros_like(x)).sum() / denom


def kl_penalty(policy_logits, ref_logits, logp_policy, logp_ref, mask, estimator: str,
               total: float | None = None) -> torch.Tensor:
    """Mean over sampled tokens of the chosen KL(policy || ref) estimate (`total`: as masked_mean)."""
    if estimator == "k3":
        return masked_mean(k3_kl(logp_policy, logp_ref), mask, total)
    if estimator == "full":
        sel = mask.bool()
        if not sel.any():
            return policy_logits.sum() * 0.0
        kl = forward_kl(policy_logits[sel], ref_logits[sel])
        return kl.sum() / (kl.numel() if total is None else max(total, 1.0))
    raise ValueError(f"kl_estimator must be 'k3' or 'full', not {estimator!r}")


def micro_batches(s: "Samples", rows: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split samples into chunks of similar length, each trimmed of columns that are padding
    in every one of its rows: [(row indices, sequences, mask, new_mask)]."""
    n_prompt = s.sequences.shape[1] - s.n_new
    lengths = s.new_mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out = []
    for start in range(0, len(order), max(1, rows)):
        idx = order[start:start + max(1, rows)]
        sel = torch.tensor(idx, device=s.sequences.device)
        mask = s.mask[sel]
        left = int((mask[:, :n_prompt].sum(0) > 0).float().argmax())
        width = max(1, max(lengths[i] for i in idx))
        right = n_prompt + width
        out.append((idx, s.sequences[sel, left:right], mask[:, left:right], s.new_mask[sel, :width]))
    return out


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
def sample(model, tokenizer, questions: list[str], k: int, cfg: RLConfig, vocab="default",
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
def continuation_logprob(model, contexts: list[list[int]], continuations: list[list[int]],
                         pad_id: int, batch_size: int = 32) -> list[float]:
    """sum_t log p(continuation_t | context, continuation_<t) for each pair (token ids).

    Rows are LEFT-padded so every continuation ends in the last column; then only the
    last (longest continuation + 1) positions need logits (the LM head is skipped elsewhere).
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(contexts), batch_size):
        conts = continuations[i:i + batch_size]
        seqs = [c + a for c, a in zip(contexts[i:i + batch_size], conts)]
        width, n_cont = max(len(s) for s in seqs), max(len(a) for a in conts)
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        logits = sample_logits(model, ids, mask, n_cont)
        logp = token_logprobs(logits, ids[:, -n_cont:])
        out += [float(logp[row, n_cont - len(a):].sum()) for row, a in enumerate(conts)]
    return out


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
# Diversity


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over the texts; 0 when there are none."""
    grams = []
    for t in texts:
        w = t.split()
        grams += [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------
# The trainer

RewardFn = Callable[["Samples", list[Record]], list[float]]


class RLTrainer:
    """Runs Step 2 (answer mode) on (model, tokenizer); resumable from `out_dir/checkpoints`.

    `reference` is the frozen model of the KL leash (default: a copy of `model` as given,
    i.e. the Step 1 model); `reward_fn(samples, records)` replaces the configured reward
    (tests use a stub).
    """

    def __init__(self, model, tokenizer, cfg: RLConfig, out_dir: str | Path, tracker=None,
                 reference=None, reward_fn: RewardFn | None = None, vocab="default"):
        from accelerate import Accelerator

        self.cfg, self.tokenizer, self.tracker, self.reward_fn = cfg, tokenizer, tracker, reward_fn
        self.vocab = get_vocab(vocab)
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.accelerator = Accelerator(mixed_precision=_precision(cfg.mixed_precision), cpu=on_cpu)
        add_thinking_tokens(model, tokenizer, self.vocab)
        self.model = model.eval()
        self.reference = (reference or copy.deepcopy(model)).eval().requires_grad_(False)
        self.scorer = None
        if cfg.coherence:
            from agent_forge.quietstar.coherence import CoherenceScorer

            self.scorer = CoherenceScorer(cfg.coherence_embedder, cfg.coherence_weights, model, tokenizer,
                                          self.vocab)
        self.history: list[dict] = []
        self.recent_rewards: list[float] = []
        self.last_samples: Samples | None = None

    # -- setup --------------------------------------------------------------------------
    def _setup(self, resume: bool) -> int:
        from dataclasses import replace

        from agent_forge.optim.mugrokfast import build_optimizer, get_config

        torch.manual_seed(self.cfg.seed)
        preset = replace(get_config("rl"), weight_decay=self.cfg.weight_decay)
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer, preset, lr=self.cfg.lr)
        warm = max(1, self.cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        start = 0
        ckpt = latest_checkpoint(self.ckpt_dir) if resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            start, self.recent_rewards = state["step"], list(state.get("recent_rewards", []))
            self._truncate_log(start)
        elif self.accelerator.is_main_process:
            (self.out_dir / "batches.jsonl").unlink(missing_ok=True)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        return start

    # -- one step -------------------------------------------------------------------------
    def train_step(self, step: int, records: list[Record], lm_examples=None) -> dict:
        cfg, acc = self.cfg, self.accelerator
        idx = step_questions(step, cfg, len(records))
        mine = idx[acc.process_index::acc.num_processes]
        batch = [records[i] for i in mine]
        policy = acc.unwrap_model(self.model)
        policy.eval()
        k = cfg.samples_per_question
        s = sample(policy, self.tokenizer, [r.question for r in batch], k, cfg, self.vocab)
        self.last_samples = s
        t0 = time.perf_counter()
        golds = [str(r.gold) for r in batch]
        correct = [float(is_correct(a if c else None, golds[i // k]))
                   for i, (a, c) in enumerate(zip(s.answers, s.closed))]
        need_gain = cfg.reward in ("loglik", "both") or self.scorer is not None
        gains = loglik_gains(policy, self.tokenizer, s, golds, k, self.vocab) if need_gain else None
        consistency = [claim_consistency(t, self.vocab) for t in s.thoughts]  # None: no checkable claim
        rewards = (self.reward_fn(s, batch) if self.reward_fn
                   else combine_rewards(correct, gains, cfg, consistency))
        adv = group_advantages(torch.tensor(rewards), k, cfg.normalize_std).to(s.sequences.device)
        t1 = time.perf_counter()
        losses = self._backward(s, adv, batch, lm_examples, mine)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        row = {**losses, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
               "questions": idx, "reward_seconds": t1 - t0, "update_seconds": time.perf_counter() - t1}
        row.update(self._sample_metrics(s, batch, rewards, correct, gains, adv, consistency))
        row.update(qk_clip_log(self.optimizer))  # what QK-clip did this step (MuGrokfast only)
        return row

    def _backward(self, s: Samples, adv, batch, lm_examples, idx) -> dict:
        """Policy + KL loss over length-sorted micro-batches (gradients accumulate), then LM."""
        cfg, acc = self.cfg, self.accelerator
        n_tok, n_seq = float(s.new_mask.sum()), float(s.new_mask.shape[0])
        total = {"token": n_tok, "sequence": n_seq}.get(cfg.loss_norm, n_tok)
        pol_sum, kl_sum = 0.0, None
        for rows, seq, mask, new_mask in micro_batches(s, cfg.micro_batch_rows):
            n_new, targets = new_mask.shape[1], seq[:, -new_mask.shape[1]:]
            with acc.autocast():
                logits = sample_logits(self.model, seq, mask, n_new)
            logp = token_logprobs(logits, targets)
            pol = policy_loss(logp, new_mask, adv[rows], cfg.loss_norm, total)
            kl = self._kl(seq, mask, new_mask, logits, logp, targets, n_tok)
            weighted = cfg.policy_coefficient * pol
            acc.backward(weighted + cfg.kl_coefficient * kl if kl is not None else weighted)
            pol_sum += float(pol.detach())
            kl_sum = None if kl is None else (kl_sum or 0.0) + float(kl.detach())
        lm = None
        if cfg.lm_coefficient > 0 and lm_examples:
            lm = self._lm_loss([lm_examples[i] for i in idx if lm_examples[i] is not None])
            acc.backward(cfg.lm_coefficient * lm)
            lm = float(lm.detach())
        loss = (cfg.policy_coefficient * pol_sum + cfg.kl_coefficient * (kl_sum or 0.0)
                + (cfg.lm_coefficient * lm if lm is not None else 0.0))
        return {"loss": loss, "policy_loss": pol_sum, "kl": kl_sum, "lm_loss": lm}

    def _kl(self, seq, mask, new_mask, logits, logp, targets, n_tok):
        """The KL term of one micro-batch; None (not computed: a whole forward saved) when
        kl_coefficient is 0."""
        if self.cfg.kl_coefficient == 0:
            return None
        with self.accelerator.autocast(), torch.no_grad():
            ref_logits = sample_logits(self.reference, seq, mask, new_mask.shape[1])
        ref_logp = token_logprobs(ref_logits, targets)
        return kl_penalty(logits, ref_logits, logp, ref_logp, new_mask, self.cfg.kl_estimator, n_tok)

    def _lm_loss(self, examples) -> torch.Tensor:
        from agent_forge.quietstar.bake import sft_loss
        from agent_forge.quietstar.bake_data import collate

        if not examples:
            return torch.zeros((), device=self.accelerator.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        b = {k: v.to(self.accelerator.device) for k, v in collate(examples, pad).items()}
        return sft_loss(self.model, b)

    def _sample_metrics(self, s: Samples, batch, rewards, correct, gains, adv, consistency) -> dict:
        k, n = self.cfg.samples_per_question, len(rewards)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        out = {"reward_mean": mean(rewards), "accuracy": mean(correct), "num_thoughts": n,
               "thought_length": mean(s.thought_lengths), "closed_rate": mean([float(c) for c in s.closed]),
               "thought_diversity": mean([distinct_n(s.thoughts[q * k:(q + 1) * k]) for q in range(n // k)]),
               "inference_seconds": s.seconds, "loglik_gain": mean(gains) if gains else None,
               "claim_consistency": _mean_or_none([c for c in consistency if c is not None]),
               "claim_rate": mean([float(c is not None) for c in consistency]),
               "groups_with_signal": mean([float(adv[q * k:(q + 1) * k].abs().max() > 0) for q in range(n // k)])}
        if self.scorer is not None:
            t0 = time.perf_counter()
            qs = [batch[i // k].question for i in range(n)]
            out.update(self.scorer.score(qs, s.thoughts, s.answers, s.completions, gains).means())
            out["coherence_seconds"] = time.perf_counter() - t0
        else:
            out.update({key: None for key in ("coherence_semantic", "coherence_syntactic",
                                              "coherence_predictive", "coherence_composite")})
        out.update({key: None for key in ANTI_THEATER_KEYS})
        return out

    # -- run ------------------------------------------------------------------------------
    def run(self, records: list[Record], resume: bool = False, progress=None, monitor=None) -> RLResult:
        """Train to cfg.steps. `monitor(step, model) -> dict` runs every anti_theater_every
        steps; a result with "stop": True ends training early, its "reason" recorded."""
        cfg = self.cfg
        self.stopped_reason = None
        if not records:
            raise ValueError("no training questions")
        lm_examples = self._encode_lm(records) if cfg.lm_coefficient > 0 else None
        step = self._setup(resume)
        started, first = time.time(), step
        while step < cfg.steps:
            row = self.train_step(step, records, lm_examples)
            step += 1
            self._log_step(step, row, (time.time() - started) / (step - first))
            # checked before saving, so a NaN step never becomes the "last good" checkpoint
            check_loss(row["loss"], None, step, self.ckpt_dir)  # RL losses change sign: NaN/inf only
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                self.save_checkpoint(step)
            if progress is not None:
                progress(step, cfg.steps, row)
            if monitor is not None and cfg.anti_theater_every and step % cfg.anti_theater_every == 0 \
                    and step < cfg.steps and self._check(monitor, step):
                break
        return RLResult(step, self.summary(), self.history)

    def _check(self, monitor, step: int) -> bool:
        verdict = monitor(step, self.accelerator.unwrap_model(self.model))
        self.history.append({"step": step, "anti_theater": verdict})
        if self.tracker is not None:
            figures = {k: verdict.get(k) for k in ("divergence", "ablation", "correlation", "check_honesty")}
            self.tracker.log(figures, step=step, stage="rl_anti_theater")
        if verdict.get("stop"):
            self.stopped_reason = verdict.get("reason", "anti-theater monitor asked to stop")
        return bool(verdict.get("stop"))

    def _encode_lm(self, records):
        from agent_forge.quietstar.bake_data import encode_record

        return [encode_record(r, self.tokenizer, self.vocab, max_len=256) if r.thinking else None for r in records]

    def _log_step(self, step: int, row: dict, sec_per_step: float) -> None:
        self.recent_rewards = (self.recent_rewards + [row["reward_mean"]])[-self.cfg.rolling_window:]
        entry = {k: v for k, v in row.items() if k != "questions"}
        entry["reward_rolling"] = sum(self.recent_rewards) / len(self.recent_rewards)
        entry["sec_per_step"] = sec_per_step
        if self.accelerator.is_main_process:
            with open(self.out_dir / "batches.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "questions": row["questions"]}) + "\n")
        self.history.append({"step": step, **entry})
        if self.tracker is not None:
            self.tracker.log(entry, step=step, stage="rl")

    def _truncate_log(self, step: int) -> None:
        if self.accelerator.is_main_process:
            truncate_log(self.out_dir / "batches.jsonl", step)

    def save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            save_checkpoint(self.ckpt_dir, step, self.accelerator.unwrap_model(self.model), opt,
                            self.scheduler, {"stage": "rl", "recent_rewards": self.recent_rewards})
        self.accelerator.wait_for_everyone()

    def summary(self) -> dict:
        """Means over the run and over its last 5 steps (a resumed run: steps since resume)."""
        h = [r for r in self.history if "reward_mean" in r]

        def avg(key, rows):
            vals = [r[key] for r in rows if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        keys = ("reward_mean", "accuracy", "kl", "thought_length", "closed_rate", "loglik_gain",
                "coherence_composite", "inference_seconds", "sec_per_step")
        return {"steps": h[-1]["step"] if h else 0,
                **{f"{k}_mean": avg(k, h) for k in keys},
                **{f"{k}_last5": avg(k, h[-5:]) for k in keys},
                "reward_first5": avg("reward_mean", h[:5]), "accuracy_first5": avg("accuracy", h[:5])}

    def trained_model(self):
        return self.accelerator.unwrap_model(self.model)


# ---------------------------------------------------------------------------------------
# The recipe: load -> questions -> train -> evaluate -> save


def make_config(overrides: dict | None = None, config_path: str | Path | None = None) -> RLConfig:
    from agent_forge.config import load_yaml, update_dataclass

    cfg = RLConfig()
    if config_path:
        cfg = update_dataclass(cfg, load_yaml(config_path), "rl config")
    cfg = update_dataclass(cfg, overrides or {}, "rl config")
    return cfg


def training_records(cfg: RLConfig, data_path: str | Path | None = None) -> tuple[list[Record], int]:
    """(records with questions and gold answers, how many were left out as eval overlap):
    from a `forge data build` JSONL, or built here with reasoning-gym (seed `data_seed`),
    skipping questions an eval set asks so the build still reaches `n_questions`."""
    from agent_forge.data.overlap import asked_by, filter_overlap

    if data_path:
        from agent_forge.data.schema import read_records

        records, dropped = filter_overlap(read_records(data_path))
        n_dropped = len(dropped)
    else:
        from agent_forge.data.procedural import build_gym_records

        stats: dict = {}
        records = build_gym_records(cfg.n_questions, seed=cfg.data_seed, families=tuple(cfg.families),
                                    difficulty="easy", stats=stats, exclude=asked_by())
        n_dropped = stats.get("eval_overlap", 0)
    kept = [r for r in records if str(r.gold).strip()]
    if not kept:
        raise ValueError(f"{data_path or 'built data'}: no usable training questions")
    return kept, n_dropped


TRAIN_QUESTIONS_FILE = "train_questions.jsonl"


def run_step2(model_spec: str, out, overrides: dict | None = None, config_path=None, data=None,
              eval_data: str = "easy_arithmetic", resume: bool = False, device=None,
              tracker=None, progress=None, monitor=None) -> dict:
    """RL on `model_spec` (the Step 1 model); writes `out/model`, `out/step2.json` and
    `out/train_questions.jsonl` (what it trained on, for `forge ab --exclude-seen`).

    Returns the metrics, with "model_dir" (what the pipeline carries forward).
    """
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.schema import write_records
    from agent_forge.models import load_model, read_meta, save_model
    from agent_forge.quietstar.step1 import generation_metrics
    from agent_forge.validation.stats import paired_gain
    from agent_forge.vocab import thinking_token_ids

    cfg = make_config(overrides, config_path)
    out = Path(out)
    records, n_dropped = training_records(cfg, data)
    model, tokenizer = load_model(model_spec, device=device)
    items = load_eval_set(eval_data, limit=cfg.eval_samples)
    measure = dict(max_new_tokens=cfg.eval_max_new_tokens, with_off=cfg.eval_thinking_off, per_item=True)
    before = generation_metrics(model, tokenizer, items, **measure) if cfg.eval_before and not resume else None
    trainer = RLTrainer(model, tokenizer, cfg, out, tracker=tracker)
    t0 = time.time()
    result = trainer.run(records, resume=resume, progress=progress, monitor=monitor)
    train_seconds = time.time() - t0
    if not trainer.accelerator.is_main_process:
        return result.metrics
    write_records(out / TRAIN_QUESTIONS_FILE, records)
    model = trainer.trained_model()
    after = generation_metrics(model, tokenizer, items, **measure)
    after_ok = after.pop("correct_on")  # per-question lists are not metrics to save
    gain = paired_gain(before.pop("correct_on"), after_ok) if before else None
    metrics = {**result.metrics, **after, "train_seconds": round(train_seconds, 1), "eval_data": eval_data,
               "train_questions": len(records), "dropped_overlap": n_dropped, "mode": "answer",
               "before": before, "gain_vs_before": gain, "stopped_early": trainer.stopped_reason}
    parent_meta = read_meta(model_spec) if Path(str(model_spec)).is_dir() else {}
    meta = {"phase": 3, "step": 2, "parent": str(model_spec), "thinking_tokens": thinking_token_ids(tokenizer),
            "vocab": trainer.vocab.to_dict(), "config": cfg.to_dict(), "metrics": metrics,
            "parent_meta": parent_meta}
    save_model(model, tokenizer, out / "model", meta)
    metrics["model_dir"] = str(out / "model")
    (out / "step2.json").write_text(json.dumps(metrics, indent=2, default=str))
    if tracker is not None:
        tracker.summary({"step2": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    return metrics
