"""STaR: a local model writes its own rationales; only verified-correct ones are kept.

For each question, K completions are sampled after the prompt and an opened thinking
block. A completion is kept when it parses, its answer matches gold, and none of the
arithmetic it claims is false (a slip repaired by <correct> is allowed). Questions with
no correct sample can be retried with rationalisation: the gold answer is appended to
the question as a hint while sampling and removed from the kept record, so the model
learns to reach the answer without being told it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from agent_forge.data.parse import ParseError, answers_match, parse_completion
from agent_forge.data.procedural import verify_record
from agent_forge.data.schema import Record, render_prompt, render_thinking
from agent_forge.vocab import STRATEGIES, THINK_OPEN

HINT = " (Hint: the answer is {gold}.)"


@dataclass
class StarReport:
    questions: int = 0
    samples: int = 0
    parsed: int = 0
    correct: int = 0
    kept: int = 0
    rationalized_kept: int = 0
    by_strategy: dict = field(default_factory=dict)   # strategy -> {"seen", "kept", "yield"}

    @property
    def yield_rate(self) -> float:
        return self.kept / self.samples if self.samples else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "yield": self.yield_rate}


def sample_completions(model, tokenizer, prompts: list[str], k: int, max_new_tokens: int = 64,
                       temperature: float = 0.8, top_p: float = 0.95) -> list[list[str]]:
    """K sampled continuations per prompt, thinking tokens kept, padding and EOS removed."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             do_sample=True, temperature=temperature, top_p=top_p,
                             num_return_sequences=k, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    junk = [t for t in (tokenizer.eos_token, tokenizer.pad_token) if t]
    texts = []
    for row in new.tolist():
        text = tokenizer.decode(row, skip_special_tokens=False)
        for t in junk:
            text = text.split(t)[0] if t == tokenizer.eos_token else text.replace(t, "")
        texts.append(text)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def _keep(question: dict, completion: str, tag: str, report: StarReport, seen: set[str]) -> Record | None:
    """Parse and verify one sample; update the counts."""
    try:
        segments, answer = parse_completion(THINK_OPEN + completion)
    except ParseError:
        return None
    if not segments or any(s.strategy not in STRATEGIES for s in segments):
        return None
    report.parsed += 1
    strategies = {s.strategy for s in segments}
    for s in strategies:
        report.by_strategy.setdefault(s, {"seen": 0, "kept": 0})["seen"] += 1
    gold = str(question["gold"])
    if not answers_match(answer, gold):
        return None
    report.correct += 1
    rec = Record(id=f"star-{question['id']}-{tag}", question=question["question"], thinking=segments,
                 answer=answer, gold=gold, source="star", family=question.get("family", ""),
                 meta={"question_id": str(question["id"]), "rationalized": tag.startswith("r")})
    problems = [p for p in verify_record(rec) if "never appears" not in p]
    trace = render_thinking(segments)
    if problems or trace in seen or "hint" in trace.lower():
        return None
    seen.add(trace)
    for s in strategies:
        report.by_strategy[s]["kept"] += 1
    return rec


def star_records(model, tokenizer, questions: list[dict], k: int = 4, rationalize: bool = False,
                 batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 0.8) -> tuple[list[Record], StarReport]:
    """Sample, verify, keep. `questions`: dicts with id, question, gold, optional family."""
    report = StarReport(questions=len(questions))
    kept: list[Record] = []
    solved: set[str] = set()
    rounds = [("s", False)] + ([("r", True)] if rationalize else [])
    for tag, hinted in rounds:
        todo = [q for q in questions if str(q["id"]) not in solved] if hinted else questions
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            prompts = [render_prompt(q["question"] + (HINT.format(gold=q["gold"]) if hinted else "")) + THINK_OPEN
                       for q in chunk]
            samples = sample_completions(model, tokenizer, prompts, k, max_new_tokens, temperature)
            for q, texts in zip(chunk, samples):
                seen: set[str] = set()
                for j, text in enumerate(texts):
                    report.samples += 1
                    rec = _keep(q, text, f"{tag}{j}", report, seen)
                    if rec is not None:
                        kept.append(rec)
                        solved.add(str(q["id"]))
                        report.kept += 1
                        report.rationalized_kept += hinted
    for counts in report.by_strategy.values():
        counts["yield"] = counts["kept"] / counts["seen"] if counts["seen"] else 0.0
    return kept, report
