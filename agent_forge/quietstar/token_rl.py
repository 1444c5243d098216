"""Step 2, Quiet-STaR RL at the token level: thoughts after (selected) text positions that
are rewarded for making the next real tokens more likely.

One optimiser step on a batch of text crops (B, seq_len):

1. Difficulty: the FROZEN reference model (the Step 1 model the run started from) reads the
   text; its logits feed the KL leash and, for injection "entropy" / "top_fraction", the
   per-position next-token entropy (injector.py) that picks where to think. Using the
   reference's logits costs no extra forward; they differ from the policy's only as far
   as the KL leash lets them.
2. Thoughts: `generate_thoughts` samples K thoughts of `thought_len` tokens (start and end
   included; sampled tokens may not be the start/end tokens) after each selected position
   and teacher-forces the next n_true real tokens, all positions in parallel.
3. Mixing: the mixing head mixes the post-thought hidden state with the base one for each
   of the n_true true tokens -> mixed logits -> ll_mixed (S, K, n_true).
4. Reward per (position, thought): r = sum_t (ll_after - ll_without) over valid true tokens,
   where ll_after is ll_mixed (reward_source "mixed", the paper's choice: the thought is
   judged by what it does to the prediction the model actually makes) or the raw
   post-thought ll_with ("thought"). With a zero-initialised head, "mixed" rewards are 0
   until the head opens (after the first step), which is the paper's behaviour too.
   Baseline = mean r over the K thoughts of the position (so K >= 2 is needed for a
   signal); advantage = r - baseline, clamped to >= 0 when clamp_negative_advantage (the
   reference code does this: only thoughts better than their siblings are reinforced,
   worse ones are not pushed down), detached.
5. Loss = policy_weight * policy + base_nll_weight * base NLL + mixed_nll_weight * mixed NLL
   + kl_coefficient * KL, where policy = -(advantage * log p(thought)) averaged over
   selected positions and thoughts; base NLL is the ordinary next-token loss over every
   real token; mixed NLL the mean -ll_mixed over valid (position, thought, true token);
   KL = mean over real tokens of top-k KL(reference || policy) of the base next-token
   distributions (training/kl.py: kl_ref_to_policy).
6. Gradient clipping, then AdamW or MuGrokfast's RL preset; the start/end-of-thought
   embedding rows then move `meta_token_lr_multiplier` times as far as the optimiser moved
   them (see MetaTokenBoost).

Dropout stays off (eval mode) so log-probs are those the thoughts were sampled with. Batches
and sampling noise are pure functions of (seed, step), so `resume` reproduces an
uninterrupted run exactly. Training runs on the shared loop (training/loop.py); single
process for now: the thought generator calls the backbone directly, so multi-process DDP
is not supported yet.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from agent_forge.quietstar.injector import select_positions, selected_fraction
from agent_forge.quietstar.mixing import MixingHead, load_head, mixed_logits, save_head
from agent_forge.quietstar.thought_inference import HEAD_FILE, MODES
from agent_forge.quietstar.thoughts import NOT_SELECTED, ThoughtBatch, generate_thoughts
from agent_forge.quietstar.token_data import encode_crops, load_texts  # noqa: F401  (callers' names)
from agent_forge.training.batching import step_indices
from agent_forge.training.kl import kl_ref_to_policy
from agent_forge.training.logprobs import token_logprobs
from agent_forge.training.loop import LoopConfig, LoopTrainer, TrainingLoop, rolling_mean
from agent_forge.training.policy_gradient import distinct_n, group_advantages, reinforce_per_thought
from agent_forge.vocab import add_thinking_tokens, get_vocab


@dataclass
class TokenRLConfig:
    """Token-level Step 2 settings (defaults sized for a ~100M model).

    n_thoughts: thoughts per position (K >= 2 for a baseline); None = adaptive
        (models.adaptive_defaults by model size).
    thought_len: tokens per thought incl. start and end; None = adaptive.
    n_true: real tokens after the thought that score it (paper: 4).
    temperature: thought sampling temperature (1 = the policy itself).
    policy_weight / base_nll_weight / mixed_nll_weight / kl_coefficient: loss weights.
    reward_source: "mixed" (paper) or "thought" (raw post-thought prediction).
    clamp_negative_advantage: advantages below 0 become 0 (as the reference code).
    optimizer: "adamw" or "mugrokfast" (RL preset; QK-clip off, see _build_optimizer).
    lr, warmup_steps (linear warm-up, then constant), steps, batch_size (crops per step),
    seq_len (tokens per crop), max_grad_norm, save_every (0 = never), seed.
    injection: "all" | "entropy" (entropy > entropy_threshold nats) | "top_fraction"
        (top `fraction` of each crop's positions by entropy).
    meta_token_lr_multiplier: the start/end-of-thought embedding rows move this many times
        as far per step (the reference trains them ~100x faster; gentler here).
    kl_top_k: top-k of the KL (None = exact). head_inner: mixing-head width (None = H).
    rolling_window: steps in the rolling reward.
    eval_samples / eval_max_new_tokens / eval_thought_positions: the held-out evaluation
        before and after training (run_token_rl with eval_data); thoughts "all" | "difficult".
    records_as: how a records JSONL becomes text: "full" (with its written thinking block) or
        "answer_only" (question and answer: the silent thoughts must do the reasoning).
    grad_probe_every: every this many steps (0 = never), measure the gradient norm over the
        LM's weights of the weighted policy term and of the weighted NLL terms separately
        (two extra backward passes): is the policy term big enough to move the thoughts?
    """

    n_thoughts: int | None = None
    thought_len: int | None = None
    n_true: int = 4
    temperature: float = 1.0
    policy_weight: float = 1.0
    base_nll_weight: float = 0.5
    mixed_nll_weight: float = 0.5
    kl_coefficient: float = 0.1
    reward_source: str = "mixed"
    clamp_negative_advantage: bool = True
    optimizer: str = "adamw"
    lr: float = 1e-5
    warmup_steps: int = 0
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    max_grad_norm: float = 1.0
    save_every: int = 25
    seed: int = 0
    injection: str = "all"
    entropy_threshold: float = 2.0
    fraction: float = 0.25
    meta_token_lr_multiplier: float = 10.0
    kl_top_k: int | None = 64
    head_inner: int | None = None
    rolling_window: int = 20
    mixed_precision: str = "no"
    eval_samples: int = 100
    eval_max_new_tokens: int = 96
    eval_thought_positions: str = "difficult"
    records_as: str = "full"
    grad_probe_every: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_overrides(cls, overrides: dict | None) -> "TokenRLConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides or {}) - known)
        if bad:
            raise ValueError(f"unknown token-RL settings {bad}; known: {sorted(known)}")
        return cls(**(overrides or {}))


def resolve_adaptive(cfg: TokenRLConfig, model) -> TokenRLConfig:
    """Fill n_thoughts / thought_len left as None from the model's measured size."""
    if cfg.n_thoughts is not None and cfg.thought_len is not None:
        return cfg
    from dataclasses import replace

    from agent_forge.models import adaptive_defaults, measure_model

    ad = adaptive_defaults(measure_model(model), cfg.seq_len)
    return replace(cfg, n_thoughts=cfg.n_thoughts or ad["n_thoughts"],
                   thought_len=cfg.thought_len or ad["thought_length"])


def step_generator(seed: int, step: int) -> torch.Generator:
    """The sampling RNG of one step: a pure function of (seed, step), so resume is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


# ---------------------------------------------------------------------------------------
# The loss


@dataclass
class Selected:
    """The ThoughtBatch fields at the S selected positions only (packed, no wasted rows)."""

    valid: torch.Tensor        # (S, n_true) bool
    targets: torch.Tensor      # (S, n_true)
    ll_with: torch.Tensor      # (S, K, n_true)
    ll_without: torch.Tensor   # (S, n_true)
    logprob_sum: torch.Tensor  # (S, K)
    h_base: torch.Tensor       # (S, n_true, H)
    h_thought: torch.Tensor    # (S, K, n_true, H)
    tokens: torch.Tensor       # (S, K, L)

    @classmethod
    def from_batch(cls, tb: ThoughtBatch) -> "Selected":
        b, j = tb.selected.nonzero(as_tuple=True)
        return cls(tb.true_valid[b, j], tb.true_tokens[b, j], tb.ll_with[b, j], tb.ll_without[b, j],
                   tb.logprob_sum[b, j], tb.base_true_hidden[b, j], tb.thought_hidden[b, j],
                   tb.thought_tokens[b, j])


def rewards(ll_after: torch.Tensor, ll_without: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """r (S, K) = sum over valid true tokens of log p(x | thought) - log p(x | no thought)."""
    return ((ll_after - ll_without[:, None]) * valid[:, None]).sum(-1)


def advantages(r: torch.Tensor, clamp_negative: bool = True) -> torch.Tensor:
    """r (S, K) minus the mean over the K thoughts of the same position (the group baseline,
    no std scaling); optionally clamped at 0."""
    adv = group_advantages(r.flatten(), r.shape[-1], normalize_std=False).view_as(r)
    return adv.clamp_min(0.0) if clamp_negative else adv


def base_nll(base_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Ordinary next-token NLL over every real token that has a real successor."""
    m = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    if not m.any():
        return base_logits.sum() * 0.0
    return F.cross_entropy(base_logits[:, :-1][m].float(), input_ids[:, 1:][m])


def token_rl_loss(model, head: MixingHead, tb: ThoughtBatch, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, ref_logits: torch.Tensor | None,
                  cfg: TokenRLConfig) -> dict:
    """All loss parts of one step (tensors; 'loss' is the weighted total) plus the pieces
    the metrics need (reward, advantage, mixing weight, the packed selection)."""
    sel = Selected.from_batch(tb)
    K = sel.ll_with.shape[1]
    h_base = sel.h_base[:, None].expand_as(sel.h_thought)
    targets = sel.targets[:, None].expand(-1, K, -1)
    ll_mixed = token_logprobs(mixed_logits(model, head, h_base, sel.h_thought), targets)
    valid = sel.valid[:, None].expand_as(ll_mixed)
    after = ll_mixed if cfg.reward_source == "mixed" else sel.ll_with
    if cfg.reward_source not in ("mixed", "thought"):
        raise ValueError(f"reward_source must be 'mixed' or 'thought', not {cfg.reward_source!r}")
    r = rewards(after.detach(), sel.ll_without.detach(), sel.valid)
    adv = advantages(r, cfg.clamp_negative_advantage)
    parts = {"policy": reinforce_per_thought(adv, sel.logprob_sum),
             "base_nll": base_nll(tb.base_logits, input_ids, attention_mask),
             "mixed_nll": -(ll_mixed * valid).sum() / valid.sum().clamp_min(1)}
    parts["kl"] = (kl_ref_to_policy(ref_logits, tb.base_logits, attention_mask, cfg.kl_top_k)
                   if ref_logits is not None and cfg.kl_coefficient else tb.base_logits.sum() * 0.0)
    parts["loss"] = (cfg.policy_weight * parts["policy"] + cfg.base_nll_weight * parts["base_nll"]
                     + cfg.mixed_nll_weight * parts["mixed_nll"] + cfg.kl_coefficient * parts["kl"])
    with torch.no_grad():
        w = head.weight(sel.h_base, sel.h_thought[:, 0]) if len(sel.valid) else torch.zeros(1)
    return {**parts, "reward": r, "advantage": adv, "mix_weight": w, "selected": sel}


def thought_diversity(tokens: torch.Tensor) -> float:
    """Mean over positions of distinct-2 of the position's K thoughts (token bigrams inside each
    thought, start/end excluded; 1 when too short to hold one). tokens (S, K, L); 0 for S = 0."""
    if tokens.shape[0] == 0:
        return 0.0
    per = [distinct_n([t[1:-1] for t in pos.tolist()], 2, empty=1.0) for pos in tokens]
    return sum(per) / len(per)


def thought_token_logprob(tb: ThoughtBatch) -> float:
    """Mean log-probability of the sampled thought tokens (forced start/end excluded): it rises
    as the policy term concentrates the thoughts on the ones it rewards."""
    sampled = tb.thought_tokens[..., 1:-1] != NOT_SELECTED
    if not sampled.any():
        return 0.0
    return float(tb.thought_logprobs[..., 1:-1][sampled].detach().mean())


def grad_norms(model, parts: dict, cfg: TokenRLConfig) -> dict:
    """L2 norms over the LM's weights of the gradient of the weighted policy term and of the
    weighted NLL terms (base + mixed), each alone; the graph is kept for the real backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    lm = cfg.base_nll_weight * parts["base_nll"] + cfg.mixed_nll_weight * parts["mixed_nll"]

    def norm(term: torch.Tensor) -> float:
        if not term.requires_grad:
            return 0.0
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return sum(float(g.float().square().sum()) for g in grads if g is not None) ** 0.5

    pol, lm_norm = norm(cfg.policy_weight * parts["policy"]), norm(lm)
    return {"grad_norm_policy": pol, "grad_norm_lm": lm_norm, "grad_ratio_policy_lm": pol / max(lm_norm, 1e-30)}


# ---------------------------------------------------------------------------------------
# Start/end-of-thought embeddings that learn faster


class MetaTokenBoost:
    """Move the start/end-of-thought input-embedding rows `multiplier` times as far as the
    optimiser moved them this step: row <- before + multiplier * (after - before).

    Why not a gradient hook scaling those rows' gradients: Adam-type updates divide by the
    gradient's running RMS, so a constant gradient scale nearly cancels (and a 10x gradient
    would also dominate the global-norm clipping, shrinking every other update). Scaling
    the applied update is an effective per-row learning-rate multiplier for any optimiser.
    With tied embeddings the LM-head rows are the same tensor and move with them.
    """

    def __init__(self, model, token_ids: list[int], multiplier: float):
        self.weight = model.get_input_embeddings().weight
        self.ids = torch.tensor(sorted(set(token_ids)), device=self.weight.device)
        self.multiplier = float(multiplier)
        self._before: torch.Tensor | None = None

    def before_step(self) -> None:
        if self.multiplier != 1.0:
            self._before = self.weight.detach()[self.ids].clone()

    @torch.no_grad()
    def after_step(self) -> None:
        if self._before is None:
            return
        now = self.weight[self.ids]
        self.weight[self.ids] = self._before + self.multiplier * (now - self._before)
        self._before = None


def step_loss(model, ref, head: MixingHead, ids: torch.Tensor, mask: torch.Tensor, cfg: TokenRLConfig,
              start_id: int, end_id: int, generator: torch.Generator | None = None) -> tuple[dict, ThoughtBatch]:
    """Steps 1-5 of the module docstring for one batch: (loss parts, thought batch), ready
    for backward. `ref` (frozen) gives the KL target and the difficulty signal; it is not run
    when neither needs it."""
    need_ref = ref is not None and (cfg.kl_coefficient != 0 or cfg.injection != "all")
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits if need_ref else None
    selected = select_positions(ref_logits, mask, cfg.injection, cfg.entropy_threshold, cfg.fraction)
    model.eval()
    tb = generate_thoughts(model, ids, mask, selected, start_id=start_id, end_id=end_id,
                           n_thoughts=cfg.n_thoughts, thought_len=cfg.thought_len, n_true=cfg.n_true,
                           temperature=cfg.temperature, generator=generator, banned_ids=[start_id, end_id])
    return token_rl_loss(model, head, tb, ids, mask, ref_logits, cfg), tb


# ---------------------------------------------------------------------------------------
# The loop


class TokenPolicy(nn.Module):
    """The LM and its mixing head as one module: one optimiser, one checkpoint file."""

    def __init__(self, model, head: MixingHead):
        super().__init__()
        self.model, self.head = model, head

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def tie_weights(self):
        self.model.tie_weights()


def _build_optimizer(policy: TokenPolicy, cfg: TokenRLConfig):
    """AdamW, or MuGrokfast's RL preset. QK-clip stays off: it swaps the attention
    implementation to one whose mask form `thoughts.mask_kind` does not accept."""
    from agent_forge.optim.mugrokfast import MuGrokfast, build_optimizer, get_config

    if cfg.optimizer == "mugrokfast":
        return MuGrokfast.from_model(policy, get_config("rl", muon_lr=cfg.lr, adam_lr=cfg.lr),
                                     attach_qk_clip=False)
    return build_optimizer(policy, cfg.optimizer, "rl", lr=cfg.lr)


class TokenRLTrainer(LoopTrainer):
    """Runs token-level Step 2 on (model, tokenizer); resumable from out_dir/checkpoints.
    A Stage of training/loop.py: it supplies a step's batch and loss, the loop does the rest."""

    def __init__(self, model, tokenizer, cfg: TokenRLConfig, out_dir: str | Path, tracker=None,
                 head: MixingHead | None = None):
        self.out_dir, self.tracker = Path(out_dir), tracker
        self.token_ids = add_thinking_tokens(model, tokenizer)
        vocab = get_vocab()
        self.start_id, self.end_id = self.token_ids[vocab.open], self.token_ids[vocab.close]
        self.cfg = resolve_adaptive(cfg, model)
        if self.cfg.n_thoughts < 2:
            raise ValueError("n_thoughts must be >= 2: the baseline is the mean over a position's thoughts")
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)  # the Step 1 model, frozen
        w = model.get_input_embeddings().weight
        head = head or MixingHead(model.config.hidden_size, cfg.head_inner)
        policy = TokenPolicy(model, head.to(device=w.device, dtype=w.dtype))
        self.boost = MetaTokenBoost(model, [self.start_id, self.end_id], cfg.meta_token_lr_multiplier)
        self.loop = TrainingLoop(policy, LoopConfig(
            steps=cfg.steps, stage="token_rl", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
            save_every=cfg.save_every, mixed_precision=cfg.mixed_precision), out_dir, tracker)
        self.ids = self.mask = None

    @property
    def model(self):
        return self.loop.unwrapped().model

    @property
    def head(self) -> MixingHead:
        return self.loop.unwrapped().head

    # -- the Stage ------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        """One micro-batch: the step's crops and its sampling RNG (both functions of (seed, step))."""
        cfg, device = self.cfg, self.accelerator.device
        self.t0, self.step = time.perf_counter(), step
        idx = step_indices(step, cfg.batch_size, len(self.ids), cfg.seed)
        return [(self.ids[idx].to(device), self.mask[idx].to(device), step_generator(cfg.seed, step))]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        ids, mask, generator = micro
        self.parts, self.tb = step_loss(self.model, self.ref, self.head, ids, mask, self.cfg, self.start_id,
                                        self.end_id, generator)
        self.batch_mask = mask
        every = self.cfg.grad_probe_every
        self.probe = grad_norms(self.model, self.parts, self.cfg) if every and self.step % every == 0 else {}
        return self.parts["loss"], {}

    def before_update(self) -> None:
        self.boost.before_step()

    def after_update(self) -> None:
        self.boost.after_step()

    def step_row(self, step: int, sums: dict) -> dict:
        return {**self._metrics(self.parts, self.tb, self.batch_mask, time.perf_counter() - self.t0), **self.probe}

    def state(self) -> dict:
        return {"mode": "token"}

    def _metrics(self, parts: dict, tb: ThoughtBatch, mask, seconds: float) -> dict:
        r, sel = parts["reward"], parts["selected"]
        f = lambda t: float(t.detach())  # noqa: E731
        reward_mean = float(r.mean()) if r.numel() else 0.0
        return {"reward_mean": reward_mean,
                "reward_rolling": rolling_mean(self.history, "reward_mean", reward_mean, self.cfg.rolling_window),
                "advantage_mean": float(parts["advantage"].mean()) if r.numel() else 0.0,
                "thought_length": self.cfg.thought_len,
                "thought_diversity": thought_diversity(sel.tokens) if r.numel() else 0.0,
                "n_thoughts": self.cfg.n_thoughts, "num_thoughts": int(r.numel()),
                "frac_thought": selected_fraction(tb.selected, mask),
                "kl": f(parts["kl"]), "loss": f(parts["loss"]), "policy_loss": f(parts["policy"]),
                "base_nll": f(parts["base_nll"]), "mixed_nll": f(parts["mixed_nll"]),
                "mix_weight_mean": float(parts["mix_weight"].mean()), "step_seconds": seconds,
                "thought_token_logprob": thought_token_logprob(tb)}

    def run(self, ids: torch.Tensor, mask: torch.Tensor, resume: bool = False,
            progress: Callable | None = None) -> dict:
        """Train from the start (or the last checkpoint) to cfg.steps; returns the summary."""
        self.ids, self.mask = ids, mask
        start = self.loop.setup(lambda policy: _build_optimizer(policy, self.cfg), self, resume)
        self.loop.run(self, start, progress=progress)
        return self.summary()

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        keys = ("reward_mean", "reward_rolling", "kl", "loss", "base_nll", "mixed_nll",
                "mix_weight_mean", "frac_thought", "thought_diversity", "sec_per_step")
        return {"steps": last.get("step", 0), **{k: last.get(k) for k in keys},
                "first_reward_rolling": self.history[0]["reward_rolling"] if self.history else None}


def run_token_rl(model_spec_or_dir, out: str | Path, data_path_or_records, overrides: dict | None = None,
                 tracker=None, progress: Callable | None = None, resume: bool = False,
                 eval_data: str | None = None, device: str | None = None) -> dict:
    """Token-level Step 2 end to end: load, evaluate, train, save out/model (+ mixing_head.safetensors,
    forge_meta phase 3 / step 2 / mode "token"), evaluate again, write out/step2.json; returns
    step2.json's dict.

    `model_spec_or_dir` is anything models.load_model takes, or a (model, tokenizer) pair; a
    directory holding mixing_head.safetensors continues with that head. With `eval_data` (an
    evalsets name) the first cfg.eval_samples questions are answered (thinking on) before
    training and after it, with and without the silent thoughts (see held_out_eval).
    """
    from agent_forge.models import load_model, save_model
    from agent_forge.quietstar.token_eval import eval_items, eval_pass, held_out_eval

    cfg = TokenRLConfig.from_overrides(overrides)
    if cfg.eval_thought_positions not in MODES:
        raise ValueError(f"eval_thought_positions must be one of {MODES}, not {cfg.eval_thought_positions!r}")
    if isinstance(model_spec_or_dir, tuple):
        (model, tokenizer), parent, head = model_spec_or_dir, "in-memory model", None
    else:
        model, tokenizer = load_model(str(model_spec_or_dir), device=device)
        parent = str(model_spec_or_dir)
        head_path = Path(parent) / HEAD_FILE
        head = load_head(head_path) if head_path.is_file() else None
    out = Path(out)
    trainer = TokenRLTrainer(model, tokenizer, cfg, out, tracker, head)
    items = eval_items(eval_data, cfg.eval_samples)
    before = eval_pass(trainer.model, tokenizer, items, cfg, parent if head is not None else None)
    texts = load_texts(data_path_or_records, records_as=trainer.cfg.records_as)
    ids, mask = encode_crops(texts, tokenizer, trainer.cfg.seq_len)
    summary = trainer.run(ids, mask, resume=resume, progress=progress)
    meta = {"phase": 3, "step": 2, "mode": "token", "parent": parent,
            "thinking_tokens": trainer.token_ids, "vocab": get_vocab().to_dict(),
            "config": trainer.cfg.to_dict(), "metrics": summary, "mixing_head": HEAD_FILE}
    model_dir = out / "model"
    save_model(trainer.model, tokenizer, model_dir, meta)
    save_head(trainer.head, model_dir / HEAD_FILE)
    held_out = held_out_eval(trainer.model, tokenizer, items, cfg, model_dir, before) if items else None
    result = {"mode": "token", "model_dir": str(model_dir), "crops": len(ids),
              "config": trainer.cfg.to_dict(), "metrics": summary, "eval_data": eval_data,
              "held_out": held_out, "history": trainer.history}
    (out / "step2.json").write_text(json.dumps(result, indent=2, default=str))
    return result
