"""What the search does to genomes: mutation, crossover (the GA's re-merge of losers),
validity checks, and the distance behind the population's diversity.

Routes are kept canonical (an identity route is written ``()``) so equivalent genomes
share a cache key; a mutation that flips the layer technique converts the route
(frankenmerge -> DFS: the path ``(route[i], i)``; DFS -> frankenmerge: each layer's source
at its first visit). Diversity is the mean pairwise distance, each distance the mean of
eight parts in [0, 1]: three technique mismatches, total variation of the weights,
|d slerp_t|, |d density| and |d scale| over their ranges, and the fraction of differing
route positions.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Sequence

import numpy as np

from agent_forge.evomerge.genome import INTERP, LAYERS, TASKVEC, Genome

if TYPE_CHECKING:
    from agent_forge.evomerge.search import SearchConfig

MAX_TRIES = 20  # attempts at a mutation that really changes the genome / a child not yet in the population
N_DISTANCE_PARTS = 8  # 3 techniques + weights + slerp_t + density + taskvec_scale + route


# --------------------------------------------------------------------------- operators

def dfs_length_bounds(n_layers: int) -> tuple[int, int]:
    """Allowed DFS path lengths: [n_layers // 2, 2 * n_layers], at least 1 (an empty path
    would mean "the stage-2 model's own layers", not "no layers")."""
    return max(1, n_layers // 2), 2 * n_layers


def parent_weights(genome: Genome, n_parents: int) -> np.ndarray:
    """The genome's weights as a normalised vector; empty means equal."""
    if not genome.weights:
        return np.full(n_parents, 1.0 / n_parents)
    if len(genome.weights) != n_parents:
        raise ValueError(f"genome has {len(genome.weights)} weights, search has {n_parents} parents")
    return _normalise(np.asarray(genome.weights, dtype=float))


def _normalise(w: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(w, dtype=float), 0.0, None)
    s = w.sum()
    return w / s if s > 0 else np.full(w.size, 1.0 / w.size)


def full_route(layers: str, route: tuple, n_layers: int) -> list:
    """The explicit route: frankenmerge -> one source per layer; dfs -> (source, layer)
    pairs. An empty route is the identity (every layer from the stage-2 model, in order)."""
    if route or n_layers == 0:
        return [tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r) for r in route]
    return [0] * n_layers if layers == "frankenmerge" else [(0, i) for i in range(n_layers)]


def canonical_route(layers: str, route, n_layers: int) -> tuple:
    """The identity route written as (), so equivalent genomes share a cache key."""
    route = tuple(tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r) for r in route)
    return () if n_layers and route == tuple(full_route(layers, (), n_layers)) else route


def _convert_route(route: tuple, old: str, new: str, n_layers: int) -> tuple:
    """A route carried across a flip of the layer technique. Frankenmerge -> DFS: the path
    (route[i], i); DFS -> frankenmerge: each layer from the source of its first visit in
    the path, the stage-2 model when the path skips it."""
    if old == new or not route:
        return route
    if n_layers == 0:
        return ()  # layer count unknown: fall back to the identity route
    path = full_route(old, route, n_layers)
    if new == "dfs":
        return tuple((s, i) for i, s in enumerate(path))
    first = {}
    for s, layer in path:
        first.setdefault(layer, s)
    return tuple(first.get(i, 0) for i in range(n_layers))


def _mutate_route(layers: str, route: tuple, cfg: SearchConfig, rng: np.random.Generator) -> tuple:
    """One edit: frankenmerge changes one layer's source; DFS swaps, repeats, drops a step
    or changes a step's source, keeping the length within dfs_length_bounds."""
    path = full_route(layers, route, cfg.n_layers)
    if layers == "frankenmerge":
        i = int(rng.integers(len(path)))
        path[i] = _other_source(path[i], cfg.n_parents, rng)
        return tuple(path)
    lo, hi = dfs_length_bounds(cfg.n_layers)
    ops = [op for op in cfg.dfs_ops if (op != "swap" or len(path) >= 2) and
           (op != "repeat" or len(path) < hi) and (op != "drop" or len(path) > lo)]
    if not ops:
        return tuple(path)
    op, i = ops[int(rng.integers(len(ops)))], int(rng.integers(len(path)))
    if op == "swap":
        j = int(rng.integers(len(path) - 1))
        j += j >= i
        path[i], path[j] = path[j], path[i]
    elif op == "repeat":
        path.insert(i + 1, path[i])
    elif op == "drop":
        path.pop(i)
    else:
        path[i] = (_other_source(path[i][0], cfg.n_parents, rng), path[i][1])
    return tuple(path)


def _other_source(current: int, n_parents: int, rng: np.random.Generator) -> int:
    """A source in 0..n_parents other than the current one."""
    s = int(rng.integers(n_parents))
    return s + (s >= current)


def _perturb(value: float, sigma: float, lo: float, hi: float, rate: float, rng) -> float:
    if rng.random() >= rate:
        return value
    return float(np.clip(value + rng.normal(0.0, sigma), lo, hi))


def _flip(value: str, options: tuple, prob: float, rng) -> str:
    if rng.random() >= prob:
        return value
    return options[1 - options.index(value)]


def mutate(genome: Genome, cfg: SearchConfig, rng: np.random.Generator, label: str = "mutate") -> Genome:
    """A changed copy of ``genome``: retried until its key differs (at most MAX_TRIES)."""
    child = genome
    for _ in range(MAX_TRIES):
        child = _mutate_once(genome, cfg, rng, label)
        if child.key() != genome.key():
            break
    return child


def _mutate_once(g: Genome, cfg: SearchConfig, rng: np.random.Generator, label: str) -> Genome:
    """Perturb each float with probability param_rate (weights stay >= 0 and sum to 1),
    flip each technique with probability flip_prob, edit the route with route_rate."""
    w = parent_weights(g, cfg.n_parents)
    if rng.random() < cfg.param_rate:
        w = _normalise(w + rng.normal(0.0, cfg.weight_scale, w.size))
    slerp_t = _perturb(g.slerp_t, cfg.slerp_scale, 0.0, 1.0, cfg.param_rate, rng)
    density = _perturb(g.density, cfg.density_scale, cfg.density_min, 1.0, cfg.param_rate, rng)
    scale = _perturb(g.taskvec_scale, cfg.taskvec_scale_sigma, *cfg.scale_bounds, cfg.param_rate, rng)
    interp, taskvec = _flip(g.interp, INTERP, cfg.flip_prob, rng), _flip(g.taskvec, TASKVEC, cfg.flip_prob, rng)
    layers = _flip(g.layers, LAYERS, cfg.flip_prob, rng)
    route = _convert_route(g.route, g.layers, layers, cfg.n_layers)
    if cfg.n_layers > 0 and rng.random() < cfg.route_rate:
        route = _mutate_route(layers, route, cfg, rng)
    return Genome(interp=interp, taskvec=taskvec, layers=layers, weights=tuple(float(x) for x in w),
                  slerp_t=slerp_t, density=density, taskvec_scale=scale,
                  route=canonical_route(layers, route, cfg.n_layers), label=label)


def crossover(parents: Sequence[Genome], cfg: SearchConfig, rng: np.random.Generator,
              label: str = "crossover") -> Genome:
    """One child of several genomes: floats averaged (weights renormalised), each technique
    from a random parent; the route comes with the layer technique (from the parents that
    share it: per layer for frankenmerge, one-point for DFS), so it always fits it."""
    w = _normalise(np.mean([parent_weights(p, cfg.n_parents) for p in parents], axis=0))
    interp = parents[int(rng.integers(len(parents)))].interp
    taskvec = parents[int(rng.integers(len(parents)))].taskvec
    donor = parents[int(rng.integers(len(parents)))]
    route = _cross_route(donor, [p for p in parents if p.layers == donor.layers], cfg, rng)
    return Genome(interp=interp, taskvec=taskvec, layers=donor.layers, weights=tuple(float(x) for x in w),
                  slerp_t=float(np.mean([p.slerp_t for p in parents])),
                  density=float(np.clip(np.mean([p.density for p in parents]), cfg.density_min, 1.0)),
                  taskvec_scale=float(np.clip(np.mean([p.taskvec_scale for p in parents]), *cfg.scale_bounds)),
                  route=canonical_route(donor.layers, route, cfg.n_layers), label=label)


def _cross_route(donor: Genome, same: list[Genome], cfg: SearchConfig, rng) -> tuple:
    if cfg.n_layers == 0:
        return donor.route
    routes = [full_route(p.layers, p.route, cfg.n_layers) for p in same]
    if donor.layers == "frankenmerge":
        return tuple(routes[int(rng.integers(len(routes)))][i] for i in range(cfg.n_layers))
    mine, other = full_route(donor.layers, donor.route, cfg.n_layers), routes[int(rng.integers(len(routes)))]
    cut = int(rng.integers(min(len(mine), len(other)) + 1))
    return tuple(other[:cut] + mine[cut:])


def genome_problems(g: Genome, cfg: SearchConfig) -> list[str]:
    """Why ``g`` is not a valid genome for this search (empty list = valid)."""
    out = []
    if g.weights and (len(g.weights) != cfg.n_parents or min(g.weights) < 0 or abs(sum(g.weights) - 1) > 1e-6):
        out.append(f"weights {g.weights} are not {cfg.n_parents} non-negative numbers summing to 1")
    if not cfg.density_min <= g.density <= 1.0:
        out.append(f"density {g.density} outside [{cfg.density_min}, 1]")
    if not cfg.scale_bounds[0] <= g.taskvec_scale <= cfg.scale_bounds[1]:
        out.append(f"taskvec_scale {g.taskvec_scale} outside {cfg.scale_bounds}")
    if not 0.0 <= g.slerp_t <= 1.0:
        out.append(f"slerp_t {g.slerp_t} outside [0, 1]")
    return out + _route_problems(g, cfg)


def _route_problems(g: Genome, cfg: SearchConfig) -> list[str]:
    if not g.route:
        return []
    sources = range(cfg.n_parents + 1)
    if g.layers == "frankenmerge":
        ok = len(g.route) == cfg.n_layers and all(isinstance(s, int) and s in sources for s in g.route)
        return [] if ok else [f"frankenmerge route {g.route} is not {cfg.n_layers} sources in 0..{cfg.n_parents}"]
    lo, hi = dfs_length_bounds(cfg.n_layers)
    ok = lo <= len(g.route) <= hi and all(isinstance(p, tuple) and len(p) == 2 and p[0] in sources
                                          and p[1] in range(cfg.n_layers) for p in g.route)
    return [] if ok else [f"dfs route {g.route} is not {lo}..{hi} (source, layer) pairs"]


# --------------------------------------------------------------------------- diversity

def genome_distance(a: Genome, b: Genome, cfg: SearchConfig) -> float:
    """Distance in [0, 1]: the mean of 8 parts, each in [0, 1] — one per technique (0 same,
    1 different: a Hamming distance), the total-variation distance between the normalised
    weights, |d slerp_t|, |d density| / (1 - density_min), |d taskvec_scale| / the width of
    scale_range (clipped at 1), and the route part: routes written as (source, layer) paths
    (frankenmerge layer i -> (route[i], i)), the fraction of positions that differ, a
    missing position counting as different."""
    lo, hi = cfg.scale_bounds
    parts = [float(a.interp != b.interp), float(a.taskvec != b.taskvec), float(a.layers != b.layers),
             0.5 * float(np.abs(parent_weights(a, cfg.n_parents) - parent_weights(b, cfg.n_parents)).sum()),
             abs(a.slerp_t - b.slerp_t),
             min(1.0, abs(a.density - b.density) / max(1e-12, 1.0 - cfg.density_min)),
             min(1.0, abs(a.taskvec_scale - b.taskvec_scale) / (hi - lo)),
             _route_distance(_as_path(a, cfg.n_layers), _as_path(b, cfg.n_layers))]
    return sum(parts) / N_DISTANCE_PARTS


def _as_path(g: Genome, n_layers: int) -> list:
    route = full_route(g.layers, g.route, n_layers)
    return [(s, i) for i, s in enumerate(route)] if g.layers == "frankenmerge" else route


def _route_distance(a: list, b: list) -> float:
    longest = max(len(a), len(b))
    if longest == 0:
        return 0.0
    return (sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))) / longest


def diversity(genomes: Sequence[Genome], cfg: SearchConfig) -> float:
    """Mean pairwise genome_distance; 0 for fewer than two genomes or identical ones."""
    pairs = list(itertools.combinations(genomes, 2))
    return float(np.mean([genome_distance(a, b, cfg) for a, b in pairs])) if pairs else 0.0
