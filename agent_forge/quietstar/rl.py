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
   - plus `honesty_weight` * check honesty (validation.check_honesty.honest_share: the share
     of the thought's `<doubt>`/`<falsify>`/`<correct>` checks whose stated verdict agrees
     with the arithmetic they state). A thought with no judged check earns 0, as does one
     whose checks all lie: RL is paid for true checks, not for dropping them. Off by default.
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
     ours are) or "full" (exact per-token KL(policy || ref) over the vocabulary, training/kl.py);
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
  claim_consistency / claim_rate and sample_check_honesty / check_rate (the samples' shares,
  and the fraction of samples that have a claim / a judged check), sec_per_step, and the
  step's time split: reward_seconds (answer check + loglik forward), update_seconds
  (policy/reference forwards, backward, optimiser), coherence_seconds.

Training runs on the shared loop (training/loop.py: Accelerate, schedule, clipping, NaN
guard, checkpoints); RLTrainer supplies the sampling, the rewards and the loss. Sampling and
rewards: rl_rollouts.py. Resume: checkpoints (training/checkpoint.py) hold weights,
optimizer (incl. Grokfast state), scheduler, RNG, step and the rolling rewards; the reference model is always the model the run started
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

from agent_forge.data.schema import Record
from agent_forge.quietstar.coherence import claim_consistency
from agent_forge.quietstar.rl_rollouts import (Samples, combine_rewards, is_correct, loglik_gains, mean_or_none,
                                               sample)
from agent_forge.training.batching import step_indices
from agent_forge.training.kl import kl_policy_to_ref
from agent_forge.training.logprobs import sample_logits, token_logprobs
from agent_forge.training.loop import LoopConfig, LoopTrainer, TrainingLoop, rolling_mean
from agent_forge.training.policy_gradient import distinct_n, group_advantages, reinforce_per_token
from agent_forge.validation.check_honesty import honest_share
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
    honesty_weight: float = 0.0  # + this * share of the thought's checks whose verdict agrees with their arithmetic
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
# Recomputed log-probabilities in micro-batches


def length_sorted_chunks(s: "Samples", rows: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
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
# The trainer

RewardFn = Callable[["Samples", list[Record]], list[float]]


class RLTrainer(LoopTrainer):
    """Runs Step 2 (answer mode) on (model, tokenizer); resumable from `out_dir/checkpoints`.
    A Stage of training/loop.py: it samples, rewards and supplies the loss; the loop does the rest.

    `reference` is the frozen model of the KL leash (default: a copy of `model` as given,
    i.e. the Step 1 model); `reward_fn(samples, records)` replaces the configured reward
    (tests use a stub).
    """

    def __init__(self, model, tokenizer, cfg: RLConfig, out_dir: str | Path, tracker=None,
                 reference=None, reward_fn: RewardFn | None = None, vocab="default"):
        self.cfg, self.tokenizer, self.tracker, self.reward_fn = cfg, tokenizer, tracker, reward_fn
        self.vocab = get_vocab(vocab)
        self.out_dir = Path(out_dir)
        add_thinking_tokens(model, tokenizer, self.vocab)
        self.loop = TrainingLoop(model.eval(), LoopConfig(
            steps=cfg.steps, stage="rl", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
            save_every=cfg.save_every, mixed_precision=cfg.mixed_precision, seed=cfg.seed,
            batch_log="questions"), out_dir, tracker)  # RL losses change sign: the guard checks NaN/inf only
        self.reference = (reference or copy.deepcopy(model)).eval().requires_grad_(False)
        self.scorer = None
        if cfg.coherence:
            from agent_forge.quietstar.coherence import CoherenceScorer

            self.scorer = CoherenceScorer(cfg.coherence_embedder, cfg.coherence_weights, model, tokenizer,
                                          self.vocab)
        self.last_samples: Samples | None = None
        self.records, self.lm_examples, self.monitor, self.stopped_reason = [], None, None, None

    def _setup(self, resume: bool) -> int:
        from dataclasses import replace

        from agent_forge.optim.mugrokfast import build_optimizer, get_config

        preset = replace(get_config("rl"), weight_decay=self.cfg.weight_decay)
        return self.loop.setup(lambda m: build_optimizer(m, self.cfg.optimizer, preset, lr=self.cfg.lr),
                               self, resume)

    # -- the Stage: sample and reward, then the micro-batches' loss -------------------------
    def micro_batches(self, step: int) -> list:
        """Sample K completions per question of the step, reward them, and return the
        micro-batches of the update (policy + KL; then the LM loss when it is on)."""
        cfg, acc = self.cfg, self.accelerator
        idx = step_indices(step, cfg.questions_per_step, len(self.records), cfg.seed, offset=7)
        batch = [self.records[i] for i in idx[acc.process_index::acc.num_processes]]
        policy = self.loop.unwrapped()
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
        honesty = [honest_share(t, self.vocab) for t in s.thoughts]  # None: no judged check
        rewards = (self.reward_fn(s, batch) if self.reward_fn
                   else combine_rewards(correct, gains, cfg, consistency, honesty))
        adv = group_advantages(torch.tensor(rewards), k, cfg.normalize_std).to(s.sequences.device)
        self.current = dict(idx=idx, batch=batch, s=s, rewards=rewards, correct=correct, gains=gains,
                            adv=adv, consistency=consistency, honesty=honesty, t1=time.perf_counter(), t0=t0)
        micros = self.policy_micros(s, adv)
        if cfg.lm_coefficient > 0 and self.lm_examples:
            idx_mine = idx[acc.process_index::acc.num_processes]
            micros.append(("lm", [self.lm_examples[i] for i in idx_mine if self.lm_examples[i] is not None]))
        return micros

    def policy_micros(self, s: Samples, adv: torch.Tensor) -> list:
        """Length-sorted, padding-trimmed micro-batches of the samples, with the whole
        batch's normalisers (so accumulating them gives the full batch's loss and gradient)."""
        n_tok, n_seq = float(s.new_mask.sum()), float(s.new_mask.shape[0])
        total = {"token": n_tok, "sequence": n_seq}.get(self.cfg.loss_norm, n_tok)
        return [("policy", seq, mask, new_mask, adv[rows], total, n_tok)
                for rows, seq, mask, new_mask in length_sorted_chunks(s, self.cfg.micro_batch_rows)]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        if micro[0] == "lm":
            lm = self._lm_loss(micro[1])
            return cfg.lm_coefficient * lm, {"lm_loss": float(lm.detach())}
        _, seq, mask, new_mask, adv, total, n_tok = micro
        n_new, targets = new_mask.shape[1], seq[:, -new_mask.shape[1]:]
        logits = sample_logits(self.model, seq, mask, n_new)
        logp = token_logprobs(logits, targets)
        pol = reinforce_per_token(logp, new_mask, adv, cfg.loss_norm, total)
        kl = self._kl(seq, mask, new_mask, logits, logp, targets, n_tok)
        weighted = cfg.policy_coefficient * pol
        return (weighted + cfg.kl_coefficient * kl if kl is not None else weighted,
                {"policy_loss": float(pol.detach()), "kl": None if kl is None else float(kl.detach())})

    def _kl(self, seq, mask, new_mask, logits, logp, targets, n_tok):
        """The KL term of one micro-batch; None (not computed: a whole forward saved) when
        kl_coefficient is 0."""
        if self.cfg.kl_coefficient == 0:
            return None
        with torch.no_grad():
            ref_logits = sample_logits(self.reference, seq, mask, new_mask.shape[1])
        ref_logp = token_logprobs(ref_logits, targets)
        return kl_policy_to_ref(logits, ref_logits, logp, ref_logp, new_mask, self.cfg.kl_estimator, n_tok)

    def _lm_loss(self, examples) -> torch.Tensor:
        from agent_forge.quietstar.bake import sft_loss
        from agent_forge.quietstar.bake_data import collate

        if not examples:
            return torch.zeros((), device=self.accelerator.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        b = {k: v.to(self.accelerator.device) for k, v in collate(examples, pad).items()}
        return sft_loss(self.model, b)

    def step_row(self, step: int, sums: dict) -> dict:
        """The step's metrics (the SPEC's list; the module docstring)."""
        cfg, c = self.cfg, self.current
        pol, kl, lm = sums.get("policy_loss", 0.0), sums.get("kl"), sums.get("lm_loss")
        loss = (cfg.policy_coefficient * pol + cfg.kl_coefficient * (kl or 0.0)
                + (cfg.lm_coefficient * lm if lm is not None else 0.0))
        row = {"loss": loss, "policy_loss": pol, "kl": kl, "lm_loss": lm, "questions": c["idx"],
               "reward_seconds": c["t1"] - c["t0"], "update_seconds": time.perf_counter() - c["t1"]}
        row.update(self._sample_metrics(c["s"], c["batch"], c["rewards"], c["correct"], c["gains"], c["adv"],
                                        c["consistency"], c["honesty"]))
        row["reward_rolling"] = rolling_mean(self.history, "reward_mean", row["reward_mean"], cfg.rolling_window)
        return row

    def _sample_metrics(self, s: Samples, batch, rewards, correct, gains, adv, consistency, honesty) -> dict:
        k, n = self.cfg.samples_per_question, len(rewards)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        groups = [[t.split() for t in s.thoughts[q * k:(q + 1) * k]] for q in range(n // k)]
        out = {"reward_mean": mean(rewards), "accuracy": mean(correct), "num_thoughts": n,
               "thought_length": mean(s.thought_lengths), "closed_rate": mean([float(c) for c in s.closed]),
               "thought_diversity": mean([distinct_n(g) for g in groups]),
               "inference_seconds": s.seconds, "loglik_gain": mean(gains) if gains else None,
               "claim_consistency": mean_or_none([c for c in consistency if c is not None]),
               "claim_rate": mean([float(c is not None) for c in consistency]),
               "sample_check_honesty": mean_or_none([h for h in honesty if h is not None]),
               "check_rate": mean([float(h is not None) for h in honesty]),
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

    def on_step_end(self, step: int, row: dict) -> bool:
        """The anti-theater monitor every anti_theater_every steps; True stops the run."""
        cfg = self.cfg
        if self.monitor is None or not cfg.anti_theater_every or step % cfg.anti_theater_every or step >= cfg.steps:
            return False
        return self._check(self.monitor, step)

    def state(self) -> dict:
        return {"stage": "rl"}

    # -- run ------------------------------------------------------------------------------
    def run(self, records: list[Record], resume: bool = False, progress=None, monitor=None) -> RLResult:
        """Train to cfg.steps. `monitor(step, model) -> dict` runs every anti_theater_every
        steps; a result with "stop": True ends training early, its "reason" recorded."""
        self.stopped_reason = None
        if not records:
            raise ValueError("no training questions")
        self.records, self.monitor = records, monitor
        self.lm_examples = self._encode_lm(records) if self.cfg.lm_coefficient > 0 else None
        step = self.loop.run(self, self._setup(resume), progress=progress)
        return RLResult(step, self.summary(), self.history)

    def _check(self, monitor, step: int) -> bool:
        verdict = monitor(step, self.loop.unwrapped())
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
        return self.loop.unwrapped()


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


def unseen_eval_items(eval_data: str, limit: int | None, records) -> tuple[list, int]:
    """Up to `limit` items of `eval_data` that no training record asks, and how many were
    left out: the before/after comparison is then on questions RL never trained on."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.overlap import items_not_asking

    items = load_eval_set(eval_data, limit=2 * limit if limit else None)  # room for those left out
    kept = items_not_asking(items, [r.question for r in records])
    return (kept[:limit] if limit else kept), len(items) - len(kept)


def run_step2(model_spec: str, out, overrides: dict | None = None, config_path=None, data=None,
              eval_data: str = "easy_arithmetic", resume: bool = False, device=None,
              tracker=None, progress=None, monitor=None) -> dict:
    """RL on `model_spec` (the Step 1 model); writes `out/model`, `out/step2.json` and
    `out/train_questions.jsonl` (what it trained on, for `forge ab --exclude-seen`).

    Returns the metrics, with "model_dir" (what the pipeline carries forward).
    """
    from agent_forge.data.schema import write_records
    from agent_forge.models import load_model, read_meta, save_model
    from agent_forge.quietstar.step1 import generation_metrics
    from agent_forge.validation.stats import paired_gain
    from agent_forge.vocab import thinking_token_ids

    cfg = make_config(overrides, config_path)
    out = Path(out)
    records, n_dropped = training_records(cfg, data)
    model, tokenizer = load_model(model_spec, device=device)
    items, n_seen = unseen_eval_items(eval_data, cfg.eval_samples, records)
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
               "eval_n": len(items), "eval_left_out_seen": n_seen,
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
