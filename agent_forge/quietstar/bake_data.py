"""Records to training tensors: loss on the thinking trace and the answer, never the question.

Each record is encoded piece by piece (prompt, opener, one piece per segment, closer,
answer, EOS). Every piece boundary is a special token, so this equals tokenising the
rendered string whole, and it tells us which strategy each label token belongs to, which
the per-strategy accuracy needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agent_forge.data.schema import Record, render_prompt
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
    """Labels for segment i: a planted slip (a segment that the next `<correct>` repairs)
    stays in the input, so the model learns to notice and repair it, but is not a target:
    training on it would teach the model to make the slip."""
    repaired = i + 1 < len(segments) and segments[i + 1].strategy == "correct"
    if not repaired:
        return list(piece)
    return [piece[0]] + [IGNORE] * (len(piece) - 1)


def encode_records(records, tokenizer, vocab="default", max_len: int = 256, prefix: str = ""):
    """Encode many; returns (examples, n_dropped_for_length)."""
    out, dropped = [], 0
    for r in records:
        ex = encode_record(r, tokenizer, vocab, max_len, prefix)
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
