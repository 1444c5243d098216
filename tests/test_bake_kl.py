"""Step 1's KL mode (prompt baking): the response mask after a planted slip, the teacher on
--resume, one length limit for teacher and student, continuations sampled from the prompted
teacher, and the whole loop end to end."""

import json

import pytest
import torch

from agent_forge.data.schema import Record, Segment, render_prompt
from agent_forge.quietstar.bake import Baker, BakeConfig, _response_logits, kl_loss
from agent_forge.quietstar.bake_data import IGNORE, collate, encode_pairs, encode_record, sample_pairs
from agent_forge.training.kl import forward_kl

from conftest import make_tiny_model, make_tiny_tokenizer
from test_bake import RECORDS, arith_record, tok_with_vocab

PROMPT = "Think it through.\n"


def slip_record(i: int) -> Record:
    """A trace with a planted slip that the next <correct> repairs: its labels are not one run."""
    a, b = 10 + i, 7 + i
    return Record(f"slip{i}", f"{a} + {b} = ?",
                  [Segment("step", f"{a} + {b} = {a + b + 1}"), Segment("correct", f"{a} + {b} = {a + b}, not {a + b + 1}")],
                  str(a + b), str(a + b), "test", family="sum")


TRAIN = [slip_record(i) if i % 2 else arith_record(i) for i in range(24)]
HELD = [arith_record(100 + i) for i in range(4)]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_kl_after_a_slip_covers_the_closer_answer_and_eos():
    """The old mask was one run as long as the labelled count: it took the slip's (unlabelled)
    positions and cut the closing tag, answer and EOS off the end."""
    tok, student = tok_with_vocab()
    teacher = make_tiny_model("llama", len(tok), seed=7)
    s_ex, t_ex, dropped = encode_pairs([slip_record(0), RECORDS[0]], tok, PROMPT, max_len=512)
    assert dropped == 0
    sb, tb = collate(s_ex, tok.pad_token_id), collate(t_ex, tok.pad_token_id)
    with torch.no_grad():
        _, mask = _response_logits(student(input_ids=sb["input_ids"]).logits, sb)
    slip = s_ex[0]
    scored = [slip.input_ids[slip.prompt_len + i] for i in range(mask.shape[1]) if mask[0, i]]
    assert scored == [t for t in slip.labels if t != IGNORE]
    tail = [tok.convert_tokens_to_ids("[/endthinking]")] + _ids(tok, " 17") + [tok.eos_token_id]
    assert scored[-len(tail):] == tail
    # The loss equals a slow per-example KL over exactly the labelled positions.
    rows = []
    with torch.no_grad():
        for se, te in zip(s_ex, t_ex):
            s_log = student(torch.tensor([se.input_ids])).logits[0, :-1]
            t_log = teacher(torch.tensor([te.input_ids])).logits[0, :-1]
            s_at = [t for t in range(len(se.labels) - 1) if se.labels[t + 1] != IGNORE]
            t_at = [t for t in range(len(te.labels) - 1) if te.labels[t + 1] != IGNORE]
            rows.append(forward_kl(t_log[t_at], s_log[s_at]))
        got = kl_loss(student, teacher, sb, tb, top_k=None)
    assert got.item() == pytest.approx(torch.cat(rows).mean().item(), rel=1e-4)


def _fresh():
    tok = make_tiny_tokenizer()
    return make_tiny_model("llama", len(tok)), tok


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(RuntimeError):
    pass


def _crash_after(step_no):
    def progress(step, total, row):
        if step == step_no:
            raise Crash(step)
    return progress


@pytest.mark.parametrize("source,prompts,save_every,crash", [
    ("sampled", (PROMPT,), 3, 4),
    ("dataset", (PROMPT,), 3, 4),
    ("dataset", (PROMPT, "Check every step.\n"), 2, 5),  # resumed inside the second prompt's span
])
def test_kl_bake_with_slips_resumes_to_the_uninterrupted_result(tmp_path, source, prompts, save_every, crash):
    """Crash after a checkpoint, resume from the same input model: the teacher must be the
    input model (first prompt) or the model as the first prompt left it (second prompt), not
    the checkpoint, so the resumed run ends with the uninterrupted run's weights."""
    cfg = BakeConfig(mode="kl", kl_source=source, kl_prompts=prompts, steps=6, batch_size=4, lr=1e-3,
                     save_every=save_every, max_len=512, kl_top_k=None, kl_max_new_tokens=24, warmup_steps=1,
                     explode_factor=1e6)  # the prompt barely moves a random tiny model: the KL starts near 0
    full = Baker(*_fresh(), cfg, tmp_path / "full")
    full_input = _weights(full.model)
    result = full.run(TRAIN, HELD)
    assert result.steps_done == 6 and all(h["loss"] > 0 for h in result.history if "loss" in h)
    assert result.metrics["kl_source"] == source and result.metrics["kl_pairs"] == len(TRAIN)
    with pytest.raises(Crash):
        Baker(*_fresh(), cfg, tmp_path / "part").run(TRAIN, HELD, progress=_crash_after(crash))
    resumed = Baker(*_fresh(), cfg, tmp_path / "part")
    resumed_input = _weights(resumed.model)
    assert _same(resumed_input, full_input)
    assert resumed.run(TRAIN, HELD, resume=True).steps_done == 6
    if len(prompts) == 1:
        assert _same(_weights(resumed.teacher), resumed_input)  # the input model, not the checkpoint
    assert _same(_weights(resumed.teacher), _weights(full.teacher))
    a, b = _weights(full.merged_model()), _weights(resumed.merged_model())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logs = [[json.loads(x) for x in (tmp_path / d / "batches.jsonl").read_text().splitlines()] for d in ("full", "part")]
    assert logs[0] == logs[1] and [x["step"] for x in logs[0]] == list(range(1, 7))


def test_a_record_just_over_max_len_is_dropped_as_a_pair(tmp_path):
    """The old code encoded the teacher with max_len * 2: a record one token over max_len was
    dropped for the student only, and the run stopped with 'prompt too long'."""
    tok, _ = tok_with_vocab()
    long = Record("long", "9 + 9 = ?", [Segment("step", "9 + 9 = 18, " * 8)], "18", "18", "test")
    max_len = len(encode_record(long, tok, max_len=10**6).input_ids) - 1
    records = [long] + TRAIN[:8]
    cfg = BakeConfig(mode="kl", kl_source="dataset", kl_prompts=(PROMPT,), steps=1, batch_size=4,
                     save_every=0, max_len=max_len)
    result = Baker(*_fresh(), cfg, tmp_path).run(records, HELD)
    assert result.metrics["dropped_for_length"] == 1
    students, teachers, dropped = encode_pairs(records, tok, PROMPT, max_len)
    assert dropped == 1 and len(students) == len(teachers) == 8
    assert all(s.input_ids[s.prompt_len:] == t.input_ids[t.prompt_len:] for s, t in zip(students, teachers))


def test_a_teacher_sequence_over_the_model_context_names_the_record_and_overshoot(tmp_path):
    """The tiny model has 256 positions; the old code fed such a sequence on in silence."""
    tok, _ = tok_with_vocab()
    prompt = "Think. " * 30 + "\n"
    n = len(encode_record(TRAIN[0], tok, max_len=10**6, prefix=prompt).input_ids)
    assert n > 256 > len(encode_record(TRAIN[0], tok, max_len=10**6).input_ids)
    cfg = BakeConfig(mode="kl", kl_source="dataset", kl_prompts=(prompt,), steps=1, batch_size=4,
                     save_every=0, max_len=512)
    with pytest.raises(ValueError, match=rf"record '0': {n} tokens .* {n - 256} over the model's context of 256"):
        Baker(*_fresh(), cfg, tmp_path).run(TRAIN[:8], HELD)


def test_sampled_pairs_are_seeded_and_come_from_the_prompted_teacher():
    tok, teacher = tok_with_vocab()
    questions = [r.question for r in RECORDS[:5]]
    rng_before = torch.get_rng_state()
    kw = dict(n=2, max_new_tokens=12, max_len=512, batch_size=4)
    students, teachers, dropped = sample_pairs(teacher, tok, questions, PROMPT, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    again = sample_pairs(teacher, tok, questions, PROMPT, seed=3, **kw)
    other = sample_pairs(teacher, tok, questions, PROMPT, seed=4, **kw)
    ids = lambda exs: [e.input_ids for e in exs]  # noqa: E731
    assert ids(again[0]) == ids(students) and ids(again[1]) == ids(teachers) and ids(other[0]) != ids(students)
    assert dropped == 0 and len(students) == 10
    for s, t, q in zip(students, teachers, [q for q in questions for _ in range(2)]):
        response = s.input_ids[s.prompt_len:]
        assert s.input_ids[:s.prompt_len] == _ids(tok, render_prompt(q))
        assert t.input_ids[:t.prompt_len] == _ids(tok, PROMPT + render_prompt(q))
        assert t.input_ids[t.prompt_len:] == response and 0 < len(response) <= 12
        assert s.labels == [IGNORE] * s.prompt_len + response
    # Nearly greedy sampling reproduces the teacher's greedy reply BEHIND THE PROMPT.
    cold, _, _ = sample_pairs(teacher, tok, questions[:2], PROMPT, temperature=1e-4, seed=0, **{**kw, "n": 1})
    for ex, q in zip(cold, questions):
        prompt = torch.tensor([_ids(tok, PROMPT + render_prompt(q))])
        greedy = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                  do_sample=False, pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
        assert ex.input_ids[ex.prompt_len:] == greedy[:len(ex.input_ids) - ex.prompt_len]


def test_sampled_responses_are_cut_to_max_len_and_kl_mode_samples_by_default():
    tok, teacher = tok_with_vocab()
    q = RECORDS[0].question
    room = 5
    max_len = len(_ids(tok, render_prompt(q))) + room
    students, teachers, _ = sample_pairs(teacher, tok, [q], PROMPT, max_new_tokens=40, max_len=max_len, seed=1)
    assert len(students[0].input_ids) <= max_len
    assert students[0].input_ids[students[0].prompt_len:] == teachers[0].input_ids[teachers[0].prompt_len:]
    assert BakeConfig().kl_source == "sampled" and BakeConfig().mode == "sft"
