"""Coherence scores: syntactic exact on handmade strings, predictive = sigmoid, composite =
weighted sum, semantic with the real all-MiniLM-L6-v2 (relevant > unrelated)."""

import math

import pytest
import torch

from agent_forge.quietstar.coherence import (
    CoherenceScorer, PolicyEmbedder, anti_theater_coherence, claim_consistency, mean_pool, predictive_score,
    repeated_ngram_fraction, semantic_scores, structure_score, syntactic_score, thought_coherences,
)
from agent_forge.quietstar.rl import RLConfig, combine_rewards
from agent_forge.vocab import add_thinking_tokens

from conftest import make_tiny_model, make_tiny_tokenizer


def test_repeated_ngram_fraction_exact():
    assert repeated_ngram_fraction("a b c d") == 0.0  # 2 trigrams, both new
    assert repeated_ngram_fraction("a b c a b c") == pytest.approx(1 / 4)  # abc bca cab abc
    assert repeated_ngram_fraction("x x x x x") == pytest.approx(2 / 3)
    assert repeated_ngram_fraction("too short") == 0.0
    assert repeated_ngram_fraction("A b C a B c") == pytest.approx(1 / 4)  # case-insensitive words


def test_syntactic_score_exact():
    good = "[thinking]<step> 3 + 4 = 7[/endthinking] 7"
    assert syntactic_score(good, "<step> 3 + 4 = 7") == pytest.approx(1.0)
    unclosed = "[thinking]<step> 3 + 4 = 7"  # structure 0.5, claims hold
    assert syntactic_score(unclosed, "<step> 3 + 4 = 7") == pytest.approx(0.75)
    loop = "7 + 7 = 14 7 + 7 = 14"  # trigrams: 7+7 +7= 7=14 =14 7, 14 7 +, 7+7 +7= 7=14 -> 3 of 8 repeat
    structure = 0.5 + 0.5 * (1 - 3 / 8)
    # one run-on chain "7 + 7 = 14 7 + 7 = 14": "14 7 + 7" does not parse, so nothing is checkable
    assert syntactic_score(f"[thinking]{loop}[/endthinking] 14", loop) == pytest.approx(structure)
    no_answer = "[thinking]<step> 1 + 1 = 2[/endthinking]"
    assert syntactic_score(no_answer, "<step> 1 + 1 = 2") == pytest.approx(0.75)
    slip = "<step> 6 + 9 = 15<step> 15 - 8 = 6"  # well built, but one of its two claims is false
    assert syntactic_score(f"[thinking]{slip}[/endthinking] 6", slip) == pytest.approx(0.5 + 0.5 * 0.5)
    words = "<expert> a b c a b c"  # no checkable claim: structure alone (0.5 + 0.5 * 3/4), not averaged with 1
    assert syntactic_score(f"[thinking]{words}[/endthinking] 6", words) == pytest.approx(0.875)


def test_claim_consistency_against_hand_checked_claims():
    cases = {
        "<step> 6 + 9 = 15<step> 15 - 8 = 7": 1.0,
        "<step> 6 + 9 = 15<step> 15 - 8 = 6": 0.5,  # the tokens split the steps into two claims
        "<step> 18 + 41 = 69<doubt> 69 - 41 = 18, yes": 0.0,
        "<step> 8*a = 33 - 17 = 16<step> a = 16 / 8 = 2<falsify> plug in a = 2: 8*2 + 17 = 33, it holds": 1.0,
        "<step> b = 44 / 9 = 5<falsify> plug in b = 5: 9*5 - 16 = 38, it holds": 0.0,
        "<step> 22 * 78 = 1716<step> 85 + 1716 = 1801": 1.0,
        "<step> 3 = (2<step> 2 + 2 = 4": 1.0,  # "(2" does not parse: not judged either way
    }
    for thinking, want in cases.items():
        assert claim_consistency(thinking) == pytest.approx(want), thinking
    for nothing_checkable in ("<expert> carry the tens first", "", "<step> the answer = B"):
        assert claim_consistency(nothing_checkable) is None, nothing_checkable  # not applicable, not 1


def test_rl_reward_does_not_prefer_a_thought_without_claims_to_one_with_a_slip():
    """consistency_weight's term: no checkable claim earns 0, a half-right thought 0.5."""
    thoughts = ["<step> 6 + 9 = 15<step> 15 - 8 = 7", "<step> 6 + 9 = 15<step> 15 - 8 = 6",
                "<expert> I just know it", "<step> choose B"]
    shaped = RLConfig(reward="correct", consistency_weight=0.5)
    rewards = combine_rewards([1.0] * 4, None, shaped, [claim_consistency(t) for t in thoughts])
    assert rewards == pytest.approx([1.5, 1.25, 1.0, 1.0])


def _fake_embed(texts):
    return torch.nn.functional.normalize(torch.tensor([[1.0, float(len(t) % 3)] for t in texts]), dim=-1)


def test_anti_theater_coherence_renormalises_over_the_parts_that_apply():
    q = "What is 6 + 9 - 8?"
    thoughts = ["<step> 6 + 9 = 15<step> 15 - 8 = 6", "<expert> carry the tens first", "", None]
    with_sem = thought_coherences(thoughts, [q] * 4, _fake_embed)
    sem = semantic_scores(_fake_embed, thoughts[:2], [q, q])
    structure = [structure_score(f"[thinking]{t}[/endthinking] x", t) for t in thoughts[:2]]
    assert with_sem[0].parts == {"semantic": pytest.approx(sem[0]), "structure": 1.0, "claims": 0.5}
    assert with_sem[0].value == pytest.approx((0.4 * sem[0] + 0.3 * (0.5 * structure[0] + 0.5 * 0.5)) / 0.7)
    assert with_sem[1].parts["claims"] is None  # no claim: semantic and structure only
    assert with_sem[1].value == pytest.approx((0.4 * sem[1] + 0.3 * structure[1]) / 0.7)
    assert [c.value for c in with_sem[2:]] == [0.0, 0.0]
    bare = thought_coherences(thoughts, [q] * 4)  # no embedder: semantic does not apply
    assert bare[0].parts["semantic"] is None and bare[0].value == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert bare[1].value == pytest.approx(structure[1])


def test_anti_theater_coherence_embedder_choice():
    assert anti_theater_coherence(embedder="none")(["<step> 1 + 1 = 2"], ["q"])[0].parts["semantic"] is None
    assert anti_theater_coherence().embedder == "minilm"  # the package ships with the project
    with pytest.raises(ValueError, match="policy"):
        anti_theater_coherence(embedder="policy")  # needs the model


def test_predictive_is_a_sigmoid_of_the_gain():
    assert predictive_score(0.0) == 0.5
    assert predictive_score(2.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert predictive_score(-1e9) == pytest.approx(0.0) and predictive_score(1e9) == pytest.approx(1.0)


def test_composite_is_the_weighted_sum():
    scorer = CoherenceScorer("none", weights=(0.2, 0.5, 0.3))
    scorer.embed = lambda texts: torch.nn.functional.normalize(torch.tensor(
        [[1.0, float(len(t) % 3)] for t in texts]), dim=-1)
    s = scorer.score(["q1", "q2"], ["<step> a b", "x y z x y z"], ["1", "2"],
                     ["[thinking]<step> a b[/endthinking] 1", "[thinking]x y z x y z"], [0.3, -2.0])
    for i in range(2):
        assert s.composite[i] == pytest.approx(0.2 * s.semantic[i] + 0.5 * s.syntactic[i] + 0.3 * s.predictive[i])
    means = s.means()
    assert means["coherence_composite"] == pytest.approx(sum(s.composite) / 2)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    got = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(got, torch.tensor([[1.0, 0.0]]))


def test_policy_embedder_gives_scores_in_unit_interval():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    embed = PolicyEmbedder(model, tok)
    scores = semantic_scores(embed, ["<step> 2 + 3 = 5", ""], ["2 + 3 = ? 5", "2 + 3 = ? 5"])
    assert 0.0 <= scores[0] <= 1.0 and scores[1] == 0.0


def test_minilm_semantic_prefers_a_relevant_thought():
    scorer = CoherenceScorer("minilm")
    q, a = "Tom has 3 apples and buys 4 more. How many apples does he have?", "7"
    relevant = "<step> Tom starts with 3 apples, buys 4 more apples, 3 + 4 = 7 apples"
    unrelated = "<step> The weather in Paris is rainy and the museum opens at noon"
    sem = semantic_scores(scorer.embed, [relevant, unrelated], [f"{q} {a}", f"{q} {a}"])
    assert sem[0] > sem[1] + 0.2
    assert all(0.0 <= s <= 1.0 for s in sem)
