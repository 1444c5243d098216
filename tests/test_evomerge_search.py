"""Phase 2 search on synthetic fitness functions: no model is merged, every test takes seconds."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent_forge.evaluation.metrics import wilson_interval
from agent_forge.evomerge.genome import Genome, first_generation
from agent_forge.evomerge.operators import (
    crossover, dfs_length_bounds, diversity, genome_distance, genome_problems, mutate,
)
from agent_forge.evomerge.search import Fitness, SearchConfig, run_search

COMBOS = set(itertools.product(("linear", "slerp"), ("ties", "dare"), ("frankenmerge", "dfs")))
TARGET = {"w0": 0.8, "slerp_t": 0.3, "density": 0.7, "taskvec_scale": 1.4}
BEST_COMBO = ("slerp", "dare", "dfs")


def w0(g: Genome) -> float:
    return g.weights[0] / sum(g.weights) if g.weights else 0.5


def bowl(g: Genome) -> float:
    """A known optimum: TARGET's floats with the slerp+dare+dfs combination, 0 there."""
    d = ((w0(g) - TARGET["w0"]) ** 2 + (g.slerp_t - TARGET["slerp_t"]) ** 2 +
         (g.density - TARGET["density"]) ** 2 + (g.taskvec_scale - TARGET["taskvec_scale"]) ** 2)
    misses = sum(a != b for a, b in zip((g.interp, g.taskvec, g.layers), BEST_COMBO))
    return -d - 0.5 * misses


class Counted:
    """A fitness that records every call by genome key."""

    def __init__(self, fn, fail_after: int | None = None):
        self.fn, self.calls, self.fail_after = fn, collections.Counter(), fail_after

    def __call__(self, g: Genome) -> Fitness:
        if self.fail_after is not None and sum(self.calls.values()) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls[g.key()] += 1
        return Fitness(self.fn(g))


def noise(g: Genome) -> float:
    """Structureless but deterministic: only elitism keeps the best from falling."""
    return int(hashlib.sha256(g.key().encode()).hexdigest()[:8], 16) / 16 ** 8


def rows_without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# --------------------------------------------------------------------------- generation 0

@pytest.mark.parametrize("strategy", ["ga", "cma"])
def test_first_generation_is_the_eight_combinations(strategy):
    fit = Counted(bowl)
    res = run_search(SearchConfig(strategy=strategy, generations=1, n_parents=3, n_layers=4), fit)
    genomes = [Genome.from_dict(e["genome"]) for e in res.evaluated.values()]
    assert {(g.interp, g.taskvec, g.layers) for g in genomes} == COMBOS
    assert all(g.weights == (1 / 3,) * 3 for g in genomes)
    assert sum(fit.calls.values()) == 8 and res.history[0]["n_evaluated"] == 8
    assert res.history[0]["cache_hits"] == 0
    assert res.best_fitness.value == max(bowl(g) for g in genomes)


def test_first_generation_is_eight_distinct_models_when_the_depth_is_known():
    """Frankenmerge stitches the parents' layers in blocks (3 parents over 7 layers: 1 1 1 2 2
    3 3), DFS keeps the stage-2 path: eight keys. Unknown depth: identity routes, and each
    frankenmerge/DFS pair is one model, so one key (evaluated once)."""
    gen0 = first_generation(3, n_layers=7)
    assert len({g.key() for g in gen0}) == 8
    franken = [g for g in gen0 if g.layers == "frankenmerge"]
    assert {g.route for g in franken} == {(1, 1, 1, 2, 2, 3, 3)}
    assert all(g.route == () for g in gen0 if g.layers == "dfs")
    assert len({g.key() for g in first_generation(3)}) == 4
    cfg = SearchConfig(n_parents=3, n_layers=7)
    assert all(genome_problems(g, cfg) == [] for g in gen0)


def test_identity_routes_key_as_one_model_whatever_the_layer_technique():
    same = [Genome(layers="frankenmerge"), Genome(layers="dfs")]
    assert same[0].key() == same[1].key()
    assert Genome(layers="frankenmerge", route=(1, 0)).key() != Genome(layers="dfs", route=((1, 0), (0, 1))).key()


def test_scale_range_reaches_the_sum_of_task_vectors():
    assert SearchConfig(n_parents=3).scale_bounds == (0.0, 3.0)
    assert SearchConfig(n_parents=2).scale_bounds == (0.0, 2.0)
    assert dataclasses.replace(SearchConfig(), n_parents=4).scale_bounds == (0.0, 4.0)  # as the phase fills it
    assert SearchConfig(n_parents=3, scale_range=(0.5, 1.5)).scale_bounds == (0.5, 1.5)
    cfg, rng = SearchConfig(n_parents=3, taskvec_scale_sigma=5.0, param_rate=1.0), np.random.default_rng(0)
    scales = [mutate(Genome(weights=(1 / 3,) * 3), cfg, rng).taskvec_scale for _ in range(50)]
    assert max(scales) > 2.0 and max(scales) <= 3.0 and min(scales) >= 0.0


def test_a_state_from_the_previous_engine_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "s.json"
    run_search(SearchConfig(generations=1), Counted(bowl), path)
    state = json.loads(path.read_text())
    state["version"] = 1
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="new output folder"):
        run_search(SearchConfig(generations=1), Counted(bowl), path)


# --------------------------------------------------------------------------- GA

@pytest.mark.parametrize("strategy", ["ga", "cma"])
def test_elitism_best_never_gets_worse(strategy):
    res = run_search(SearchConfig(strategy=strategy, generations=10, n_layers=4, seed=5), noise)
    best = [row["best"] for row in res.history]
    assert best == sorted(best)
    for row in res.history:  # the reported best is a real evaluated genome with that value
        assert res.evaluated[row["best_key"]]["fitness"]["value"] == row["best"]
    if strategy == "ga":  # the GA's population itself keeps its best: elites survive
        assert [row["gen_best"] for row in res.history] == best
        for prev, row in zip(res.history, res.history[1:]):
            assert prev["best_key"] in row["keys"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ga_finds_the_known_optimum_region(seed):
    res = run_search(SearchConfig(generations=25, n_layers=4, seed=seed), bowl)
    gen0 = res.history[0]["best"]
    b = res.best
    assert (b.interp, b.taskvec, b.layers) == BEST_COMBO
    assert res.best_fitness.value > gen0 + 0.2  # gen0's best misses TARGET by d = 0.30
    assert abs(w0(b) - TARGET["w0"]) < 0.15 and abs(b.taskvec_scale - TARGET["taskvec_scale"]) < 0.2
    assert abs(b.density - TARGET["density"]) < 0.15 and abs(b.slerp_t - TARGET["slerp_t"]) < 0.15
    labels = collections.Counter(e["genome"]["label"] for e in res.evaluated.values())
    assert labels["mutate"] > 0 and labels["remerge"] > 0  # losers are re-merged, not discarded


def test_population_size_is_constant_and_slots_are_not_wasted():
    cfg = SearchConfig(generations=6, population=10, elites=3, n_layers=4, seed=4)
    res = run_search(cfg, bowl)
    assert len(res.history[0]["keys"]) == 8
    for row in res.history[1:]:
        assert len(row["keys"]) == 10 == row["n_evaluated"] + row["cache_hits"]
        assert row["cache_hits"] == cfg.elites  # every other child is a genome never seen before


# --------------------------------------------------------------------------- CMA-ES

def test_cma_improves_on_a_quadratic_and_respects_bounds():
    """The optimum lies outside the box (density 0, scale 3): CMA must press against the
    bounds without crossing them, and never change techniques or route."""
    cfg = SearchConfig(strategy="cma", generations=20, n_parents=3, scale_range=(0.0, 2.0), seed=1)

    def quad(g):
        w = np.asarray(g.weights) / sum(g.weights)
        return -(np.sum((w - [0.6, 0.3, 0.1]) ** 2) + (g.slerp_t - 0.8) ** 2 + g.density ** 2 +
                 (g.taskvec_scale - 3.0) ** 2 + 0.5 * (g.interp != "slerp"))

    res = run_search(cfg, quad)
    later = [Genome.from_dict(e["genome"]) for e in res.evaluated.values() if e["generation"] > 0]
    assert len(later) > 100
    assert all(genome_problems(g, cfg) == [] for g in later)
    assert {(g.interp, g.taskvec, g.layers, g.route) for g in later} == {("slerp", "ties", "frankenmerge", ())}
    assert res.best_fitness.value > res.history[0]["best"] + 0.5  # gen 0 misses scale by 2 alone
    b = res.best
    assert b.density < 0.15 and b.taskvec_scale > 1.8 and abs(b.slerp_t - 0.8) < 0.15
    assert all(row["sigma"] > 0 for row in res.history)


# --------------------------------------------------------------------------- operators

def test_mutation_and_crossover_keep_genomes_valid():
    """Long chains (mostly mutating the newest genome, a random walk on DFS length) with
    crossovers mixed in; strong noise and frequent flips push every parameter to its bounds."""
    cfg = SearchConfig(n_parents=3, n_layers=5, flip_prob=0.1, route_rate=0.9, param_rate=0.8,
                       weight_scale=0.5, slerp_scale=0.5, density_scale=0.5, taskvec_scale_sigma=1.0)
    lo, hi = dfs_length_bounds(5)
    assert (lo, hi) == (2, 10)
    lengths, changed, total = set(), 0, 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        pool = first_generation(3)
        for _ in range(60):
            if rng.random() < 0.8:
                parent = pool[-1] if rng.random() < 0.9 else pool[int(rng.integers(len(pool)))]
                child = mutate(parent, cfg, rng)
                changed, total = changed + (child.key() != parent.key()), total + 1
            else:
                child = crossover([pool[int(i)] for i in rng.integers(len(pool), size=3)], cfg, rng)
            assert genome_problems(child, cfg) == [], child
            assert Genome.from_dict(json.loads(json.dumps(child.to_dict()))).key() == child.key()
            if child.layers == "dfs" and child.route:
                lengths.add(len(child.route))
            pool.append(child)
    assert changed == total  # a mutation always changes something
    assert min(lengths) == lo and max(lengths) == hi  # the whole allowed length range is reached


def test_genome_problems_catches_invalid_genomes():
    """So the validity loop above is not vacuous."""
    cfg = SearchConfig(n_parents=2, n_layers=4)
    bad = [Genome(weights=(0.7, 0.7)), Genome(weights=(1.2, -0.2)), Genome(density=0.01),
           Genome(taskvec_scale=2.5), Genome(route=(0, 3, 0, 0)), Genome(route=(0, 1, 0)),
           Genome(layers="dfs", route=((0, 0),) * 9), Genome(layers="dfs", route=((0, 4), (0, 1)))]
    assert all(genome_problems(g, cfg) for g in bad)
    assert genome_problems(Genome(weights=(0.25, 0.75), route=(2, 0, 1, 0)), cfg) == []


# --------------------------------------------------------------------------- diversity

def test_diversity_of_identical_genomes_is_zero():
    cfg = SearchConfig(n_layers=4)
    g = Genome(interp="slerp", weights=(0.3, 0.7), density=0.2, route=(1, 2, 0, 0))
    assert diversity([g] * 5, cfg) == 0.0


def test_diversity_of_the_eight_combinations_by_hand():
    """Floats and routes equal; each technique differs in 4 * 4 = 16 of the 28 pairs, so
    the mean Hamming distance is 3 * 16 / 28 = 12 / 7, over 8 parts: 3 / 14."""
    assert diversity(first_generation(2), SearchConfig(n_layers=4)) == pytest.approx(3 / 14)


def test_distance_parts_by_hand():
    cfg = SearchConfig(n_layers=4, scale_range=(0.0, 2.0), density_min=0.05)
    base = Genome(weights=(0.5, 0.5))
    d = lambda **kw: genome_distance(base, Genome(**{"weights": (0.5, 0.5), **kw}), cfg)
    assert d(slerp_t=0.0) == pytest.approx(0.5 / 8)
    assert genome_distance(Genome(weights=(1.0, 0.0)), Genome(weights=(0.0, 1.0)), cfg) == pytest.approx(1 / 8)
    assert d(weights=(0.75, 0.25)) == pytest.approx(0.25 / 8)  # total variation 0.25
    assert d(density=0.975) == pytest.approx((0.475 / 0.95) / 8)
    assert d(taskvec_scale=1.5) == pytest.approx(0.25 / 8)
    assert d(route=(1, 0, 0, 0)) == pytest.approx(0.25 / 8)  # one of 4 layers from another source
    assert d(layers="dfs") == pytest.approx(1 / 8)  # same identity route, other technique
    assert d(layers="dfs", route=((0, 0), (0, 1))) == pytest.approx((1 + 0.5) / 8)  # 2 of 4 steps missing
    assert d(interp="slerp", taskvec="dare", slerp_t=0.0) == pytest.approx(2.5 / 8)


# --------------------------------------------------------------------------- cache

def test_cache_prevents_re_evaluation(tmp_path):
    fit = Counted(bowl)
    cfg = SearchConfig(generations=8, n_layers=4, seed=2)
    res = run_search(cfg, fit, tmp_path / "s.json")
    assert max(fit.calls.values()) == 1
    assert sum(row["n_evaluated"] for row in res.history) == sum(fit.calls.values()) == res.fitness_calls
    assert sum(row["cache_hits"] for row in res.history) >= cfg.elites * (cfg.generations - 1)
    assert set(res.evaluated) == set(fit.calls)
    again = Counted(bowl)
    res2 = run_search(cfg, again, tmp_path / "s.json")  # a finished state: nothing left to do
    assert sum(again.calls.values()) == 0 == res2.fitness_calls and res2.best.key() == res.best.key()


def test_duplicate_genomes_in_a_population_are_evaluated_once():
    from agent_forge.evomerge.search import _Evaluator

    fit = Counted(bowl)
    ev = _Evaluator(fit, {}, lambda: None)
    g = first_generation(2, n_layers=4)
    fits, new, hits = ev.evaluate([g[0], g[1], g[0], g[0]], generation=0)
    assert (new, hits, sum(fit.calls.values())) == (2, 2, 2)
    assert fits[0].value == fits[2].value == bowl(g[0])


# --------------------------------------------------------------------------- resume

@pytest.mark.parametrize("strategy", ["ga", "cma"])
def test_resume_equals_uninterrupted(tmp_path, strategy):
    cfg = dict(strategy=strategy, n_layers=4, seed=7)
    whole = Counted(bowl)
    ref = run_search(SearchConfig(generations=4, **cfg), whole, tmp_path / "a.json")
    first, second = Counted(bowl), Counted(bowl)
    run_search(SearchConfig(generations=2, **cfg), first, tmp_path / "b.json")
    res = run_search(SearchConfig(generations=4, **cfg), second, tmp_path / "b.json")
    assert rows_without_time(res.history) == rows_without_time(ref.history)
    assert res.best == ref.best and res.best_fitness == ref.best_fitness
    assert not set(first.calls) & set(second.calls)
    assert first.calls + second.calls == whole.calls


@pytest.mark.parametrize("strategy", ["ga", "cma"])
def test_crash_mid_generation_resumes_identically(tmp_path, strategy):
    """A fitness that dies halfway through generation 2: the evaluations it finished are
    cached and not repeated, and the resumed search equals the uninterrupted one."""
    cfg = SearchConfig(strategy=strategy, generations=5, n_layers=4, seed=11)
    ref = run_search(cfg, bowl)
    crashing = Counted(bowl, fail_after=8 + 6 + 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_search(cfg, crashing, tmp_path / "s.json")
    state = json.loads((tmp_path / "s.json").read_text())
    assert state["generation"] == 1 and any(e["generation"] == 2 for e in state["cache"].values())
    rest = Counted(bowl)
    res = run_search(cfg, rest, tmp_path / "s.json")
    assert rows_without_time(res.history) == rows_without_time(ref.history)
    assert res.best == ref.best
    assert not set(crashing.calls) & set(rest.calls)


def test_resume_refuses_a_different_search(tmp_path):
    run_search(SearchConfig(generations=2, seed=0), bowl, tmp_path / "s.json")
    with pytest.raises(ValueError, match="seed"):
        run_search(SearchConfig(generations=3, seed=1), bowl, tmp_path / "s.json")


KILL_SCRIPT = '''
import sys, time
from agent_forge.evomerge.genome import Genome
from agent_forge.evomerge.search import Fitness, SearchConfig, run_search

CFG = SearchConfig(generations=6, n_layers=4, seed=3)


def score(g):
    w0 = g.weights[0] / sum(g.weights)
    return -((w0 - 0.8) ** 2 + (g.density - 0.7) ** 2 + 0.5 * (g.layers != "dfs"))


def make_fitness(calls_path, sleep):
    def fitness(g):
        with open(calls_path, "a") as fh:
            fh.write(g.key() + "\\n")
        time.sleep(sleep)
        return Fitness(score(g))
    return fitness


if __name__ == "__main__":
    run_search(CFG, make_fitness(sys.argv[2], float(sys.argv[3])), sys.argv[1])
'''


def _search_process(script, state, calls, sleep):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(script), str(state), str(calls), str(sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _state_or_none(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_kill_minus_9_mid_generation_then_resume(tmp_path):
    script, state_path, calls = tmp_path / "job.py", tmp_path / "state.json", tmp_path / "calls.txt"
    script.write_text(KILL_SCRIPT)
    victim = _search_process(script, state_path, calls, 0.05)
    deadline, state = time.time() + 120, None
    while time.time() < deadline and victim.poll() is None:
        state = _state_or_none(state_path)
        if state and any(e["generation"] == 2 for e in state["cache"].values()):
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the search finished before the kill; make it longer"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = json.loads(state_path.read_text())  # a complete JSON file: the writes are atomic
    assert killed["generation"] < 5 and killed["generation"] + 1 in {e["generation"] for e in killed["cache"].values()}
    n_before = len(calls.read_text().split())
    resumed = _search_process(script, state_path, calls, 0.0)
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    after = calls.read_text().split()[n_before:]
    assert not set(after) & set(killed["cache"])  # nothing cached before the kill ran again
    assert len(after) == len(set(after))
    final = json.loads(state_path.read_text())
    assert [row["generation"] for row in final["history"]] == list(range(6))
    assert final["history"][:killed["generation"] + 1] == killed["history"]

    spec = importlib.util.spec_from_file_location("kill_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    ref = run_search(job.CFG, job.make_fitness(tmp_path / "ref_calls.txt", 0.0))
    assert rows_without_time(final["history"]) == rows_without_time(ref.history)
    assert set(calls.read_text().split()) == set((tmp_path / "ref_calls.txt").read_text().split())


# --------------------------------------------------------------------------- intervals

def test_fitness_intervals_come_from_the_project_helpers_and_survive_the_state(tmp_path):
    correct = [True, True, False, True, False, True, True, True]
    f = Fitness.from_correct(correct)
    assert (f.value, f.n) == (0.75, 8) and (f.low, f.high) == wilson_interval(6, 8)
    s = Fitness.from_scores([0.1, 0.5, 0.9, 0.4])
    assert s.low <= s.value <= s.high and s.n == 4
    res = run_search(SearchConfig(generations=2), lambda g: Fitness.from_correct(
        [bowl(g) > -0.9] * 5 + [bowl(g) > -0.5] * 5), tmp_path / "s.json")
    stored = json.loads((tmp_path / "s.json").read_text())["cache"][res.best.key()]["fitness"]
    assert Fitness.from_dict(stored) == res.best_fitness and res.best_fitness.low is not None
