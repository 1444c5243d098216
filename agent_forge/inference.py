"""Generation with and without thoughts: batched, KV-cached, stopping as soon as it can.

Three modes, always in the project's fixed text format (see data/schema.py):

- "on":  prompt + "[thinking]" is fed; the model thinks and must close the block itself,
         then writes the answer.
- "off": prompt + "[thinking][/endthinking]" is fed (the block forced empty); the model
         writes the answer straight away.
- "auto": "on" for a tokenizer that has the thinking tokens, else a plain direct answer.

"off" for a model without thinking tokens is a direct answer too: no thinking is what it does.

A model without thinking tokens (the baseline) answers directly, after either the plain
prompt ("plain") or its chat template with " Give only the final answer." ("chat"; the
default when the tokenizer has a template), because an instruct baseline deserves its
best shot. Prompts are left-padded so a batch can be decoded together with the KV cache.

Stopping: a row ends at EOS, or (by default) at the first newline after some answer text
in the answer slot, which is all we score; this is a StoppingCriteria, so the batch ends
when every row has ended. A direct answer (mode "direct") instead runs, as lm-eval's gsm8k
generates, until "Question:" or EOS (answers.DIRECT_UNTIL), so lm-eval's flexible reading
sees the whole reply. Thinking tokens never reach `answer_text`. Greedy batches drop each
row as it ends (pruned_decode.py: the same tokens; 1.30x on the demo model's thinking replies).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from agent_forge.data.schema import render_prompt
from agent_forge.evaluation.answers import DIRECT_UNTIL, answer_slot, strip_thinking_tokens
from agent_forge.pruned_decode import can_prune, greedy_pruned
from agent_forge.vocab import ThinkingVocab, get_vocab, has_thinking_tokens

CHAT_SUFFIX = " Give only the final answer."
DEFAULT_MAX_NEW = {"on": 256, "off": 48, "direct": 48}
# Rows decoded together. On the 2-core CPU with the default model: 0.33 s/question at 16,
# 0.23-0.28 at 32-96 (weights are read once per token for the whole batch).
GENERATION_BATCH = 32


@dataclass
class Generation:
    """One reply.

    prompt: the exact text fed (forced thinking prefix included).
    full_text: prompt + generated text, decoded WITHOUT skipping our tokens, cut at EOS.
    completion: the part from the thinking block on (forced prefix + generated text); for
        a direct answer, just the generated text.
    thinking: the text inside the block (tokens kept), "" when forced empty, None if there
        is no block.
    answer_text: what a user sees: the answer slot, thinking tokens stripped; "" if none.
    closed: the thinking block was closed (always True for a direct answer).
    n_new_tokens: tokens generated before EOS (the EOS itself not counted).
    seconds: the batch's wall time divided by its size.
    """

    prompt: str
    full_text: str
    completion: str
    thinking: str | None
    answer_text: str
    closed: bool
    n_new_tokens: int
    seconds: float
    mode: str = "direct"

    def visible(self, show_thinking: bool = False) -> str:
        """What to show a user: the answer, optionally with the thinking, tokens removed."""
        if not show_thinking or not self.thinking:
            return self.answer_text
        return f"(thinking: {strip_thinking_tokens(self.thinking).strip()})\n{self.answer_text}"


def resolve_mode(tokenizer, thinking: str, vocab: ThinkingVocab | str = "default") -> str:
    """'on' | 'off' | 'direct' for this tokenizer; 'on' needs the thinking tokens, and 'off'
    without them is a direct answer (the model cannot think, so it answers straight away)."""
    if thinking not in ("on", "off", "auto"):
        raise ValueError(f"thinking must be 'on', 'off' or 'auto', not {thinking!r}")
    has = has_thinking_tokens(tokenizer, vocab)
    if has and thinking != "auto":
        return thinking
    if thinking == "on":
        raise ValueError("thinking='on' needs a model with thinking tokens; use 'auto' or 'off'")
    return "on" if has else "direct"


def default_prompt_style(tokenizer) -> str:
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def build_prompt(tokenizer, question: str, mode: str, style: str | None = None,
                 vocab: ThinkingVocab | str = "default") -> tuple[str, str]:
    """(prompt text, forced prefix inside it). Thinking modes always use the plain format."""
    vocab = get_vocab(vocab)
    if mode == "on":
        return render_prompt(question) + vocab.open, vocab.open
    if mode == "off":
        return render_prompt(question) + vocab.open + vocab.close, vocab.open + vocab.close
    if (style or default_prompt_style(tokenizer)) == "chat":
        messages = [{"role": "user", "content": question.strip() + CHAT_SUFFIX}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, ""
    return render_prompt(question), ""


# ---------------------------------------------------------------------------------------
# Stopping at the end of the answer slot


class AnswerSlotStop(StoppingCriteria):
    """Per-row stopping criterion: True once a row has written a newline after answer text.

    Rows in mode "on" start inside the thinking block and enter the answer slot when they
    emit the closing token; other rows start in the answer slot. Token texts are decoded
    once and cached.
    """

    def __init__(self, tokenizer, batch_size: int, in_thinking: bool, close_id: int | None):
        self.tokenizer = tokenizer
        self.close_id = close_id
        self.phase = [0 if in_thinking else 1] * batch_size  # 0 thinking, 1 slot empty, 2 slot has text
        self.done = [False] * batch_size
        self._text: dict[int, str] = {}

    def _token_text(self, tid: int) -> str:
        if tid not in self._text:
            self._text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return self._text[tid]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, tid in enumerate(last):
            if self.done[row]:
                continue
            if self.phase[row] == 0:
                self.phase[row] = 1 if tid == self.close_id else 0
                continue
            text = self._token_text(tid)
            head, newline, _ = text.partition("\n")
            if head.strip():
                self.phase[row] = 2
            if newline and self.phase[row] == 2:
                self.done[row] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------------------------------
# Generation


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the generation config's EOS ids and the tokenizer's."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)


def left_padded(tokenizer, texts: list[str], add_special_tokens: bool, device):
    """(input_ids, attention_mask) padded on the left, as batched generation needs."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = old_side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _decode_row(tokenizer, ids: list[int], eos: list[int], pad: int | None) -> tuple[str, int]:
    """Generated text cut before the first EOS (trailing padding removed), and its token count.

    When pad == EOS a row stopped by the criterion is padded with "EOS"; cutting there is
    still right, which is why the count excludes the EOS token itself.
    """
    for i, t in enumerate(ids):
        if t in eos:
            ids = ids[:i]
            break
    else:
        while ids and pad is not None and ids[-1] == pad:
            ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False), len(ids)


def generate_answers(model, tokenizer, questions: list[str], thinking: str = "auto",
                     max_new_tokens: int | None = None, batch_size: int = GENERATION_BATCH,
                     show_thinking: bool = False, *, prompt_style: str | None = None,
                     do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.95,
                     seed: int | None = None, stop_at_newline: bool = True,
                     vocab: ThinkingVocab | str = "default", progress: bool = False,
                     thought_mode: str | None = None, model_dir: str | None = None,
                     thought_threshold: float | None = None) -> list[Generation]:
    """Answer every question; results in input order.

    thought_mode ("all" | "difficult") decodes a token-level Quiet-STaR model with a silent
    thought before every (or every difficult) visible token, mixed in by the mixing head
    stored in `model_dir`; without a head the output equals plain decoding. In mode "on" the
    written thinking block stays writable (its markers and closing token are not banned).
    thought_threshold: the entropy (nats) above which a position is difficult; None = the
    decoder's default (a quantile of each prompt's own entropies).
    """
    mode = resolve_mode(tokenizer, thinking, vocab)
    decoder = None
    if thought_mode is not None:
        from agent_forge.quietstar.thought_inference import load_decoder

        if mode == "direct":
            raise ValueError("silent thoughts (thought_mode) need a model with thinking tokens")
        decoder = load_decoder(model, tokenizer, model_dir, mode=thought_mode, visible_block=mode == "on",
                               entropy_threshold=thought_threshold)
    vocab = get_vocab(vocab)
    prompts = [build_prompt(tokenizer, q, mode, prompt_style, vocab) for q in questions]
    chat = mode == "direct" and (prompt_style or default_prompt_style(tokenizer)) == "chat"
    if seed is not None:
        torch.manual_seed(seed)
    return _generate_all(model, tokenizer, prompts, mode, max_new_tokens or DEFAULT_MAX_NEW[mode],
                         batch_size, add_special=not chat, sample=(do_sample, temperature, top_p),
                         stop=stop_at_newline, vocab=vocab, progress=progress,
                         show_thinking=show_thinking, decoder=decoder)


def generate_from_prompts(model, tokenizer, prompts: list[str], thinking: str = "auto",
                          max_new_tokens: int | None = None, batch_size: int = GENERATION_BATCH, *,
                          stop_at_newline: bool = False, vocab: ThinkingVocab | str = "default",
                          progress: bool = False) -> list[Generation]:
    """Greedy replies to ready-made prompts (e.g. lm-eval's few-shot contexts); the forced
    thinking prefix of the mode is appended to each prompt."""
    mode = resolve_mode(tokenizer, thinking, vocab)
    vocab = get_vocab(vocab)
    prefix = {"on": vocab.open, "off": vocab.open + vocab.close, "direct": ""}[mode]
    pairs = [(p + prefix, prefix) for p in prompts]
    return _generate_all(model, tokenizer, pairs, mode, max_new_tokens or DEFAULT_MAX_NEW[mode],
                         batch_size, add_special=True, sample=(False, 1.0, 1.0), stop=stop_at_newline,
                         vocab=vocab, progress=progress, show_thinking=False)


def _generate_all(model, tokenizer, prompts: list[tuple[str, str]], mode: str, max_new: int,
                  batch_size: int, add_special: bool, sample: tuple, stop: bool,
                  vocab: ThinkingVocab, progress: bool, show_thinking: bool,
                  decoder=None) -> list[Generation]:
    """Generate for (prompt, forced prefix) pairs, similar lengths batched together."""
    batch_size = min(batch_size, getattr(model, "max_generation_batch", batch_size))  # llama.cpp engine: 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[Generation | None] = [None] * len(prompts)
    for idx in _progress(batches, progress, f"generate ({mode})"):
        gens = _generate_batch(model, tokenizer, [prompts[i] for i in idx], mode, max_new,
                               add_special=add_special, sample=sample, stop=stop, vocab=vocab,
                               decoder=decoder)
        for i, g in zip(idx, gens):
            results[i] = g
            if show_thinking:
                print(g.visible(show_thinking=True))
    return results  # type: ignore[return-value]


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")


@torch.inference_mode()
def _generate_batch(model, tokenizer, batch: list[tuple[str, str]], mode: str, max_new: int,
                    add_special: bool, sample: tuple, stop: bool, vocab: ThinkingVocab,
                    decoder=None) -> list[Generation]:
    texts = [p for p, _ in batch]
    input_ids, mask = left_padded(tokenizer, texts, add_special, next(model.parameters()).device)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    close_id = tokenizer.convert_tokens_to_ids(vocab.close) if mode != "direct" else None
    criteria = [AnswerSlotStop(tokenizer, len(texts), mode == "on", close_id) if mode != "direct"
                else StopStringCriteria(tokenizer, list(DIRECT_UNTIL))] if stop else []
    do_sample, temperature, top_p = sample
    extra = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    t0 = time.perf_counter()
    out = None
    if decoder is None and not do_sample and can_prune(model):  # finished rows leave the batch
        out = greedy_pruned(model, input_ids, mask, max_new, eos, pad, StoppingCriteriaList(criteria) if criteria else None)
    if out is None:
        generate = decoder.generate if decoder is not None else model.generate
        out = generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new,
                       do_sample=do_sample, eos_token_id=eos, pad_token_id=pad, use_cache=True,
                       stopping_criteria=criteria or None, **extra)
    seconds = (time.perf_counter() - t0) / len(texts)
    new = out[:, input_ids.shape[1]:].tolist()
    gens = []
    for (prompt, prefix), ids in zip(batch, new):
        text, n = _decode_row(tokenizer, ids, eos, pad)
        gens.append(_make_generation(prompt, prefix, text, n, seconds, mode, vocab))
    return gens


def _make_generation(prompt: str, prefix: str, generated: str, n: int, seconds: float,
                     mode: str, vocab: ThinkingVocab) -> Generation:
    completion = prefix + generated
    if mode == "direct":
        slot, thinking, closed = answer_slot(completion, None), None, True
    else:
        slot = answer_slot(completion, vocab)
        closed = slot is not None
        body = completion[len(vocab.open):]
        thinking = body.split(vocab.close, 1)[0] if closed else body
    answer = strip_thinking_tokens(slot or "", vocab).strip()
    return Generation(prompt=prompt, full_text=prompt + generated, completion=completion,
                      thinking=thinking, answer_text=answer, closed=closed, n_new_tokens=n,
                      seconds=seconds, mode=mode)


def save_generations(path: str | Path, key: dict, questions: list[str], gens: list[Generation]) -> None:
    """Record generations with what produced them (`key`: model, mode, budget, batch size), so a
    later stage that would make the very same greedy generations can replay them instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "questions": questions, "generations": [asdict(g) for g in gens]}))
    tmp.replace(path)


def load_generations(path: str | Path, key: dict, questions: list[str],
                     subset: bool = False) -> list[Generation] | None:
    """The recorded generations if they were made by `key` on exactly `questions` (with
    `subset`: on questions including all of these, returned in their order), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != key or not (subset or data.get("questions") == questions):
        return None
    by_question = dict(zip(data["questions"], data["generations"]))
    if not all(q in by_question for q in questions):
        return None
    return [Generation(**by_question[q]) for q in questions]
