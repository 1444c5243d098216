"""Phase 2 fitness and parents: the trace-likelihood proxy against a token-by-token
computation, the accuracy/proxy mix, and specialist parents trained (then reused) from a
tiny base, their training questions disjoint from the fitness splits."""

import math

import pytest
import torch

from agent_forge.evomerge.fitness import FitnessConfig, measure, trace_likelihood, trace_records
from agent_forge.models import save_model
from agent_forge.vocab import add_thinking_tokens

from conftest import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    from agent_forge.data.evalsets import load_eval_set

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    return model.eval(), tok, load_eval_set("easy_arithmetic_val", limit=6)


def test_reference_traces_are_rebuilt_for_every_procedural_item(tiny):
    _, _, items = tiny
    records = trace_records(items)
    assert [r.question for r in records] == [it.question for it in items]
    assert all(r.thinking and r.gold == it.answer for r, it in zip(records, items))


def test_trace_likelihood_matches_token_by_token(tiny):
    """exp(mean log p) over the labelled tokens, each computed from its own full forward pass
    on the unpadded sequence: padding and batching must not change it."""
    from agent_forge.quietstar.bake_data import IGNORE, encode_records

    model, tok, items = tiny
    got = trace_likelihood(model, tok, items, batch_size=4)
    examples, _ = encode_records(trace_records(items), tok, max_len=384)
    for g, ex in zip(got, examples):
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        terms = [float(logp[t - 1, ex.input_ids[t]]) for t in range(1, len(ex.input_ids)) if ex.labels[t] != IGNORE]
        assert g == pytest.approx(math.exp(sum(terms) / len(terms)), rel=1e-4)


def test_mix_weights_accuracy_and_proxy(tiny):
    model, tok, items = tiny
    base = FitnessConfig(max_new_tokens=8, batch_size=6)
    acc = measure(model, tok, items, base)
    proxy = measure(model, tok, items, FitnessConfig(max_new_tokens=8, batch_size=6, loglik_weight=1.0))
    mix = measure(model, tok, items, FitnessConfig(max_new_tokens=8, batch_size=6, loglik_weight=0.25))
    assert acc.details["kind"] == "accuracy" and len(acc.details["correct"]) == len(items)
    assert proxy.details["kind"] == "trace_likelihood" and 0 < proxy.value <= 1
    assert mix.value == pytest.approx(0.75 * acc.value + 0.25 * proxy.value)
    assert proxy.low <= proxy.value <= proxy.high


def test_specialist_parents_are_trained_once_and_reused(tmp_path):
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.schema import read_records
    from agent_forge.evomerge.parents import ParentsConfig, make_parents
    from agent_forge.models import read_meta

    tok = make_tiny_tokenizer()
    save_model(make_tiny_model("llama", len(tok)), tok, tmp_path / "base")
    cfg = ParentsConfig(families=("chain_sum", "simple_equations"), records=12, steps=2, batch_size=2)
    made = make_parents(str(tmp_path / "base"), tmp_path / "parents", cfg)
    assert [m["cached"] for m in made] == [False, False]
    for fam, m in zip(cfg.families, made):
        records = list(read_records(tmp_path / "parents" / fam / "train.jsonl"))
        assert {r.family for r in records} == {fam}  # a specialist sees only its family
        assert read_meta(m["path"])["evomerge_parent"]["families"] == [fam]
    asked = {it.question for name in cfg.eval_sets for it in load_eval_set(name)}
    assert not asked & {r.question for fam in cfg.families
                        for r in read_records(tmp_path / "parents" / fam / "train.jsonl")}
    again = make_parents(str(tmp_path / "base"), tmp_path / "parents", cfg)
    assert [m["cached"] for m in again] == [True, True]
    with pytest.raises(ValueError, match="two"):
        make_parents(str(tmp_path / "base"), tmp_path / "p1", ParentsConfig(families=("chain_sum",)))


def test_control_repeats_the_parents_recipe_on_all_their_families(tmp_path):
    """`--control` with given parents: the recipe is read back from their metadata, the
    control starts from their common start with the summed data and steps; parents without a
    recipe, or with different ones, are refused with the reason."""
    from agent_forge.data.schema import read_records
    from agent_forge.evomerge.parents import ParentsConfig, make_parents, recipe_of, train_control
    from agent_forge.models import read_meta

    tok = make_tiny_tokenizer()
    save_model(make_tiny_model("llama", len(tok)), tok, tmp_path / "base")
    cfg = ParentsConfig(families=("chain_sum", "simple_equations"), records=6, steps=1, batch_size=2)
    paths = [m["path"] for m in make_parents(str(tmp_path / "base"), tmp_path / "parents", cfg)]
    start, recipe = recipe_of(paths)
    assert start == str(tmp_path / "parents" / "base" / "model")
    assert recipe == cfg  # families in the parents' order, every other field as made
    made = train_control(start, recipe, tmp_path / "out")
    settings = read_meta(made["path"])["evomerge_parent"]
    assert settings["families"] == list(cfg.families) and settings["base"] == start
    assert settings["records"] == 12 and settings["steps"] == 2
    assert {r.family for r in read_records(tmp_path / "out" / "control" / "train.jsonl")} == set(cfg.families)
    with pytest.raises(ValueError, match="not made by --make-parents"):
        recipe_of([paths[0], str(tmp_path / "base")])
    other = make_parents(str(tmp_path / "base"), tmp_path / "p2",
                         ParentsConfig(families=("chain_sum", "basic_arithmetic"), records=6, steps=1, batch_size=2,
                                       lr=1e-3))
    with pytest.raises(ValueError, match="different settings \\(base, lr\\)"):
        recipe_of([paths[0], other[1]["path"]])


def test_a_made_parent_keeps_its_scores_and_other_models_are_measured_every_time(tiny, tmp_path):
    """measure_dir: a model --make-parents made (evomerge_parent in its meta) is scored once
    per (weights, items, settings), then read back with the same per-question results; new
    weights, other items or another budget score again; a model we did not make is loaded
    every time and nothing is written into its folder."""
    from agent_forge.evomerge.fitness import SCORE_CACHE, measure_dir
    from agent_forge.models import load_model, update_meta

    model, tok, items = tiny
    parent, other = save_model(model, tok, tmp_path / "parent"), save_model(model, tok, tmp_path / "other")
    update_meta(parent, {"evomerge_parent": {"families": ["chain_sum"]}})
    loads = []

    def load(path):
        loads.append(str(path))
        return load_model(path)

    cfg = FitnessConfig(max_new_tokens=8, batch_size=6)
    first = measure_dir(parent, items, cfg, load)
    again = measure_dir(parent, items, cfg, load)
    assert len(loads) == 1 and again.details.pop("cached") is True
    assert again.to_dict() == first.to_dict() and len(first.details["correct"]) == len(items)
    measure_dir(parent, items[:4], cfg, load)
    measure_dir(parent, items, FitnessConfig(max_new_tokens=9, batch_size=6), load)
    assert len(loads) == 3
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    kept = (parent / SCORE_CACHE).read_text()
    save_model(model, tok, parent)  # a new folder: the old scores put back beside new weights
    update_meta(parent, {"evomerge_parent": {"families": ["chain_sum"]}})
    (parent / SCORE_CACHE).write_text(kept)
    measure_dir(parent, items, cfg, load)
    assert len(loads) == 4
    measure_dir(other, items, cfg, load)
    measure_dir(other, items, cfg, load)
    assert len(loads) == 6 and not (other / SCORE_CACHE).exists()
