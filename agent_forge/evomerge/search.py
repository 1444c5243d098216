"""The evolutionary search of Phase 2: evolve merge recipes (genomes) against a fitness.

The search never merges anything: it is handed ``fitness(genome) -> Fitness`` and only
proposes genomes, so it is tested in seconds on synthetic functions and the merge engine
is tested on its own.

Two strategies, both starting from generation 0 = the 2^3 = 8 technique combinations:

- ``ga``: each generation keeps the ``elites`` best genomes unchanged (so the best fitness
  never gets worse), fills most of the rest with mutated children of the elites, and
  *re-merges the losers*: the worst genomes are crossed in groups (floats averaged,
  techniques and routes picked from a member) instead of being thrown away, because a poor
  recipe often carries one good ingredient;
- ``cma``: CMA-ES (the ``cma`` package) on the continuous parameters (weights, slerp_t,
  density, taskvec_scale) of the best generation-0 combination; techniques and route stay
  fixed. CMA-ES does not keep elites, so the reported ``best`` is the best so far.

Every fitness value is cached under ``Genome.key()``: no genome is evaluated twice, across
generations or across a resume. After each evaluation and each finished generation the
state is rewritten atomically (tmp + fsync + os.replace) as plain JSON; nothing is pickled.

Resume is exact. GA: the state holds the last finished population and the numpy RNG state
(``bit_generator.state``), so breeding the next generation replays bit for bit. CMA: the
``es`` object is *not* stored; it is rebuilt by replaying ask/tell from the seed with the
cached fitness values (no fitness call), which reproduces it exactly for the same ``cma``
and numpy versions. The stored mean/sigma/iteration are checked after the replay and a
mismatch (another ``cma`` version) is warned about, the search then continuing from the
replayed, valid but no longer identical, state. Evaluations of a generation cut short by a
kill are in the cache too, so they are not repeated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from agent_forge.evaluation.metrics import bootstrap_ci, wilson_interval
from agent_forge.evomerge.genome import Genome, first_generation
from agent_forge.evomerge.operators import MAX_TRIES, _normalise, crossover, diversity, mutate, parent_weights

# 2: generation 0 stitches real frankenmerge routes, an empty route keys as one model, and
# with a base taskvec_scale is task arithmetic's lambda: version-1 fitnesses do not carry over.
STATE_VERSION = 2
STRATEGIES = ("ga", "cma")
DFS_OPS = ("swap", "repeat", "drop", "source")
_RESUME_FREE = ("generations", "save_every_eval")  # config fields a resume may change


@dataclass
class Fitness:
    """One genome's measured fitness. Only ``value`` ranks genomes; the interval is carried
    along so a report can say whether the champion's lead is more than noise."""

    value: float  # what the search maximises (e.g. validation accuracy)
    low: float | None = None  # lower end of its 95% interval (None = not measured)
    high: float | None = None  # upper end of its 95% interval
    n: int = 0  # items the value was measured on
    details: dict = field(default_factory=dict)  # anything else the fitness wants kept (JSON)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fitness":
        return cls(**d)

    @classmethod
    def from_correct(cls, correct: Sequence[bool], details: dict | None = None) -> "Fitness":
        """Accuracy with the project's Wilson interval (evaluation.metrics)."""
        n, k = len(correct), int(sum(bool(c) for c in correct))
        low, high = wilson_interval(k, n)
        return cls(k / n if n else 0.0, low, high, n, dict(details or {}))

    @classmethod
    def from_scores(cls, scores: Sequence[float], details: dict | None = None, seed: int = 0) -> "Fitness":
        """Mean per-item score with the project's seeded bootstrap interval."""
        low, high = bootstrap_ci(scores, seed=seed)
        mean = float(np.mean(scores)) if len(scores) else float("nan")
        return cls(mean, low, high, len(scores), dict(details or {}))


@dataclass
class SearchConfig:
    """Evolutionary search settings. Generation 0 is always the 8 technique combinations."""

    strategy: str = "ga"  # "ga" (elitist GA, losers re-merged) or "cma" (CMA-ES on the floats)
    generations: int = 10  # generations evaluated, generation 0 included; a resume may raise it
    population: int = 8  # genomes per generation from generation 1 on (CMA-ES popsize too)
    elites: int = 2  # GA: best genomes carried unchanged into the next generation
    n_remerge: int = 2  # GA: children made by crossing groups of the worst genomes
    remerge_group: int = 3  # GA: losers crossed into one re-merged child
    n_parents: int = 2  # models being merged (length of Genome.weights)
    n_layers: int = 0  # layers of the models; 0 = unknown, routes are never changed
    seed: int = 0  # seeds the GA's numpy Generator and CMA-ES's sampler
    param_rate: float = 0.5  # probability that a mutation perturbs each float parameter
    weight_scale: float = 0.1  # std of the Gaussian noise added to each parent weight
    slerp_scale: float = 0.1  # std of the noise on slerp_t (clipped to [0, 1])
    density_scale: float = 0.1  # std of the noise on density (clipped to [density_min, 1])
    taskvec_scale_sigma: float = 0.2  # std of the noise on taskvec_scale (clipped to scale_range)
    flip_prob: float = 0.05  # probability that a mutation flips each of the three techniques
    route_rate: float = 0.3  # probability that a mutation changes the route once
    dfs_ops: tuple = DFS_OPS  # DFS path edits a mutation may use
    density_min: float = 0.05  # density is kept in [density_min, 1]
    scale_range: tuple = ()  # taskvec_scale is kept in this range; empty = (0, max(2, n_parents)),
    # so lambda reaches task arithmetic's sum of whole task vectors (the weights average them)
    cma_sigma: float = 0.2  # CMA-ES initial step size; every coordinate is scaled to [0, 1]
    save_every_eval: bool = True  # rewrite the state after each evaluation, not only per generation

    def __post_init__(self):
        self.dfs_ops, self.scale_range = tuple(self.dfs_ops), tuple(float(x) for x in self.scale_range)
        problems = config_problems(self)
        if problems:
            raise ValueError("bad SearchConfig: " + "; ".join(problems))

    @property
    def scale_bounds(self) -> tuple[float, float]:
        """The taskvec_scale range in force: scale_range, or (0, max(2, n_parents)) when empty."""
        return self.scale_range or (0.0, float(max(2, self.n_parents)))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def config_problems(cfg: SearchConfig) -> list[str]:
    """Every inconsistency at once, so a bad config is fixed in one go."""
    checks = [(cfg.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
              (cfg.generations >= 1, "generations must be >= 1"),
              (cfg.population >= 2, "population must be >= 2"),
              (1 <= cfg.elites < cfg.population, "elites must be in [1, population)"),
              (0 <= cfg.n_remerge <= cfg.population - cfg.elites,
               "n_remerge must be in [0, population - elites]"),
              (cfg.remerge_group >= 2, "remerge_group must be >= 2"),
              (cfg.n_parents >= 2, "n_parents must be >= 2"),
              (cfg.n_layers >= 0, "n_layers must be >= 0"),
              (0.0 < cfg.density_min <= 1.0, "density_min must be in (0, 1]"),
              (not cfg.scale_range or len(cfg.scale_range) == 2 and cfg.scale_range[0] < cfg.scale_range[1],
               "scale_range must be (lo, hi), lo < hi, or empty for (0, max(2, n_parents))"),
              (set(cfg.dfs_ops) <= set(DFS_OPS) and len(cfg.dfs_ops) > 0,
               f"dfs_ops must be a non-empty subset of {DFS_OPS}"),
              (cfg.cma_sigma > 0, "cma_sigma must be > 0")]
    return [msg for ok, msg in checks if not ok]


@dataclass
class SearchResult:
    """What a search found and how it got there."""

    best: Genome  # the fittest genome evaluated in any generation
    best_fitness: Fitness
    history: list[dict]  # one row per generation (see _history_row)
    evaluated: dict[str, dict]  # Genome.key() -> {"genome": dict, "fitness": dict, "generation": first seen}
    fitness_calls: int  # fitness() calls this run_search call made (0 if all came from the state)


# --------------------------------------------------------------------------- state

def write_json_atomic(path: Path, data: dict) -> None:
    """tmp + fsync + os.replace: after a kill -9 the file is the old state or the new one,
    never half of one (the project's checkpoint rule, training/checkpoint.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _new_state(cfg: SearchConfig) -> dict:
    """The state file's layout: the last finished generation (its population, the GA's RNG
    state after it, CMA's check values, the history) and the fitness cache, which also
    holds evaluations of the generation in progress."""
    return {"version": STATE_VERSION, "config": cfg.to_dict(), "generation": -1, "population": [],
            "rng": None, "cma": None, "history": [], "cache": {}}


def _open_state(path: Path | None, cfg: SearchConfig) -> dict:
    """A fresh state, or the one at ``path`` if it was written by the same search: every
    config field but those in _RESUME_FREE must match, or the replay would differ."""
    if path is None or not path.exists():
        return _new_state(cfg)
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: made by search state version {state.get('version')}, this engine writes "
                         f"{STATE_VERSION} (its generation 0 and task-vector scale differ, so the cached "
                         f"fitnesses do not apply): start the search in a new output folder")
    mine = cfg.to_dict()
    diff = sorted(k for k in mine if k not in _RESUME_FREE and state["config"].get(k) != mine[k])
    if diff:
        raise ValueError(f"{path} belongs to a search with different {diff}; use another state file")
    state["config"] = mine
    return state


def _as_fitness(x) -> Fitness:
    """Accept a Fitness or a bare number; store plain JSON types."""
    if isinstance(x, (int, float, np.number)):
        return Fitness(float(x))
    if not isinstance(x, Fitness):
        raise TypeError(f"fitness must return a Fitness or a number, got {type(x).__name__}")
    f = lambda v: None if v is None else float(v)
    return Fitness(float(x.value), f(x.low), f(x.high), int(x.n), dict(x.details))


class _Evaluator:
    """fitness() behind the cache: each distinct genome (by key) is evaluated once, ever."""

    def __init__(self, fitness: Callable[[Genome], Fitness], cache: dict, persist: Callable[[], None]):
        self.fitness, self.cache, self.persist, self.calls = fitness, cache, persist, 0

    def evaluate(self, genomes: Sequence[Genome], generation: int) -> tuple[list[Fitness], int, int]:
        """(fitnesses, new, hits): ``new`` counts distinct genomes first evaluated in this
        generation (also those a killed run evaluated before dying), ``hits`` every other
        lookup, so the counts do not depend on whether the run was interrupted."""
        fits, seen, new = [], set(), 0
        for g in genomes:
            k = g.key()
            if k not in self.cache:
                fit = _as_fitness(self.fitness(g))
                self.cache[k] = {"genome": g.to_dict(), "fitness": fit.to_dict(), "generation": generation}
                self.calls += 1
                self.persist()
            new += int(self.cache[k]["generation"] == generation and k not in seen)
            seen.add(k)
            fits.append(Fitness.from_dict(self.cache[k]["fitness"]))
        return fits, new, len(genomes) - new

    def known(self, genomes: Sequence[Genome]) -> list[Fitness]:
        """Cached fitnesses of genomes a finished generation evaluated (resume, replay)."""
        missing = [g.key() for g in genomes if g.key() not in self.cache]
        if missing:
            raise ValueError(f"state file inconsistent: genomes {missing[:3]} of a finished generation are not cached")
        return [Fitness.from_dict(self.cache[g.key()]["fitness"]) for g in genomes]


def _score(value) -> float:
    """Ranking value: a missing or non-finite fitness ranks below every real one."""
    return float(value) if value is not None and math.isfinite(value) else -math.inf


def _order(fits: Sequence[Fitness]) -> list[int]:
    """Indices best first; ties keep population order (elites come first, so they win)."""
    return sorted(range(len(fits)), key=lambda i: -_score(fits[i].value))


# --------------------------------------------------------------------------- strategies

class _GA:
    """Elitist GA: elites unchanged, mutated children of the elites, losers re-merged."""

    def __init__(self, cfg: SearchConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng

    def restore(self, state: dict, ev: _Evaluator) -> None:
        """Nothing beyond the RNG state, which run_search restores."""

    def observe(self, generation: int, pop: list[Genome], fits: list[Fitness]) -> None:
        """The GA keeps no state between generations but the population."""

    def snapshot(self) -> None:
        return None

    def row_extra(self) -> dict:
        return {}

    def propose(self, pop: list[Genome], fits: list[Fitness], evaluated: set) -> list[Genome]:
        """Next population: elites first, then mutants of the elites (round robin), then one
        re-merged child per group of losers. A child already in the population or already
        ``evaluated`` (keys of earlier generations) is mutated again, so every slot but the
        elites' buys a new evaluation."""
        ranked = [pop[i] for i in _order(fits)]
        elites = ranked[:self.cfg.elites]
        groups = _loser_groups(ranked, len(elites), self.cfg)
        out, keys = list(elites), {g.key() for g in elites} | set(evaluated)
        for i in range(self.cfg.population - len(elites) - len(groups)):
            out.append(self._fresh(mutate(elites[i % len(elites)], self.cfg, self.rng), keys))
        for group in groups:
            out.append(self._fresh(crossover(group, self.cfg, self.rng, label="remerge"), keys))
        return out

    def _fresh(self, child: Genome, keys: set) -> Genome:
        for _ in range(MAX_TRIES):
            if child.key() not in keys:
                break
            child = mutate(child, self.cfg, self.rng, label=child.label)
        keys.add(child.key())
        return child


def _loser_groups(ranked: list[Genome], n_elites: int, cfg: SearchConfig) -> list[list[Genome]]:
    """The worst n_remerge * remerge_group non-elites, in consecutive groups (worst with
    worst), at most n_remerge of them."""
    losers = ranked[max(n_elites, len(ranked) - cfg.n_remerge * cfg.remerge_group):]
    if not losers or cfg.n_remerge == 0:
        return []
    size = math.ceil(len(losers) / cfg.n_remerge)
    return [losers[i:i + size] for i in range(0, len(losers), size)]


def encode(g: Genome, cfg: SearchConfig) -> list[float]:
    """The CMA-ES vector: weights, slerp_t, density, taskvec_scale, each scaled to [0, 1]."""
    lo, hi = cfg.scale_bounds
    x = [*parent_weights(g, cfg.n_parents), g.slerp_t,
         (g.density - cfg.density_min) / max(1e-12, 1.0 - cfg.density_min), (g.taskvec_scale - lo) / (hi - lo)]
    return [float(v) for v in np.clip(x, 0.0, 1.0)]


def decode(x: Sequence[float], base: Genome, cfg: SearchConfig) -> Genome:
    """``base`` (techniques, route) with the floats of ``x``; weights renormalised."""
    x, n, (lo, hi) = np.clip(np.asarray(x, dtype=float), 0.0, 1.0), cfg.n_parents, cfg.scale_bounds
    return dataclasses.replace(base, weights=tuple(float(v) for v in _normalise(x[:n])), slerp_t=float(x[n]),
                               density=float(cfg.density_min + x[n + 1] * (1.0 - cfg.density_min)),
                               taskvec_scale=float(lo + x[n + 2] * (hi - lo)), label="cma")


class _CMA:
    """CMA-ES on the floats of the best generation-0 combination. Its sampler draws from
    its own seeded Generator (option ``randn``, ``seed`` = nan), never from numpy's global
    state, so a fitness that uses np.random cannot change the search, and a replay of
    ask/tell from the seed rebuilds ``es`` exactly."""

    def __init__(self, cfg: SearchConfig):
        self.cfg, self.es, self.base, self.xs = cfg, None, None, None

    def _start(self, base: Genome) -> None:
        import cma

        self.base, draws = base, np.random.default_rng(self.cfg.seed)
        opts = {"seed": np.nan, "randn": lambda lam, n: draws.standard_normal((lam, n)), "bounds": [0.0, 1.0],
                "popsize": self.cfg.population, "verbose": -10, "verb_log": 0, "verb_disp": 0}
        self.es = cma.CMAEvolutionStrategy(encode(base, self.cfg), self.cfg.cma_sigma, opts)

    def observe(self, generation: int, pop: list[Genome], fits: list[Fitness]) -> None:
        if generation == 0:
            self._start(pop[_order(fits)[0]])
        else:  # cma minimises; a non-finite fitness becomes the worst possible loss
            self.es.tell(self.xs, [min(1e30, -_score(f.value)) for f in fits])

    def propose(self, pop, fits, evaluated=frozenset()) -> list[Genome]:
        """CMA-ES's own sample; a sample that rounds to a known key is a cache hit."""
        self.xs = self.es.ask()
        return [decode(x, self.base, self.cfg) for x in self.xs]

    def restore(self, state: dict, ev: _Evaluator) -> None:
        """Rebuild ``es`` by replaying every finished generation from the cache (no fitness
        call), then compare with the stored mean, sigma and iteration count."""
        self._start(Genome.from_dict(state["cma"]["base"]))
        for generation in range(1, state["generation"] + 1):
            pop = self.propose(None, None)
            self.observe(generation, pop, ev.known(pop))
        _check_replay(self.snapshot(), state["cma"])

    def snapshot(self) -> dict:
        import cma

        return {"base": self.base.to_dict(), "mean": [float(v) for v in self.es.mean],
                "sigma": float(self.es.sigma), "countiter": int(self.es.countiter), "cma_version": cma.__version__}

    def row_extra(self) -> dict:
        return {"sigma": float(self.es.sigma)}


def _check_replay(now: dict, stored: dict) -> None:
    same = (now["countiter"] == stored["countiter"] and np.allclose(now["mean"], stored["mean"], rtol=1e-9, atol=1e-12)
            and math.isclose(now["sigma"], stored["sigma"], rel_tol=1e-9))
    if not same:
        warnings.warn(f"CMA-ES replay differs from the stored state (cma {stored.get('cma_version')} wrote it, "
                      f"{now['cma_version']} replayed it): continuing from the replayed state, not bit-identical")


# --------------------------------------------------------------------------- the search

def _history_row(generation: int, pop: list[Genome], fits: list[Fitness], new: int, hits: int,
                 history: list[dict], cfg: SearchConfig, seconds: float) -> dict:
    """One generation. ``best`` is the best so far (for the GA the elite, also this
    generation's best); gen_best/mean/worst describe this generation's population."""
    top = _order(fits)[0]
    best = {"best": fits[top].value, "best_key": pop[top].key(), "best_low": fits[top].low,
            "best_high": fits[top].high}
    if history and _score(history[-1]["best"]) >= _score(fits[top].value):
        best = {k: history[-1][k] for k in best}
    finite = [f.value for f in fits if math.isfinite(_score(f.value))]
    return {"generation": generation, **best, "gen_best": fits[top].value,
            "mean": float(np.mean(finite)) if finite else None, "worst": min(finite) if finite else None,
            "n_invalid": len(fits) - len(finite), "diversity": diversity(pop, cfg), "n_evaluated": new,
            "cache_hits": hits, "seconds": round(seconds, 4), "keys": [g.key() for g in pop]}


def run_search(cfg: SearchConfig, fitness: Callable[[Genome], Fitness], state_path: str | Path | None = None,
               on_generation: Callable[[dict], None] | None = None) -> SearchResult:
    """Run (or resume, if ``state_path`` holds a state of the same search) to
    ``cfg.generations`` generations. ``on_generation(row)`` is called after each finished
    generation, once the state is on disk; ``state_path=None`` keeps everything in memory.
    A state already past ``cfg.generations`` is returned as it is (nothing is undone)."""
    path = Path(state_path) if state_path is not None else None
    state = _open_state(path, cfg)
    rng = np.random.default_rng(cfg.seed)
    if state["rng"] is not None:
        rng.bit_generator.state = state["rng"]

    def persist() -> None:
        if path is not None and cfg.save_every_eval:
            write_json_atomic(path, state)

    ev = _Evaluator(fitness, state["cache"], persist)
    strategy = _GA(cfg, rng) if cfg.strategy == "ga" else _CMA(cfg)
    pop = [Genome.from_dict(d) for d in state["population"]]
    fits = ev.known(pop)
    if state["generation"] >= 0:
        strategy.restore(state, ev)
    for generation in range(state["generation"] + 1, cfg.generations):
        t0 = time.time()
        # only earlier generations' keys: those of a killed run's partial generation would change the replay
        evaluated = {k for k, e in state["cache"].items() if e["generation"] < generation}
        pop = first_generation(cfg.n_parents, cfg.n_layers) if generation == 0 else strategy.propose(pop, fits, evaluated)
        fits, new, hits = ev.evaluate(pop, generation)
        strategy.observe(generation, pop, fits)
        row = {**_history_row(generation, pop, fits, new, hits, state["history"], cfg, time.time() - t0),
               **strategy.row_extra()}
        state.update(generation=generation, population=[g.to_dict() for g in pop],
                     rng=rng.bit_generator.state, cma=strategy.snapshot())
        state["history"].append(row)
        if path is not None:
            write_json_atomic(path, state)
        if on_generation is not None:
            on_generation(row)
    return _result(state, ev.calls)


def _result(state: dict, calls: int) -> SearchResult:
    entry = state["cache"][state["history"][-1]["best_key"]]
    return SearchResult(best=Genome.from_dict(entry["genome"]), best_fitness=Fitness.from_dict(entry["fitness"]),
                        history=list(state["history"]), evaluated=dict(state["cache"]), fitness_calls=calls)
