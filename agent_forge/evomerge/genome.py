"""A merge recipe as a genome: what the search evolves and what the merge engine reads.

A candidate is built in three stages, one technique from each pair (the design's 2^3 = 8
binary combinations):

1. interpolation, ``linear`` | ``slerp``: a consensus model from the parents (weighted
   average, or spherical interpolation, chained parent by parent for more than two);
2. task vectors, ``ties`` | ``dare``: the parents' differences from a base (their common
   ancestor when known, else the stage-1 model), sparsified to ``density`` (TIES: keep the
   largest, elect a sign; DARE: drop at random, rescale by 1/density), weighted, scaled by
   ``taskvec_scale`` and added to the stage-1 model;
3. layers, ``frankenmerge`` | ``dfs``: frankenmerge takes each layer position from one
   source (``route[i]``: 0 = the stage-2 model, k = parent k), depth unchanged; DFS
   (data-flow space) is a path of (source, layer) pairs of any length, layers repeated or
   reordered, as in Sakana AI's evolutionary merge.

Floats are rounded in ``key()`` so a recipe and its cached fitness are found again after a
JSON round trip, and an empty route keys as one model whichever layer technique names it
(frankenmerge and DFS with the identity route both give the stage-2 model unchanged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field

INTERP = ("linear", "slerp")
TASKVEC = ("ties", "dare")
LAYERS = ("frankenmerge", "dfs")


@dataclass(frozen=True)
class Genome:
    interp: str = "linear"
    """Stage 1: ``linear`` or ``slerp``."""
    taskvec: str = "ties"
    """Stage 2: ``ties`` or ``dare``."""
    layers: str = "frankenmerge"
    """Stage 3: ``frankenmerge`` or ``dfs``."""
    weights: tuple[float, ...] = ()
    """Per-parent weights for stages 1 and 2 (normalised by the engine); empty = equal."""
    slerp_t: float = 0.5
    """SLERP position between the running merge and the next parent, in [0, 1]."""
    density: float = 0.5
    """Fraction of each task vector kept by TIES/DARE, in (0, 1]."""
    taskvec_scale: float = 1.0
    """Lambda on the merged task vector. With a base: base + lambda * TIES/DARE(task
    vectors), the weights averaging them, so lambda = number of parents is task arithmetic's
    sum of whole vectors; without a base: lambda times the vector added to stage 1."""
    route: tuple = ()
    """Frankenmerge: one source per layer (0 = stage-2 model, k = parent k); empty = all 0.
    DFS: (source, layer) pairs, the layers the hidden state flows through in order;
    empty = the stage-2 model's own layers."""
    label: str = field(default="", compare=False)
    """How the genome was made (gen0, mutate, crossover, cma); not part of its identity."""

    def __post_init__(self):
        for value, allowed, name in ((self.interp, INTERP, "interp"), (self.taskvec, TASKVEC, "taskvec"),
                                     (self.layers, LAYERS, "layers")):
            if value not in allowed:
                raise ValueError(f"genome {name} must be one of {allowed}, got {value!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"genome density must be in (0, 1], got {self.density}")
        if not 0.0 <= self.slerp_t <= 1.0:
            raise ValueError(f"genome slerp_t must be in [0, 1], got {self.slerp_t}")

    @property
    def combination(self) -> str:
        return f"{self.interp}+{self.taskvec}+{self.layers}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = list(self.weights)
        d["route"] = [list(r) if isinstance(r, (tuple, list)) else r for r in self.route]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Genome":
        route = tuple(tuple(r) if isinstance(r, (list, tuple)) else int(r) for r in d.get("route", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        rest = {k: v for k, v in d.items() if k in known and k not in ("weights", "route")}
        return cls(weights=tuple(float(w) for w in d.get("weights", ())), route=route, **rest)

    def key(self) -> str:
        """Identity for the fitness cache: rounded floats, label left out."""
        d = self.to_dict()
        d.pop("label")
        if not d["route"]:
            d["layers"] = "identity"  # both layer techniques leave the stage-2 model as it is
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
        d["weights"] = [round(w, 4) for w in d["weights"]]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def first_generation(n_parents: int, n_layers: int = 0) -> list[Genome]:
    """The 2^3 = 8 technique combinations with equal weights and default parameters.

    So that the eight are eight models, the frankenmerge ones stitch the parents' own layers
    in contiguous blocks (parent 1's first, then parent 2's, ...: the classic passthrough
    merge), while DFS starts from the stage-2 model's own path; with ``n_layers`` unknown
    (0) both routes are the identity and each frankenmerge/DFS pair is one model (one key)."""
    equal = tuple([1.0 / n_parents] * n_parents)
    blocks = tuple(1 + i * n_parents // n_layers for i in range(n_layers))
    return [Genome(interp=i, taskvec=t, layers=l, weights=equal, label="gen0",
                   route=blocks if l == "frankenmerge" else ())
            for i, t, l in itertools.product(INTERP, TASKVEC, LAYERS)]
