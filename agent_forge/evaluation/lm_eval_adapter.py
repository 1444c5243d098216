"""A thin lm-evaluation-harness adapter: score a thinking model with its thoughts stripped.

lm-eval sees an ordinary HF model (`HFLM`), except that
- log-likelihood requests are scored in the answer slot: the context gets the empty
  thinking block "[thinking][/endthinking]" appended (a model with thinking tokens only);
- generation requests let the model think ("on") and return only what follows the
  closing token, thinking tokens removed, cut at lm-eval's `until` strings.
lm_eval is imported lazily (the `lmeval` extra, which `make setup` installs); the tests
drive the wrapper with lm_eval's own Instance requests through its HFLM code.
"""

from __future__ import annotations

from agent_forge.evaluation.answers import strip_thinking_tokens
from agent_forge.vocab import ThinkingVocab, get_vocab, has_thinking_tokens


def answer_context(context: str, tokenizer, vocab: ThinkingVocab | str = "default") -> str:
    """The context moved into the answer slot (unchanged for a model without thinking tokens)."""
    if not has_thinking_tokens(tokenizer, vocab):
        return context
    v = get_vocab(vocab)
    return context + v.open + v.close


def strip_thoughts(completion: str, vocab: ThinkingVocab | str = "default") -> str:
    """What follows the thinking block, tokens removed; "" if the block never closed."""
    v = get_vocab(vocab)
    if v.open in completion and v.close not in completion:
        return ""
    return strip_thinking_tokens(completion.split(v.close, 1)[-1], v).lstrip()


def cut_at(text: str, until: list[str]) -> str:
    """Text up to the earliest of lm-eval's stop strings."""
    for stop in until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def make_lm(model, tokenizer, batch_size: int = 16, thinking: str = "auto",
            vocab: ThinkingVocab | str = "default"):
    """An lm_eval LM for an in-memory model: `lm_eval.simple_evaluate(model=make_lm(m, t), ...)`."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'agent-forge[lmeval]'") from e
    from agent_forge.inference import generate_from_prompts

    class ThoughtStrippedLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            for req in requests:
                ctx, cont = req.arguments
                req.arguments = (answer_context(ctx, tokenizer, vocab), cont)
            return super().loglikelihood(requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                ctx, kw = req.arguments
                gen = generate_from_prompts(model, tokenizer, [ctx], thinking=thinking,
                                            max_new_tokens=kw.get("max_gen_toks", 256), vocab=vocab)[0]
                out.append(cut_at(strip_thoughts(gen.completion, vocab), kw.get("until", [])))
            return out

    return ThoughtStrippedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
