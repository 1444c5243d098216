"""Records to training tensors: loss on the thinking trace and the answer, never the question.

Each record is encoded piece by piece (prompt, opener, one piece per segment, closer,
answer, EOS). Every piece boundary is a special token, so this equals tokenising the
rendered string whole, and it tells us which strategy each label token belongs to, which
the per-strategy accuracy needs.

Prompt baking (KL mode) needs (student, teacher) pairs: one response behind the plain
prompt and behind the bake prompt. `encode_pairs` takes the response from the records'
traces, `sample_pairs` samples it from the prompted teacher (Bhargava et al.).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from agent_forge.data.schema import Record, planted_slip, render_prompt
from agent_forge.inference import GENERATION_BATCH, eos_ids
from agent_forge.vocab import STRATEGIES, ThinkingVocab, get_vocab

IGNORE = -100
ANSWER = len(STRATEGIES)  # label-group index for answer tokens
OTHER = -1  # the opener/closer/EOS, and prompt tokens


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    group: list[int]  # per token: strategy index, ANSWER, or OTHER
    prompt_len: int


def encode_record(record: Record, tokenizer, vocab: ThinkingVocab | str = "default",
                  max_len: int = 256, prefix: str = "") -> Example | None:
    """Encode one record; returns None when it does not fit in `max_len` tokens.

    `prefix` is prepended to the prompt (unlabelled): prompt baking's teacher sees it.
    """
    vocab = get_vocab(vocab)
    ids_of = tokenizer.convert_tokens_to_ids
    text_ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = text_ids(prefix + render_prompt(record.question))
    ids, labels, group = [ids_of(vocab.open)], [ids_of(vocab.open)], [OTHER]
    for i, seg in enumerate(record.thinking):
        piece = [ids_of(f"<{seg.strategy}>")] + text_ids(" " + seg.text.strip())
        ids += piece
        labels += _slip_masked(piece, record.thinking, i)
        group += [STRATEGIES.index(seg.strategy)] * len(piece)
    answer = text_ids(" " + record.answer.strip())
    tail = [ids_of(vocab.close)] + answer + [tokenizer.eos_token_id]
    ids, labels = ids + tail, labels + tail
    group += [OTHER] + [ANSWER] * len(answer) + [OTHER]
    if len(prompt) + len(ids) > max_len:
        return None
    return Example(prompt + ids, [IGNORE] * len(prompt) + labels, [OTHER] * len(prompt) + group, len(prompt))


def _slip_masked(piece: list[int], segments, i: int) -> list[int]:
    """Labels for segment i: a planted slip (schema.planted_slip: a step that a `<correct>`
    repairs, or that a check catches before the repair) stays in the input, so the model
    learns to catch and repair it, but is not a target: training on it would teach the model
    to make the slip (masking the mistake, as Ye et al. 2024 "Physics of LMs 2.2" do)."""
    if not planted_slip(segments, i):
        return list(piece)
    return [piece[0]] + [IGNORE] * (len(piece) - 1)


def encode_direct(record: Record, tokenizer, max_len: int = 256) -> Example | None:
    """A record as a model without thinking tokens is asked it (the direct-answer prompt the
    evaluation uses), then the answer and EOS, the loss on those: for distilling such a model
    (BitNet on any causal LM), whose vocabulary has no opener, closer or strategy tokens."""
    from agent_forge.inference import build_prompt

    text, _ = build_prompt(tokenizer, record.question, "direct")
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = "" if text[-1:].isspace() else " "
    answer = tokenizer(lead + record.answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) + len(answer) > max_len:
        return None
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer, [OTHER] * len(prompt) + [ANSWER] * len(answer),
                   len(prompt))


def encode_records(records, tokenizer, vocab="default", max_len: int = 256, prefix: str = "", direct: bool = False):
    """Encode many (`direct`: as encode_direct); returns (examples, n_dropped_for_length)."""
    out, dropped = [], 0
    for r in records:
        ex = encode_direct(r, tokenizer, max_len) if direct else encode_record(r, tokenizer, vocab, max_len, prefix)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into tensors. `labels`/`group` are already aligned with input positions;
    the loss shifts them (position t predicts token t+1)."""
    width = max(len(e.input_ids) for e in examples)
    def pad(seq, value):
        return seq + [value] * (width - len(seq))
    return {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
        "labels": torch.tensor([pad(e.labels, IGNORE) for e in examples]),
        "group": torch.tensor([pad(e.group, OTHER) for e in examples]),
    }


def shifted(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, group) for next-token prediction: position t is scored on token t+1."""
    labels = batch["labels"][:, 1:]
    group = batch["group"][:, 1:]
    return labels, group


# ---------------------------------------------------------------------------------------
# Prompt baking's (student, teacher) pairs


def encode_pairs(records, tokenizer, prefix: str, max_len: int, context: int | None = None,
                 vocab="default") -> tuple[list[Example], list[Example], int]:
    """Each record's trace behind the plain prompt (student) and behind `prefix` (teacher).

    One limit decides for both sides: `max_len` bounds the record itself, as in SFT, and a
    record over it is dropped as a pair (counted), so the two lists stay index-aligned. The
    teacher's extra prompt tokens only have to fit the model's `context`; a record that does
    not is named, with the overshoot. Returns (students, teachers, n_dropped_for_length).
    """
    students, teachers, dropped = [], [], 0
    for r in records:
        student = encode_record(r, tokenizer, vocab, max_len)
        if student is None:
            dropped += 1
            continue
        teacher = encode_record(r, tokenizer, vocab, sys.maxsize, prefix)
        _check_context(len(teacher.input_ids), context, f"record {r.id!r}")
        students.append(student)
        teachers.append(teacher)
    return students, teachers, dropped


def _check_context(length: int, context: int | None, what: str) -> None:
    """A teacher sequence longer than the model's context cannot be scored: say which and by how much."""
    if context is not None and length > context:
        raise ValueError(f"{what}: {length} tokens behind the bake prompt, {length - context} over the "
                         f"model's context of {context}; shorten the prompt or lower max_len")


@torch.no_grad()
def sample_pairs(teacher, tokenizer, questions: list[str], prefix: str, *, n: int = 1, max_new_tokens: int = 128,
                 max_len: int = 192, temperature: float = 1.0, seed: int = 0, context: int | None = None,
                 batch_size: int = GENERATION_BATCH) -> tuple[list[Example], list[Example], int]:
    """Prompt Baking's data: n continuations per question sampled from the teacher behind
    `prefix`, as (student, teacher) examples sharing each sampled response (every token of it
    labelled, EOS included). Seeded, with the caller's RNG left as it was, so a resumed run
    samples the same. A response is cut to fit `max_len` on the student side and `context` on
    the teacher side; one cut to nothing is dropped (counted)."""
    text_ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    plain = [text_ids(render_prompt(q)) for q in questions for _ in range(n)]
    prompted = [text_ids(prefix + render_prompt(q)) for q in questions for _ in range(n)]
    for i, p in enumerate(prompted):
        _check_context(len(p) + 1, context, f"question {i // n} ({questions[i // n][:40]!r})")
    device = next(teacher.parameters()).device
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if device.type == "cuda" else []):
        torch.manual_seed(seed)
        responses = [r for i in range(0, len(prompted), batch_size)
                     for r in _sample_batch(teacher, tokenizer, prompted[i:i + batch_size], max_new_tokens,
                                            temperature)]
    students, teachers, dropped = [], [], 0
    for s_prompt, t_prompt, response in zip(plain, prompted, responses):
        room = min(max_len - len(s_prompt), (context or sys.maxsize) - len(t_prompt))
        if room <= 0:
            dropped += 1
            continue
        students.append(_response_example(s_prompt, response[:room]))
        teachers.append(_response_example(t_prompt, response[:room]))
    return students, teachers, dropped


def _sample_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                  temperature: float) -> list[list[int]]:
    """One left-padded sampling pass from the full distribution (no top-k/top-p); each row's
    new tokens up to and including its first EOS."""
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width, device = max(map(len, prompts)), next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def _response_example(prompt: list[int], response: list[int]) -> Example:
    """A sampled response behind a prompt: every response token is a target."""
    return Example(prompt + response, [IGNORE] * len(prompt) + response,
                   [OTHER] * (len(prompt) + len(response)), len(prompt))
