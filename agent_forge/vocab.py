"""Thinking vocabulary: the tokens a model thinks with, added safely, and measured in use.

Each token is a single new id. New embedding rows start from the mean embedding of a few
descriptive words (so `[/endthinking]` starts near "end", `<doubt>` near "doubt") rather
than from one shared mean, because a model that cannot tell its new tokens apart closes
its thinking with the wrong one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

THINK_OPEN = "[thinking]"
THINK_CLOSE = "[/endthinking]"
STRATEGIES = (
    "step", "mece", "falsify", "expert", "orthogonal",
    "doubt", "bayesian", "multidomain", "correct", "uncertain",
)

# Words whose embeddings seed each new token's row.
_DESCRIPTIONS = {
    THINK_OPEN: "begin thinking",
    THINK_CLOSE: "end thinking answer",
    "<step>": "step next",
    "<mece>": "categories separate complete",
    "<falsify>": "disprove test counterexample",
    "<expert>": "expert specialist",
    "<orthogonal>": "alternative different angle",
    "<doubt>": "doubt check verify",
    "<bayesian>": "probability likely evidence",
    "<multidomain>": "domains combine fields",
    "<correct>": "correct fix mistake",
    "<uncertain>": "uncertain maybe unsure",
    "<think>": "begin thinking",
    "</think>": "end thinking answer",
    "<reason>": "reason because",
    "<|startofthought|>": "---",
    "<|endofthought|>": "---",
}


@dataclass(frozen=True)
class ThinkingVocab:
    """A set of thinking tokens: an opener, a closer and the strategy markers between."""

    open: str = THINK_OPEN
    close: str = THINK_CLOSE
    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(f"<{s}>" for s in STRATEGIES))

    @property
    def tokens(self) -> list[str]:
        return [self.open, self.close, *self.strategies]

    def strategy_token(self, name: str) -> str:
        token = f"<{name}>"
        if token not in self.strategies:
            raise ValueError(f"unknown strategy {name!r}; known: {', '.join(self.strategies)}")
        return token

    def to_dict(self) -> dict:
        return {"open": self.open, "close": self.close, "strategies": list(self.strategies)}

    @classmethod
    def from_dict(cls, d: dict) -> "ThinkingVocab":
        return cls(open=d["open"], close=d["close"], strategies=tuple(d["strategies"]))


PRESETS: dict[str, ThinkingVocab] = {
    "default": ThinkingVocab(),
    "legacy8": ThinkingVocab(
        "<think>", "</think>", ("<step>", "<reason>", "<mece>", "<falsify>", "<expert>", "<doubt>")
    ),
    "quietstar": ThinkingVocab("<|startofthought|>", "<|endofthought|>", ()),
}


def get_vocab(name: str | ThinkingVocab = "default") -> ThinkingVocab:
    if isinstance(name, ThinkingVocab):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown thinking-vocabulary preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------
# Adding tokens to a model


def add_thinking_tokens(model, tokenizer, vocab: ThinkingVocab | str = "default") -> dict[str, int]:
    """Add the vocabulary's tokens (idempotent) and initialise their embeddings.

    Returns token -> id. Rows already present are left untouched, so adding twice
    changes nothing. Tied input/output embeddings stay tied; an untied LM head gets the
    same descriptive initialisation for its new rows.
    """
    from transformers import AddedToken

    vocab = get_vocab(vocab)
    missing = [t for t in vocab.tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vocab.tokens}
    needed = max(ids.values()) + 1
    if model.get_input_embeddings().weight.shape[0] < needed:
        _grow_embeddings(model, tokenizer, needed, [t for t in missing])
    return ids


def _grow_embeddings(model, tokenizer, size: int, new_tokens: list[str]) -> None:
    import torch  # here, not at the top: `forge --help` and the data commands never need it

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is None or out.weight.data_ptr() == inp.data_ptr()
    with torch.no_grad():
        for token in new_tokens:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid < old:
                continue
            word_ids = _description_ids(tokenizer, token)
            inp[tid] = inp[word_ids].mean(0)
            if not tied:
                out.weight[tid] = out.weight[word_ids].mean(0)
    if getattr(model.config, "tie_word_embeddings", False) and out is not None and not tied:
        model.tie_weights()


def _description_ids(tokenizer, token: str) -> list[int]:
    words = _DESCRIPTIONS.get(token) or re.sub(r"[^a-zA-Z]+", " ", token).strip() or "think"
    ids = tokenizer(" " + words, add_special_tokens=False)["input_ids"]
    limit = min(len(tokenizer), 2**31)
    ids = [i for i in ids if i < limit]
    return ids or [0]


def thinking_token_ids(tokenizer, vocab: ThinkingVocab | str = "default") -> dict[str, int]:
    """token -> id for a tokenizer that already has the vocabulary; raises if one is missing."""
    vocab = get_vocab(vocab)
    known = tokenizer.get_vocab()
    missing = [t for t in vocab.tokens if t not in known]
    if missing:
        raise ValueError(f"tokenizer lacks thinking tokens {missing}; run add_thinking_tokens first")
    return {t: known[t] for t in vocab.tokens}


def has_thinking_tokens(tokenizer, vocab: ThinkingVocab | str = "default") -> bool:
    known = tokenizer.get_vocab()
    return all(t in known for t in get_vocab(vocab).tokens)


# ---------------------------------------------------------------------------------------
# Usage analysis of generated text


@dataclass
class UsageReport:
    """How generated texts use the thinking vocabulary.

    token_rate: fraction of texts that contain each token at least once.
    well_formed_rate: fraction with exactly one opener, then one closer, then a non-empty
    answer with no thinking token after the closer.
    """

    n: int
    token_rate: dict[str, float]
    well_formed_rate: float
    opened_rate: float
    closed_rate: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def is_well_formed(text: str, vocab: ThinkingVocab | str = "default") -> bool:
    vocab = get_vocab(vocab)
    if text.count(vocab.open) != 1 or text.count(vocab.close) != 1:
        return False
    start, end = text.index(vocab.open), text.index(vocab.close)
    if end < start:
        return False
    answer = text[end + len(vocab.close):]
    return bool(answer.strip()) and not any(t in answer for t in vocab.tokens)


def analyze_usage(texts: list[str], vocab: ThinkingVocab | str = "default") -> UsageReport:
    vocab = get_vocab(vocab)
    n = len(texts)
    if n == 0:
        return UsageReport(0, {t: 0.0 for t in vocab.tokens}, 0.0, 0.0, 0.0)
    rate = {t: sum(t in x for x in texts) / n for t in vocab.tokens}
    return UsageReport(
        n=n,
        token_rate=rate,
        well_formed_rate=sum(is_well_formed(x, vocab) for x in texts) / n,
        opened_rate=rate[vocab.open],
        closed_rate=rate[vocab.close],
    )
