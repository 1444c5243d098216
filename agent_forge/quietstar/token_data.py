"""Token-level Step 2's data: texts (records JSONL, plain text, or in-memory) cut into
fixed-length token crops, the rows a token-RL step trains on."""

from __future__ import annotations

from pathlib import Path

import torch


RECORD_FORMATS = ("full", "answer_only")


def load_texts(data, tokenizer=None, records_as: str = "full") -> list[str]:
    """Texts from a records JSONL, a plain-text file (blank-line separated), or a list of
    Records / strings. Records are rendered in the fixed format: "full" with their written
    thinking block (data/schema.render), "answer_only" as the question and the answer alone,
    so any reasoning has to happen in the silent thoughts."""
    from agent_forge.data.schema import Record, read_records, render, render_prompt

    if records_as not in RECORD_FORMATS:
        raise ValueError(f"records_as must be one of {RECORD_FORMATS}, not {records_as!r}")

    def text(r: Record) -> str:
        return render(r) if records_as == "full" else f"{render_prompt(r.question)} {r.answer.strip()}"

    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.suffix == ".jsonl":
            return [text(r) for r in read_records(path)]
        return [p for p in path.read_text().split("\n\n") if p.strip()]
    return [text(x) if isinstance(x, Record) else str(x) for x in data]


def encode_crops(texts: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise, join with EOS, cut into seq_len crops; (ids, attention mask), (N, seq_len).

    The last partial crop is kept, right-padded (mask 0), only when there is no full crop.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    if len(stream) < 2:
        raise ValueError("token-level RL needs at least two tokens of text")
    n_full = len(stream) // seq_len
    if n_full:
        ids = torch.tensor(stream[: n_full * seq_len]).view(n_full, seq_len)
        return ids, torch.ones_like(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.full((1, seq_len), pad, dtype=torch.long)
    ids[0, : len(stream)] = torch.tensor(stream)
    mask = torch.zeros_like(ids)
    mask[0, : len(stream)] = 1
    return ids, mask
