"""`CognateForCausalLM`: the Phase 1 model, TRM x Titans-MAG with ACT, as a Hugging Face model.

    embed -> MAG layers 1..r -> TRM recursion (ACT per token) -> MAG layers r+1..8 -> norm -> head

A MAG layer (Titans "memory as gate"): from the normed input h, sliding-window attention
A(h) and the neural long-term memory's read M(h) (memory.py) are mixed per channel by a
learned gate g = sigmoid(W_g h + b): out = g * A(h) + (1 - g) * M(h); then a SwiGLU MLP.
Both branches and the MLP are residual. The recursion (recursion.py) refines each token's
state for as many steps as ACT grants it and adds a ponder cost to the loss.

Our own code, not `titans-pytorch` / `tiny-recursive-model`: both are one-author packages
whose parts would become a hard dependency of every saved model directory, neither carries
a decoding cache for memory + sliding window, and the whole model here is ~700 readable
lines that the tests check against plain implementations of the papers' equations.

Cache (`CognateCache`): per layer, the sliding window's keys/values (the last `window`
positions, with their absolute index and padding flag) and the memory's `MemoryState`
(weights and momentum after the last complete memory chunk, plus the unfinished chunk's
tokens). The recursion is per token and needs none. Feeding a sequence token by token
through the cache gives the same logits as one full forward (tested), so `generate()` with
and without cache agree. Beam search reorders both through `reorder_cache`.

Standalone on purpose: copied into each saved directory (auto_map) so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without agent_forge;
import nothing from agent_forge here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import CognateConfig
from .memory import NeuralMemory
from .recursion import RMSNorm, SwiGLU, TRMRecursion


def _is_empty(cache) -> bool:
    """A transformers Cache that holds nothing yet (callers that build their own start so)."""
    length = getattr(cache, "get_seq_length", None)
    return callable(length) and length() == 0


class CognateCache:
    """Decoding state: sliding-window keys/values and the memory state of every layer."""

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.attention: list[tuple | None] = [None] * num_layers  # (keys, values, index (L,), valid (B, L))
        self.memory: list = [None] * num_layers
        self.seen = 0  # positions processed so far

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.attention)

    def __len__(self) -> int:
        return len(self.attention)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i, entry in enumerate(self.attention):
            if entry is not None:
                keys, values, index, valid = entry
                self.attention[i] = (keys.index_select(0, beam_idx), values.index_select(0, beam_idx), index,
                                     valid.index_select(0, beam_idx))
        self.memory = [None if m is None else m.select(beam_idx) for m in self.memory]


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, T, head_dim) at positions (B, T)."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def window_mask(query_index, key_index, key_valid, window: int) -> torch.Tensor:
    """(B, 1, Tq, Tk) boolean: key j is visible to query i when valid, j <= i and i - j < window
    (a query always sees itself, so no row is empty)."""
    diff = query_index[:, None] - key_index[None, :]
    inside = (diff >= 0) & (diff < window)
    return ((inside[None] & key_valid[:, None, :]) | (diff == 0)[None])[:, None]


class SlidingWindowAttention(nn.Module):
    def __init__(self, config: CognateConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.window, self.rope_theta = config.sliding_window, config.rope_theta
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, positions, index, valid, past: tuple | None = None):
        """Attention output and the cache entry to keep (the last `window` positions)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta)
        key_index, key_valid = index, valid
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            key_index, key_valid = torch.cat([past[2], index]), torch.cat([past[3], valid], dim=1)
        mask = window_mask(index, key_index, key_valid, self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        keep = slice(-self.window, None)
        entry = (k[:, :, keep], v[:, :, keep], key_index[keep], key_valid[:, keep])
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), entry


def mag_combine(attention_out: torch.Tensor, memory_out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Memory as gate: g * attention + (1 - g) * memory, g in (0, 1) per channel."""
    return gate * attention_out + (1.0 - gate) * memory_out


class CognateLayer(nn.Module):
    """One MAG layer: gated sliding-window attention + neural memory, then a SwiGLU MLP."""

    def __init__(self, config: CognateConfig):
        super().__init__()
        self.mix_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = SlidingWindowAttention(config)
        self.memory = NeuralMemory(config)
        self.mag_gate = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, index, valid, cache: CognateCache | None, layer: int):
        h = self.mix_norm(x)
        attn, entry = self.attention(h, positions, index, valid, cache.attention[layer] if cache else None)
        mem, state = self.memory(h, valid, cache.memory[layer] if cache else None)
        if cache is not None:
            cache.attention[layer], cache.memory[layer] = entry, state
        x = x + mag_combine(attn, mem, torch.sigmoid(self.mag_gate(h)))
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class CognateOutput(CausalLMOutputWithPast):
    """Causal LM output plus ACT figures: lm_loss (next-token loss alone), ponder_cost (mean
    N + R over real tokens), halting_steps (B, T), halting_probs (B, T, max_recursion_steps)."""

    lm_loss: torch.Tensor | None = None
    ponder_cost: torch.Tensor | None = None
    halting_steps: torch.Tensor | None = None
    halting_probs: torch.Tensor | None = None


class CognatePreTrainedModel(PreTrainedModel):
    config_class = CognateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CognateLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own CognateCache

    def _init_weights(self, module):
        super()._init_weights(module)
        cfg = self.config
        if isinstance(module, NeuralMemory):
            init.normal_(module.w1_init, mean=0.0, std=cfg.memory_dim ** -0.5)
            init.normal_(module.w2_init, mean=0.0, std=cfg.memory_hidden_size ** -0.5)
            bias = torch.tensor([cfg.memory_forget_bias_init, cfg.memory_momentum_bias_init,
                                 cfg.memory_lr_bias_init])
            init.copy_(module.gates.bias, bias)
        elif isinstance(module, CognateLayer):
            init.constant_(module.mag_gate.bias, cfg.mag_gate_bias_init)
        elif isinstance(module, TRMRecursion):
            init.constant_(module.halt.bias, cfg.halting_bias_init)
            init.zeros_(module.z_init)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class CognateModel(CognatePreTrainedModel):
    """The trunk: embeddings, MAG layers with the recursion among them, final norm."""

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(CognateLayer(config) for _ in range(config.num_hidden_layers))
        self.recursion = TRMRecursion(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, inputs_embeds, attention_mask, position_ids, cache: CognateCache | None):
        """(final hidden states, steps (B, T), ponder (B, T), halting probabilities)."""
        b, t, _ = inputs_embeds.shape
        start = cache.seen if cache is not None else 0
        index = torch.arange(start, start + t, device=inputs_embeds.device)
        valid, positions = _mask_and_positions(attention_mask, position_ids, b, t, start, inputs_embeds.device)
        x, act = inputs_embeds, None
        for i, layer in enumerate(self.layers):
            if i == self.config.recursion_after_layer:
                x, *act = self.recursion(x)
            x = layer(x, positions, index, valid, cache, i)
        if act is None:
            x, *act = self.recursion(x)
        if cache is not None:
            cache.seen += t
        return self.norm(x), *act


def _mask_and_positions(attention_mask, position_ids, b: int, t: int, start: int, device):
    """Padding flags (B, T) of the new tokens and their positions: given, else counted from
    the (full-length) attention mask, else start .. start + T - 1."""
    if attention_mask is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    else:
        valid = attention_mask[:, -t:].to(torch.bool)
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -t:]
        else:
            position_ids = torch.arange(start, start + t, device=device).expand(b, t)
    return valid, position_ids


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    """Cognate with its LM head; the loss is next-token cross-entropy + ponder_cost_weight x
    the mean ponder cost of the real (unpadded) tokens."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        self.model = CognateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: CognateCache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, logits_to_keep: int = 0,
                return_dict: bool | None = None, output_hidden_states: bool | None = None,
                **kwargs) -> CognateOutput:
        """output_hidden_states gives (the input embeddings, the final normed state): what
        callers pool or mix; the per-layer states are not kept."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is not None and not isinstance(cache, CognateCache) and _is_empty(cache):
            cache = CognateCache(self.config.num_hidden_layers)  # e.g. a fresh DynamicCache from a caller
        if cache is not None and not isinstance(cache, CognateCache):
            raise TypeError(f"Cognate needs a CognateCache (got {type(cache).__name__} holding state)")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = CognateCache(self.config.num_hidden_layers)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden, steps, ponder, halt_probs = self.model(inputs_embeds, attention_mask, position_ids,
                                                       cache if use_cache else None)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        real = _real_tokens(attention_mask, steps)
        mean_ponder = (ponder * real).sum() / real.sum().clamp_min(1)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            loss = lm_loss + self.config.ponder_cost_weight * mean_ponder
        return CognateOutput(loss=loss, logits=logits, cache=cache if use_cache else None, lm_loss=lm_loss,
                             ponder_cost=mean_ponder, halting_steps=steps, halting_probs=halt_probs,
                             hidden_states=(inputs_embeds, hidden) if output_hidden_states else None)


def _real_tokens(attention_mask, steps) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(steps, dtype=torch.float32)
    return attention_mask[:, -steps.shape[1]:].float()
