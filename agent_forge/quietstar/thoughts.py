"""Token-level parallel thoughts (Quiet-STaR) for any HuggingFace causal LM.

After every selected text position j the model writes K thoughts of L tokens
(`start`, L-2 sampled tokens, `end`) and then reads the next `n_true` real tokens, so each
thought can be scored on how much it helps predict the text that follows.

Doing this naively costs one forward per (position, thought, token). Here it costs one base
forward over the text plus L + n_true - 1 passes in which EVERY (position, thought) gets
one new token at once: the text KV cache is shared (expanded K times along the batch, row
b*K + k), each new token gets position id `pos(j) + 1 + pass`, and the token at slot j sees
text[0..j] and its own earlier thought tokens, nothing else. The passes attend with
`thought_attention` (text under a (S, T) mask plus each slot's own keys), so no pass scores
the other slots' thought keys: a pass costs about one plain forward over the selected slots.

Randomness is drawn up front as one uniform number per (b, j, k, token) and turned into a
token by inverse-CDF sampling, so `reference_thoughts` (a slow, per-position loop of plain
forwards) consumes the same draws and must produce the same tokens: that is the test that
the mask, positions and cache are right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from agent_forge.quietstar.thought_attention import split_attention
from agent_forge.training.logprobs import position_ids, token_logprobs

NOT_SELECTED = -1  # token id written where a position had no thought


@dataclass
class ThoughtBatch:
    """Everything the RL step needs, indexed by text position j (shape B, T, ...).

    Thought token i of thought k at position j is `thought_tokens[b, j, k, i]`; i = 0 is the
    forced start token and i = L-1 the forced end token. `thought_logprobs` holds
    log p(token) under the sampling distribution (logits / temperature, banned ids removed)
    for the sampled tokens i = 1..L-2 and 0 for the forced start/end tokens and for positions
    without a thought. The t-th true token after position j is x[j+1+t]: `ll_without` is its
    log-likelihood from the plain forward (hidden state at j+t), `ll_with` after the thought
    (and the true tokens before it); both are 0 where `true_valid` is False.
    """

    thought_tokens: torch.Tensor    # (B, T, K, L) long, NOT_SELECTED where no thought
    thought_logprobs: torch.Tensor  # (B, T, K, L) float, 0 at forced/unselected entries
    selected: torch.Tensor          # (B, T) bool
    true_tokens: torch.Tensor       # (B, T, n_true) long, x[j+1+t] (0 where invalid)
    true_valid: torch.Tensor        # (B, T, n_true) bool
    base_hidden: torch.Tensor       # (B, T, H) last hidden state of the plain forward
    base_logits: torch.Tensor       # (B, T, V)
    base_true_hidden: torch.Tensor  # (B, T, n_true, H) = base_hidden[j+t]
    thought_hidden: torch.Tensor    # (B, T, K, n_true, H) hidden predicting x[j+1+t]
    ll_without: torch.Tensor        # (B, T, n_true)
    ll_with: torch.Tensor           # (B, T, K, n_true)

    @property
    def logprob_sum(self) -> torch.Tensor:
        """Log-probability of each whole thought (B, T, K): the REINFORCE policy term."""
        return self.thought_logprobs.sum(-1)


# ---------------------------------------------------------------- model plumbing

def backbone(model):
    """The transformer without its LM head (`model.model`, `model.transformer`, ...).

    A PEFT wrapper is looked through (its adapters stay active inside the wrapped modules).
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's LM head (and final-logit soft-capping, if the config has it)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _GatherGradient(torch.autograd.Function):
    """Identity on the embedding weight. Its backward receives the passes' sparse lookup
    gradients already summed (sparse + sparse is cheap) and hands them on once."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


def pass_embedder(model):
    """ids -> the model's input embeddings, for the thought passes.

    A plain nn.Embedding is looked up with a sparse gradient through one `_GatherGradient`
    node, so the L + n_true - 1 passes add one sparse gradient into the dense weight
    gradient instead of each building and adding a dense vocabulary x hidden matrix for a few
    hundred rows. Other embedding modules (scaled, adapted, max_norm) are called as they are.
    """
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding or emb.max_norm is not None:
        return emb
    weight = emb.weight
    if torch.is_grad_enabled() and weight.requires_grad:
        weight = _GatherGradient.apply(weight)
    return lambda ids: F.embedding(ids, weight, emb.padding_idx, scale_grad_by_freq=emb.scale_grad_by_freq,
                                   sparse=True)


def mask_kind(model) -> str:
    """'bool' for sdpa (True = may attend), 'additive' for eager (0 / dtype min)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl in ("sdpa", "qk_clip_sdpa"):  # QK-clip's recorder wraps sdpa and takes its masks
        return "bool"
    if impl == "eager":
        return "additive"
    raise ValueError(f"parallel thoughts need attn_implementation 'sdpa' or 'eager', not {impl!r}")


def to_model_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean (B, 1, Q, KV) 'may attend' mask into what the attention code expects."""
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ---------------------------------------------------------------- sampling

def draw_noise(shape: Sequence[int], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """One uniform number per (b, j, k, thought token): all the randomness a batch uses."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                  banned_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sample from softmax(logits / temperature); temperature 0 means greedy.

    Returns (tokens, log-probs under the sampling distribution; temperature-1 for greedy).
    """
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    if banned_ids:
        scaled = scaled.clone()
        scaled[..., list(banned_ids)] = float("-inf")
    logp = F.log_softmax(scaled, dim=-1)
    if temperature > 0:
        cdf = logp.detach().exp().cumsum(-1)
        tokens = (cdf < u.unsqueeze(-1)).sum(-1).clamp_max(logits.shape[-1] - 1)
    else:
        tokens = logp.detach().argmax(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- text-side helpers

def thought_positions(attention_mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Position id of the first thought token after each slot j: pos(j) + 1 (B, S).

    A thought continues its own prefix, so pass p at slot j sits at pos(j) + 1 + p, not after
    the end of the whole text.
    """
    return position_ids(attention_mask).gather(1, slots) + 1


def true_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 n_true: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[j+1+t] for t < n_true, and whether it exists (inside the text, not padding)."""
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device)[:, None] + 1 + torch.arange(n_true, device=input_ids.device)
    inside = idx < T                                          # (T, n_true)
    safe = idx.clamp_max(T - 1)
    tokens = input_ids[:, safe] * inside                      # (B, T, n_true)
    valid = inside & attention_mask.bool()[:, safe]
    return tokens, valid


def selected_slots(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each row's selected positions to the left: indices (B, S) and validity (B, S)."""
    B, T = selected.shape
    S = max(int(selected.sum(-1).max()), 1)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[:, :S]
    valid = torch.arange(S, device=selected.device) < selected.sum(-1, keepdim=True)
    return order * valid, valid


def base_forward(model, input_ids, attention_mask, kind):
    """Plain causal forward over the text that keeps the KV cache (as plain DynamicLayers)."""
    T = input_ids.shape[1]
    ar = torch.arange(T, device=input_ids.device)
    allowed = (ar[None, :, None] >= ar[None, None, :]) & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=input_ids.device)  # pads see self
    dtype = model.get_input_embeddings().weight.dtype
    out = backbone(model)(input_ids=input_ids, attention_mask=to_model_mask(allowed[:, None], kind, dtype),
                          position_ids=position_ids(attention_mask), past_key_values=DynamicCache(),
                          use_cache=True)
    return out.last_hidden_state, out.past_key_values


# ---------------------------------------------------------------- the parallel generator

def generate_thoughts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      selected: torch.Tensor | None = None, *, start_id: int, end_id: int,
                      n_thoughts: int = 2, thought_len: int = 8, n_true: int = 4,
                      temperature: float = 1.0, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, banned_ids: Sequence[int] = (),
                      chunk_size: int | None = None) -> ThoughtBatch:
    """K thoughts of length L after every selected position, all positions in parallel.

    `selected` (B, T) bool picks positions (difficulty-based injection); None = every real
    token. `noise` (B, T, K, L) uniforms, else drawn from `generator`. `chunk_size` caps the
    positions per pass group, re-expanding the shared text cache for each group: it bounds
    the transient per-pass tensors (mask, attention scores, logits), but under autograd every
    group's graph is kept until backward. Gradients flow into log-probs, hidden states and
    log-likelihoods; tokens are detached. Matches `reference_thoughts` in eval mode (dropout
    off); unsupported: sliding-window attention beyond the window (the mask is full causal).
    """
    if thought_len < 2:
        raise ValueError("thought_len counts the start and end tokens, so it must be >= 2")
    B, T = input_ids.shape
    K, L = n_thoughts, thought_len
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    selected = attention_mask.bool() if selected is None else selected.bool() & attention_mask.bool()
    noise = _check_noise(noise, (B, T, K, L), generator, input_ids.device)
    kind = mask_kind(model)
    hidden, cache = base_forward(model, input_ids, attention_mask, kind)
    batch = _empty_batch(model, input_ids, attention_mask, selected, hidden, K, L, n_true)
    if not selected.any():
        return batch
    slots, valid = selected_slots(selected)
    step = chunk_size or slots.shape[1]
    for s0 in range(0, slots.shape[1], step):
        chunk = _ChunkInputs(slots[:, s0:s0 + step], valid[:, s0:s0 + step], noise, batch,
                             attention_mask, start_id, end_id, temperature, banned_ids)
        _scatter(batch, chunk, _run_passes(model, cache, chunk, K, L, n_true))
    return batch


def _check_noise(noise, shape, generator, device) -> torch.Tensor:
    """The caller's noise (checked) or fresh draws from `generator`."""
    if noise is None:
        return draw_noise(shape, generator, device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape (B, T, K, L) = {tuple(shape)}, got {tuple(noise.shape)}")
    return noise.to(device)


def _empty_batch(model, input_ids, attention_mask, selected, hidden, K, L, n_true) -> ThoughtBatch:
    """Fill the no-thought fields; the thought fields start empty and are scattered into."""
    B, T = input_ids.shape
    H = hidden.shape[-1]
    logits = lm_logits(model, hidden)
    tokens, valid = true_targets(input_ids, attention_mask, n_true)
    valid = valid & selected[:, :, None]
    src = (torch.arange(T, device=input_ids.device)[:, None] + torch.arange(n_true, device=input_ids.device))
    src = src.clamp_max(T - 1)                                             # (T, n_true): j + t
    ll_without = token_logprobs(logits[:, src], tokens) * valid
    base_true_hidden = hidden[:, src] * valid[..., None]
    return ThoughtBatch(
        thought_tokens=torch.full((B, T, K, L), NOT_SELECTED, dtype=torch.long, device=input_ids.device),
        thought_logprobs=hidden.new_zeros((B, T, K, L), dtype=torch.float32),
        selected=selected, true_tokens=tokens, true_valid=valid, base_hidden=hidden,
        base_logits=logits, base_true_hidden=base_true_hidden,
        thought_hidden=hidden.new_zeros((B, T, K, n_true, H)),
        ll_without=ll_without, ll_with=hidden.new_zeros((B, T, K, n_true), dtype=torch.float32))


@dataclass
class _ChunkInputs:
    """One group of slots: which positions, their noise, targets and pass-0 inputs."""

    slots: torch.Tensor        # (B, S) text positions
    valid: torch.Tensor        # (B, S)
    noise: torch.Tensor        # (B, T, K, L)
    batch: ThoughtBatch
    attention_mask: torch.Tensor
    start_id: int
    end_id: int
    temperature: float
    banned_ids: Sequence[int]

    def per_row(self, x: torch.Tensor, K: int) -> torch.Tensor:
        """Gather a (B, T, ...) tensor at the slots and repeat it for the K thoughts: (B*K, S, ...)."""
        idx = self.slots.view(*self.slots.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx).repeat_interleave(K, dim=0)

    def slot_noise(self, K: int) -> torch.Tensor:
        """Noise of slot s, thought k in row b*K + k: (B*K, S, L)."""
        B, S = self.slots.shape
        idx = self.slots[:, :, None, None].expand(-1, -1, *self.noise.shape[2:])
        g = self.noise.gather(1, idx)                              # (B, S, K, L)
        return g.permute(0, 2, 1, 3).reshape(B * K, S, -1)


def _run_passes(model, text_cache, c: _ChunkInputs, K, L, n_true) -> dict:
    """Feed one token per (slot, thought) per pass; sample, then teacher-force true tokens.
    The passes attend with `thought_attention` (text prefix under `text_allowed`, plus the
    slot's own thought), so no pass scores the other slots' thought keys."""
    B, S = c.slots.shape
    T = c.attention_mask.shape[1]
    dev = c.slots.device
    cache = DynamicCache(ddp_cache_data=[(k.repeat_interleave(K, 0), v.repeat_interleave(K, 0))
                                         for k, v, *_ in text_cache])
    j = c.slots.repeat_interleave(K, 0)                                            # (B*K, S)
    text_allowed = (torch.arange(T, device=dev)[None, None, :] <= j[:, :, None]) \
        & c.attention_mask.bool().repeat_interleave(K, 0)[:, None, :]
    pos0 = thought_positions(c.attention_mask, c.slots).repeat_interleave(K, 0)
    targets = c.per_row(c.batch.true_tokens, K)                                    # (B*K, S, n_true)
    u = c.slot_noise(K)
    tok = torch.full_like(j, c.start_id)
    out = {"tokens": [tok], "logprobs": [torch.zeros(j.shape, device=dev)], "ll": [], "hidden": []}
    embed = pass_embedder(model)
    with split_attention(model, T):
        for p in range(L + n_true - 1):
            tok = _one_pass(model, cache, text_allowed[:, None], embed(tok), pos0 + p, p, c, targets, u, L, out)
    return {k: torch.stack(v, dim=2) for k, v in out.items()}  # (B*K, S, L | n_true, ...)


def _one_pass(model, cache, text_mask, embeds, positions, p, c: _ChunkInputs, targets, u, L, out) -> torch.Tensor:
    """Pass p feeds the token embeddings `embeds` (rows, S, H) and records into `out`; returns
    the next pass's token: a sampled thought token, the forced end token, or the next
    teacher-forced true token."""
    tok_shape = embeds.shape[:2]
    res = backbone(model)(inputs_embeds=embeds, attention_mask=text_mask,
                          position_ids=positions, past_key_values=cache, use_cache=True)
    h = res.last_hidden_state
    logits = lm_logits(model, h)
    if p <= L - 3:
        nxt, lp = sample_tokens(logits, u[:, :, p + 1], c.temperature, c.banned_ids)
    elif p == L - 2:
        nxt = torch.full(tok_shape, c.end_id, dtype=torch.long, device=embeds.device)
        lp = torch.zeros(tok_shape, device=embeds.device)
    else:
        t = p - (L - 1)
        out["ll"].append(token_logprobs(logits, targets[:, :, t]))
        out["hidden"].append(h)
        return targets[:, :, t]
    out["tokens"].append(nxt)
    out["logprobs"].append(lp)
    return nxt


def _scatter(batch: ThoughtBatch, c: _ChunkInputs, res: dict) -> None:
    """Write the (B*K, S, ...) pass results into the (B, T, K, ...) fields at valid slots."""
    B, S = c.slots.shape
    b_idx, s_idx = c.valid.nonzero(as_tuple=True)
    j_idx = c.slots[b_idx, s_idx]

    def pick(x):  # (B*K, S, ...) -> (n_valid, K, ...)
        x = x.view(B, -1, S, *x.shape[2:]).transpose(1, 2)
        return x[b_idx, s_idx]

    tv = batch.true_valid[b_idx, j_idx][:, None]                                 # (n, 1, n_true)
    batch.thought_tokens[b_idx, j_idx] = pick(res["tokens"]).detach()
    batch.thought_logprobs = batch.thought_logprobs.index_put((b_idx, j_idx), pick(res["logprobs"]))
    batch.ll_with = batch.ll_with.index_put((b_idx, j_idx), pick(res["ll"]) * tv)
    hid = pick(res["hidden"]) * tv[..., None].to(res["hidden"].dtype)
    batch.thought_hidden = batch.thought_hidden.index_put((b_idx, j_idx), hid)


# ---------------------------------------------------------------- the slow reference

def reference_thoughts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       selected: torch.Tensor | None = None, *, start_id: int, end_id: int,
                       n_thoughts: int = 2, thought_len: int = 8, n_true: int = 4,
                       temperature: float = 1.0, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None,
                       banned_ids: Sequence[int] = ()) -> ThoughtBatch:
    """The same thoughts the obvious way: for each (row, position, thought) separately, plain
    forwards over text[0..j] + the thought so far, with no custom mask and no shared cache.
    Padding is dropped rather than masked. Same noise, same sampling rule, same outputs.
    """
    B, T = input_ids.shape
    K, L = n_thoughts, thought_len
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    selected = attention_mask.bool() if selected is None else selected.bool() & attention_mask.bool()
    noise = _check_noise(noise, (B, T, K, L), generator, input_ids.device)
    out = _reference_base(model, input_ids, attention_mask, selected, K, L, n_true)
    for b in range(B):
        real = attention_mask[b].bool().nonzero().squeeze(-1)
        for r, j in enumerate(real.tolist()):
            if not selected[b, j]:
                continue
            for k in range(K):
                toks, lps, ll, hid = _reference_one(
                    model, input_ids[b, real[: r + 1]], out.true_tokens[b, j], out.true_valid[b, j],
                    noise[b, j, k], start_id, end_id, L, temperature, banned_ids)
                out.thought_tokens[b, j, k] = toks
                out.thought_logprobs[b, j, k] = lps
                out.ll_with[b, j, k] = ll
                out.thought_hidden[b, j, k] = hid
    return out


def _reference_base(model, input_ids, attention_mask, selected, K, L, n_true) -> ThoughtBatch:
    """No-thought fields from one plain forward per row over its real tokens."""
    B, T = input_ids.shape
    tokens, valid = true_targets(input_ids, attention_mask, n_true)
    valid = valid & selected[:, :, None]
    hid_rows, logit_rows = [], []
    for b in range(B):
        real = attention_mask[b].bool().nonzero().squeeze(-1)
        res = model(input_ids[b, real][None], output_hidden_states=True)
        h = res.hidden_states[-1].new_zeros((T, res.hidden_states[-1].shape[-1]))
        lg = res.logits.new_zeros((T, res.logits.shape[-1]))
        h[real], lg[real] = res.hidden_states[-1][0], res.logits[0]
        hid_rows.append(h)
        logit_rows.append(lg)
    hidden, logits = torch.stack(hid_rows), torch.stack(logit_rows)
    src = (torch.arange(T)[:, None] + torch.arange(n_true)).clamp_max(T - 1).to(input_ids.device)
    H = hidden.shape[-1]
    return ThoughtBatch(
        thought_tokens=torch.full((B, T, K, L), NOT_SELECTED, dtype=torch.long, device=input_ids.device),
        thought_logprobs=hidden.new_zeros((B, T, K, L), dtype=torch.float32),
        selected=selected, true_tokens=tokens, true_valid=valid, base_hidden=hidden,
        base_logits=logits, base_true_hidden=hidden[:, src] * valid[..., None],
        thought_hidden=hidden.new_zeros((B, T, K, n_true, H)),
        ll_without=token_logprobs(logits[:, src], tokens) * valid,
        ll_with=hidden.new_zeros((B, T, K, n_true), dtype=torch.float32))


def _reference_one(model, prefix, targets, tvalid, u, start_id, end_id, L, temperature, banned_ids):
    """One thought after one prefix: L-2 sampled tokens, then the true tokens teacher-forced."""
    seq = torch.cat([prefix, prefix.new_tensor([start_id])])
    lps = [torch.zeros((), device=prefix.device)]
    for i in range(1, L - 1):
        logits = model(seq[None], logits_to_keep=1).logits[0, -1]
        tok, lp = sample_tokens(logits, u[i], temperature, banned_ids)
        seq = torch.cat([seq, tok.view(1)])
        lps.append(lp)
    seq = torch.cat([seq, prefix.new_tensor([end_id])])
    lps.append(torch.zeros((), device=prefix.device))
    full = torch.cat([seq, targets[:-1]])
    res = model(full[None], output_hidden_states=True)
    first = len(prefix) + L - 1                       # the end token: its output predicts x[j+1]
    n_true = targets.shape[0]
    ll = token_logprobs(res.logits[0, first:first + n_true], targets) * tvalid
    hid = res.hidden_states[-1][0, first:first + n_true] * tvalid[:, None]
    return seq[len(prefix):], torch.stack(lps), ll, hid
