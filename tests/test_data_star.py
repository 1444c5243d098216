"""star.py: sampling mechanics with a stub generate (known texts) and with a tiny real model."""

import torch

from agent_forge.data.star import HINT, star_records
from agent_forge.vocab import add_thinking_tokens


class StubModel(torch.nn.Module):
    """generate() returns scripted completions chosen by the prompt text."""

    def __init__(self, tokenizer, script):
        super().__init__()
        self.tok, self.script, self.prompts = tokenizer, script, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, num_return_sequences, max_new_tokens, **kw):
        assert kw["do_sample"] is True
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            self.prompts.append(prompt)
            texts = self.script(prompt)
            assert len(texts) == num_return_sequences
            for t in texts:
                new = self.tok(t + self.tok.eos_token, add_special_tokens=False)["input_ids"]
                rows.append(ids.tolist() + new)
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def _script(prompt):
    if "2 + 3" in prompt:
        return ["<step> 2 + 3 = 5[/endthinking] 5",            # correct
                "<step> 2 + 3 = 5[/endthinking] 5",            # duplicate trace: dropped
                "<step> 2 + 3 = 6[/endthinking] 6",            # wrong answer
                "<doubt> 2 + 3 = 4<step> so 5[/endthinking] 5"]  # right answer, false claim: dropped
    if "Hint" in prompt:
        return ["<step> 7 * 6 = 42<falsify> 42 / 6 = 7[/endthinking] 42"] * 2 + ["junk", "<step> x[/endthinking] 1"]
    return ["garbage", "<step> 7 * 6 = 41[/endthinking] 41", "[/endthinking]", "<mece> nope[/endthinking] 0"]


def test_stub_mechanics_and_rationalisation(tiny_tokenizer):
    qs = [{"id": "a", "question": "What is 2 + 3?", "gold": "5"},
          {"id": "b", "question": "What is 7 * 6?", "gold": "42"}]
    model = StubModel(tiny_tokenizer, _script)
    kept, rep = star_records(model, tiny_tokenizer, qs, k=4, rationalize=True, batch_size=2)
    assert [r.id for r in kept] == ["star-a-s0", "star-b-r0"]
    assert rep.samples == 12 and rep.kept == 2 and rep.rationalized_kept == 1
    assert rep.correct == 5          # a: s0, s1, s3 (3) ; b hinted: r0, r1 (2)
    hinted = kept[1]
    assert hinted.question == "What is 7 * 6?" and "Hint" not in hinted.question and hinted.meta["rationalized"]
    assert any(HINT.format(gold="42").strip() in p for p in model.prompts)
    assert all(p.rstrip().endswith("[thinking]") for p in model.prompts)
    assert rep.by_strategy["step"]["kept"] == 2 and rep.by_strategy["falsify"]["yield"] == 0.5
    assert rep.by_strategy["mece"]["kept"] == 0


def test_tiny_real_model_runs(tiny_tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", len(tiny_tokenizer))
    add_thinking_tokens(model, tiny_tokenizer)
    qs = [{"id": i, "question": f"What is {i} + 1?", "gold": str(i + 1)} for i in range(3)]
    kept, rep = star_records(model, tiny_tokenizer, qs, k=2, max_new_tokens=6, rationalize=True)
    assert rep.samples >= 6 and rep.kept == len(kept) and 0.0 <= rep.yield_rate <= 1.0
