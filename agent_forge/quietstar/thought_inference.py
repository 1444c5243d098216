"""Decoding with token-level Quiet-STaR thoughts: think before each (difficult) next token.

At every decoding step the model has the prefix in its KV cache and the base hidden state
h of the last token. When the step thinks, a thought of `thought_len` tokens (start, L-2
greedy or sampled tokens, end) is fed after the prefix with the same cache, the hidden
state at the end token is mixed with h by the mixing head, and the next visible token comes
from the mixed logits. The thought's tokens are then cropped off the cache, so the visible
text never contains them and later thoughts never see earlier ones (as in training: a
thought sees the text before it and itself only). Thinking tokens are banned from the
visible output.

Cost per thinking step: the last sampled token rides with the end token in one 2-token pass,
so a thought adds L - 1 passes; in mode "all" the start token also rides along with the
previous visible token (2-token passes are cheap when decoding is memory-bound), so L - 2.
In "difficult" mode the start is fed only when a row's next-token entropy is above the
threshold (speculating would make every step a 2-token pass, which costs real compute on a
CPU); a step thinks for the whole batch when any row needs it (rows that did not need it
keep their base prediction). With a zero-initialised mixing head w = 0 and the output is plain
greedy decoding, token for token.

Visible text: the silent thoughts' start and end tokens are the thinking block's own
[thinking] / [/endthinking]. When the visible reply is a written thinking block (inference
mode "on", as the token-level model was trained on rendered records), the block's strategy
markers and its closing token may be written visibly; only the opening token stays banned.
Otherwise (block forced empty, or a direct answer) every thinking token is banned.

Which positions think (`resolve_thought_positions`): a model directory holding a mixing head
decodes with thoughts at "difficult" positions unless told otherwise: that is the spec's
difficulty-based thought injection, and it thinks only at steps whose next-token entropy is
above the 85th percentile of the prompts' own, where "all" adds about thought_len - 2 forward
passes to every visible token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache

from agent_forge.quietstar.injector import next_token_entropy
from agent_forge.quietstar.mixing import MixingHead, load_head
from agent_forge.quietstar.thoughts import backbone, lm_logits
from agent_forge.training.logprobs import position_ids

MODES = ("all", "difficult")
POSITIONS = (*MODES, "none")  # what the commands' --thought-positions takes
DEFAULT_POSITIONS = "difficult"
HEAD_FILE = "mixing_head.safetensors"


@dataclass
class DecodeStats:
    """What a decode did: steps, steps that thought, the entropy threshold used, the thoughts."""

    steps: int = 0
    thought_steps: int = 0
    threshold: float | None = None
    thoughts: list[list[list[int]]] = field(default_factory=list)  # per step, per row: tokens

    @property
    def thought_fraction(self) -> float:
        return self.thought_steps / max(1, self.steps)


@dataclass
class _State:
    """The decode's moving parts: cache, its 2-D mask, next position ids, last hidden."""

    cache: DynamicCache
    mask: torch.Tensor        # (B, cache length)
    next_pos: torch.Tensor    # (B,) position id of the next token fed
    h: torch.Tensor           # (B, H) base hidden state predicting the next visible token
    start_h: torch.Tensor | None = None  # (B, H) output at a speculatively fed start token
    padded: bool = True       # False: no padding anywhere, so no mask needs building per pass


class ThoughtDecoder:
    """`generate(...)` with model.generate's main keywords, thinking before visible tokens.

    mode: "all" (think before every token) or "difficult" (only when the base next-token
    entropy exceeds `entropy_threshold` nats; None = the (1 - difficult_fraction) quantile of
    the entropies over the prompts' own positions). thought_len counts start and end.
    thought_temperature 0 = greedy thoughts. visible_end lets the end token be written
    visibly (it closes a written thinking block); the start token never is.
    """

    def __init__(self, model, head: MixingHead | None, start_id: int, end_id: int, *,
                 mode: str = "difficult", thought_len: int = 8, entropy_threshold: float | None = None,
                 difficult_fraction: float = 0.15, thought_temperature: float = 0.0,
                 banned_visible: Sequence[int] = (), generator: torch.Generator | None = None,
                 visible_end: bool = False):
        if mode not in MODES:
            raise ValueError(f"thought mode must be one of {MODES}, not {mode!r}")
        if thought_len < 2:
            raise ValueError("thought_len counts the start and end tokens, so it must be >= 2")
        self.model, self.start_id, self.end_id = model, start_id, end_id
        self.head = head if head is not None else _zero_head(model)
        self.mode, self.L = mode, thought_len
        self.threshold, self.fraction = entropy_threshold, difficult_fraction
        self.temperature, self.generator = thought_temperature, generator
        never = {start_id} if visible_end else {start_id, end_id}  # visible_end: a written block may close
        self.banned = sorted(set(banned_visible) | never)
        self.stats = DecodeStats()
        self.speculative = mode == "all"

    # -- passes -------------------------------------------------------------------------
    def _feed(self, st: _State, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B, n) at the next positions; returns their hidden states (B, n, H)."""
        n = tokens.shape[1]
        st.mask = torch.cat([st.mask, st.mask.new_ones(st.mask.shape[0], n)], dim=1)
        pos = st.next_pos[:, None] + torch.arange(n, device=tokens.device)
        out = backbone(self.model)(input_ids=tokens, attention_mask=st.mask if st.padded else None,
                                   position_ids=pos,
                                   past_key_values=st.cache, use_cache=True)
        st.next_pos = st.next_pos + n
        return out.last_hidden_state

    def _drop(self, st: _State, n: int) -> None:
        """Forget the last n fed tokens (cache, mask and positions)."""
        if n > 0:
            st.cache.crop(-n)
            st.mask = st.mask[:, :-n]
            st.next_pos = st.next_pos - n

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().clone()
        logits[:, [self.start_id, self.end_id]] = float("-inf")
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, -1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _think(self, st: _State) -> torch.Tensor:
        """One thought after the prefix (start already fed); returns h at the end token (B, H).

        Passes: L-3 single tokens, then the last sampled token together with the end token.
        """
        B = st.h.shape[0]
        end = torch.full((B, 1), self.end_id, dtype=torch.long, device=st.h.device)
        h_last, toks = st.start_h, []
        for i in range(self.L - 2):
            tok = self._sample(lm_logits(self.model, h_last))
            toks.append(tok)
            if i < self.L - 3:
                h_last = self._feed(st, tok[:, None])[:, -1]
        tail = torch.cat([toks[-1][:, None], end], 1) if toks else end
        h_end = self._feed(st, tail)[:, -1]
        self._drop(st, self.L)  # the start, the L-2 thought tokens and the end
        st.start_h = None
        self.stats.thoughts.append(torch.stack(toks, 1).tolist() if toks else [[] for _ in range(B)])
        return h_end

    # -- decoding -----------------------------------------------------------------------
    def _prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[_State, torch.Tensor]:
        """The prompt (plus the speculative start token in mode "all") in one forward; the
        prompt's hidden states come back for the entropy threshold."""
        B = input_ids.shape[0]
        pos = position_ids(mask)
        extra = 1 if self.speculative else 0
        start = torch.full((B, extra), self.start_id, dtype=torch.long, device=input_ids.device)
        full_mask = torch.cat([mask, mask.new_ones(B, extra)], 1)
        out = backbone(self.model)(input_ids=torch.cat([input_ids, start], 1), attention_mask=full_mask,
                                   position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)[:, :pos.shape[1] + extra],
                                   past_key_values=DynamicCache(), use_cache=True)
        hs = out.last_hidden_state
        T = input_ids.shape[1]
        st = _State(out.past_key_values, full_mask, pos[:, -1] + 1 + extra, hs[:, T - 1],
                    hs[:, T] if extra else None, padded=not bool(mask.all()))
        return st, hs[:, :T]

    def _resolve_threshold(self, prompt_hidden: torch.Tensor, mask: torch.Tensor) -> float | None:
        if self.mode != "difficult":
            return None
        if self.threshold is not None:
            return float(self.threshold)
        ent = next_token_entropy(lm_logits(self.model, prompt_hidden))[mask.bool()]
        return float(torch.quantile(ent.float(), 1.0 - self.fraction))

    def _choose(self, logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
        """Next visible token: greedy, or sampled with temperature / nucleus (top_p)."""
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(temperature, 1e-6), -1)
        if top_p < 1.0:
            srt, idx = probs.sort(-1, descending=True)
            drop = srt.cumsum(-1) - srt > top_p
            probs = probs.scatter(-1, idx, srt.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id=None, pad_token_id: int | None = None,
                 stopping_criteria=None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, **_hf_only) -> torch.Tensor:
        """Like model.generate: (B, T + new) ids, finished rows padded with pad_token_id.
        Keywords only meaningful to HF (use_cache, ...) are accepted and ignored."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        eos = torch.tensor(_as_list(eos_token_id), dtype=torch.long, device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        st, prompt_hidden = self._prefill(input_ids, mask)
        self.stats = DecodeStats(threshold=self._resolve_threshold(prompt_hidden, mask))
        seq, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        start = torch.full_like(done, self.start_id, dtype=torch.long)[:, None]
        for _ in range(max_new_tokens):
            logits = self._visible_logits(st, done)
            tok = torch.where(done, pad, self._choose(logits, do_sample, temperature, top_p))
            seq = torch.cat([seq, tok[:, None]], 1)
            self.stats.steps += 1
            done = done | torch.isin(tok, eos)
            for crit in stopping_criteria or ():
                done = done | torch.as_tensor(crit(seq, logits), device=done.device).bool()
            if bool(done.all()):
                break
            hs = self._feed(st, torch.cat([tok[:, None], start], 1) if self.speculative else tok[:, None])
            st.h, st.start_h = hs[:, 0], (hs[:, 1] if self.speculative else None)
        return seq

    def _visible_logits(self, st: _State, done: torch.Tensor) -> torch.Tensor:
        """Logits for the next visible token: mixed after a thought where the row thinks."""
        base = lm_logits(self.model, st.h)
        if self.mode == "all":
            think = ~done
        else:
            think = (next_token_entropy(base) > self.stats.threshold) & ~done
        if think.any():
            if st.start_h is None:
                st.start_h = self._feed(st, torch.full_like(st.next_pos, self.start_id)[:, None])[:, -1]
            h_end = self._think(st)
            h = torch.where(think[:, None], self.head(st.h, h_end), st.h)
            logits = lm_logits(self.model, h).float()
            self.stats.thought_steps += 1
        else:
            self._drop(st, 0 if st.start_h is None else 1)  # a speculative start token
            logits = base.float().clone()
        logits[:, self.banned] = float("-inf")
        return logits


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(x)] if isinstance(x, int) else [int(i) for i in x]


def _zero_head(model) -> MixingHead:
    """A fresh (zero-output) head: thinking then changes nothing, which is the base model."""
    w = model.get_input_embeddings().weight
    return MixingHead(model.config.hidden_size).to(device=w.device, dtype=w.dtype)


def has_mixing_head(model_dir: str | Path | None) -> bool:
    """A token-level Quiet-STaR model carries its mixing head next to its weights."""
    return model_dir is not None and (Path(str(model_dir)) / HEAD_FILE).is_file()


def resolve_thought_positions(model_dir: str | Path | None, positions: str | None = None) -> str | None:
    """The thought mode to decode `model_dir` with: "all" | "difficult", or None (plain decoding).

    positions None: DEFAULT_POSITIONS when the directory holds a mixing head, else None;
    "none": None; "all" / "difficult" need a mixing head (without one every thought is
    multiplied by zero: slower plain decoding, which would only mislead)."""
    if positions is not None and positions not in POSITIONS:
        raise ValueError(f"thought positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    if positions == "none":
        return None
    if not has_mixing_head(model_dir):
        if positions is None:
            return None
        raise ValueError(f"thought positions {positions!r} need a token-level Quiet-STaR model (a directory "
                         f"holding {HEAD_FILE}); {model_dir} has none")
    return positions or DEFAULT_POSITIONS


def load_decoder(model, tokenizer, model_dir: str | Path | None = None, mode: str = "difficult",
                 visible_block: bool = False, **kwargs) -> ThoughtDecoder:
    """A ThoughtDecoder for a token-level Quiet-STaR model: the mixing head and thought length
    come from `model_dir` (mixing_head.safetensors, forge_meta config) when present. Thinking
    tokens are banned from the visible text, except, with `visible_block` (the reply is a
    written thinking block, inference mode "on"), the strategy markers and the closing token.
    For inference.generate_answers: `ThoughtDecoder.generate` takes the keywords it passes
    to model.generate."""
    from agent_forge.models import read_meta
    from agent_forge.vocab import get_vocab, thinking_token_ids

    vocab = get_vocab()
    ids = thinking_token_ids(tokenizer, vocab)
    head, cfg = None, {}
    if model_dir is not None:
        path = Path(model_dir) / HEAD_FILE
        w = model.get_input_embeddings().weight
        head = load_head(path, device=w.device) if path.is_file() else None
        cfg = read_meta(model_dir).get("config", {}) or {}
    kwargs.setdefault("thought_len", cfg.get("thought_len") or 8)
    banned = [ids[vocab.open]] if visible_block else sorted(ids.values())
    return ThoughtDecoder(model, head, ids[vocab.open], ids[vocab.close], mode=mode,
                          banned_visible=banned, visible_end=visible_block, **kwargs)
