"""Cognate's training text: offline procedural reasoning records, packed into token blocks.

The curriculum has three stages of difficulty: foundation (reasoning-gym "easy"), reasoning
("medium") and advanced ("hard"). Each record becomes plain text (question, the steps of
its exact trace without planted slips, answer), records are joined with the tokenizer's EOS
and cut into blocks of `seq_len` tokens, and a share of the blocks is held out for
validation. Questions that an evaluation set asks are excluded when the records are built.
The user's own text (files, or hub datasets by name for users with a network) joins every
stage; it is not checked against the evaluation sets, so do not give it their test splits.

The unigram baseline is the cross-entropy of the smoothed training-token frequencies on the
validation targets: a model that beats it has learned more than which tokens are common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

# GSM8K-templated families (gsm_symbolic) are left out: Phase 1's target is GSM8K itself.
COGNATE_FAMILIES = ("chain_sum", "basic_arithmetic", "simple_equations")
CURRICULUM = (("foundation", "easy"), ("reasoning", "medium"), ("advanced", "hard"))


@dataclass
class CognateDataConfig:
    """Where the text comes from and how it is cut."""

    records_per_stage: int = 3000  # procedural records per curriculum stage
    families: tuple[str, ...] = COGNATE_FAMILIES  # reasoning-gym families (data/procedural.py)
    seed: int = 0  # record seed (stages use seed, seed + 1, seed + 2)
    seq_len: int = 0  # tokens per training block; 0 = the longest the free memory allows (sizing.py)
    val_fraction: float = 0.1  # share of each stage's blocks held out for validation
    text_files: tuple[str, ...] = field(default_factory=tuple)  # extra .txt / .jsonl ("text" field) for every stage
    # Hugging Face hub datasets by name, "owner/name" or "owner/name:config" (needs a network):
    # each stage takes the next hub_records rows of each one's train split (stage k: rows
    # k*n .. (k+1)*n - 1, so the stages never share a row), its "text" field or first string.
    hub_datasets: tuple[str, ...] = field(default_factory=tuple)
    hub_records: int = 1000


def record_text(record) -> str:
    """Question, trace steps (planted slips left out) and answer as plain text."""
    from agent_forge.data.schema import planted_slip

    steps = [s.text for i, s in enumerate(record.thinking) if not planted_slip(record.thinking, i)]
    return f"Question: {record.question}\nReasoning: " + " ; ".join(steps) + f"\nAnswer: {record.answer}"


def stage_texts(cfg: CognateDataConfig, difficulty: str, seed: int, exclude=None, stage_index: int = 0) -> list[str]:
    from agent_forge.data.procedural import build_gym_records

    records = build_gym_records(cfg.records_per_stage, seed=seed, families=cfg.families, difficulty=difficulty,
                                exclude=exclude)
    hub = hub_texts(cfg.hub_datasets, cfg.hub_records, stage_index) if cfg.hub_datasets else []
    return [record_text(r) for r in records] + list(extra_texts(cfg.text_files)) + hub


def hub_texts(names, per_stage: int, stage_index: int) -> list[str]:
    """Rows stage_index*per_stage .. +per_stage of each hub dataset's train split, streamed
    (nothing else is downloaded); ValueError naming the dataset when a row has no text."""
    from itertools import islice

    from datasets import load_dataset

    out = []
    for spec in names:
        name, _, config = spec.partition(":")
        if Path(name).exists():  # load_dataset would read a local folder of that name instead
            raise ValueError(f"hub dataset {spec!r} names a local path; give local text in text_files")
        rows = load_dataset(name, config or None, split="train", streaming=True)
        start = stage_index * per_stage
        for i, row in enumerate(islice(rows, start, start + per_stage)):
            text = row.get("text") if isinstance(row.get("text"), str) else next(
                (v for v in row.values() if isinstance(v, str)), None)
            if text is None:
                raise ValueError(f"hub dataset {spec!r} row {start + i} has no text field (columns: {list(row)})")
            out.append(text)
    return out


def extra_texts(paths) -> list[str]:
    """The user's own text: .txt files whole, .jsonl files one "text" field per line."""
    import json

    out = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            out += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        else:
            out.append(path.read_text())
    return out


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """(blocks, seq_len) token ids: texts joined by EOS, cut into full blocks."""
    if seq_len < 1:
        raise ValueError(f"seq_len {seq_len}: choose it before packing (phase.stage_data)")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens: not one block of {seq_len}; raise records_per_stage")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): a seeded shuffle, at least one block each."""
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(len(blocks) * val_fraction)), len(blocks) - 1)
    if n_val < 1:
        raise ValueError("need at least two blocks to hold one out for validation")
    return blocks[order[n_val:]], blocks[order[:n_val]]


def unigram_block_losses(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cross-entropy (nats) of the add-one-smoothed unigram distribution of the training
    tokens on each validation block's next-token targets, averaged per block."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    return -log_probs[val[:, 1:]].mean(-1)


def unigram_cross_entropy(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Mean unigram cross-entropy over all validation targets (blocks have one length, so the
    mean of the block means)."""
    return float(unigram_block_losses(train, val, vocab_size).mean())


def build_curriculum(cfg: CognateDataConfig, tokenizer, out_dir: Path, exclude=None) -> dict:
    """Write out_dir/<stage>.safetensors (train and val blocks) for every curriculum stage;
    return their sizes and the unigram baseline of the whole validation set."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    stages, trains, vals = {}, [], []
    for k, (stage, difficulty) in enumerate(CURRICULUM):
        blocks = pack(stage_texts(cfg, difficulty, cfg.seed + k, exclude, k), tokenizer, cfg.seq_len)
        train, val = split_blocks(blocks, cfg.val_fraction, cfg.seed + k)
        save_file({"train": train.contiguous(), "val": val.contiguous()}, str(out_dir / f"{stage}.safetensors"))
        stages[stage] = {"difficulty": difficulty, "train_blocks": len(train), "val_blocks": len(val),
                         "train_tokens": train.numel()}
        trains.append(train)
        vals.append(val)
    vocab = len(tokenizer)
    baseline = unigram_cross_entropy(torch.cat(trains), torch.cat(vals), vocab)
    return {"stages": stages, "seq_len": cfg.seq_len, "vocab_size": vocab,
            "unigram_val_loss": baseline, "unigram_val_perplexity": math.exp(baseline)}


def load_stage(data_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(data_dir) / f"{stage}.safetensors"))
