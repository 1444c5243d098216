"""EvoMerge, why merges lose to the best parent: do the specialists' task vectors add?

Specialists of the default model (Step 1, 320 verified traces of one family, 40 steps,
`--make-parents`'s recipe) are combined by hand-written recipes (soups, half and summed task
vectors) and scored, thinking on, greedy, on 120 validation questions (60 chain sums, 60
equations; none asked in training). Three arms:

- `base`: parents fine-tuned from the base (as `--make-parents` does), plus a second
  chain-sum parent with another seed: a soup of two same-family fine-tunes;
- `warm`: a shared warm start first (`--warm-steps` on all families: the thinking format
  learned once), then the specialists from it, their task vectors taken against it;
- `lr`: parents at another learning rate (`--lr`), from the base.

Prints a table per arm and each merge against the best single parent (paired over the same
questions), writes bench/results/evomerge_task_vectors.json. About 30 min per arm on the
2-core CPU; `--summarise` recomputes the paired comparisons from that JSON without training.

    python bench/evomerge_task_vectors.py --arms base,warm,lr --warm-steps 20 --lr 1e-4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import save_result

from agent_forge.evomerge.parents import ParentsConfig, prepare_base, train_parent

RESULT = Path(__file__).parent / "results" / "evomerge_task_vectors.json"
FAMILIES = ("chain_sum", "simple_equations")
PARENTS = ("A (chain sums)", "E (equations)", "B (chain sums, seed 1)")  # the one-model recipes


def arm_models(arm: str, out: Path, args) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """(name -> model dir, recipe name -> {model name: coefficient}) for one arm."""
    base = prepare_base("default", out)
    cfg = ParentsConfig(records=320, steps=40, lr=args.lr if arm == "lr" else ParentsConfig.lr)
    start = base
    if arm == "warm":
        start = train_parent(base, ParentsConfig.families, 8 * args.warm_steps, args.warm_steps, cfg,
                             out / arm / "warm")["path"]
    models = {"start": start}
    for fam, key in zip(FAMILIES, ("A", "E")):
        models[key] = train_parent(start, (fam,), cfg.records, cfg.steps, cfg, out / arm / fam)["path"]
    recipes = {"start": {"start": 1.0}, "A (chain sums)": {"A": 1.0}, "E (equations)": {"E": 1.0},
               "linear(A, E)": {"A": 0.5, "E": 0.5}, "A + E - start": {"A": 1.0, "E": 1.0, "start": -1.0}}
    if arm == "base":
        seed1 = ParentsConfig(records=320, steps=40, seed=1)
        models["B"] = train_parent(start, ("chain_sum",), 320, 40, seed1, out / arm / "chain_sum_seed1")["path"]
        recipes.update({"B (chain sums, seed 1)": {"B": 1.0}, "soup(A, B)": {"A": 0.5, "B": 0.5},
                        "start + 0.5 (A - start)": {"start": 0.5, "A": 0.5},
                        "A + (B - start)": {"A": 1.0, "B": 1.0, "start": -1.0}})
    return models, recipes


def score_recipes(models: dict[str, str], recipes: dict, items) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from agent_forge.evomerge.fitness import FitnessConfig, measure
    from agent_forge.evomerge.merge import build_model, load_state

    states = {k: load_state(p) for k, p in models.items()}
    ref = states["A"]
    tok, conf = AutoTokenizer.from_pretrained(models["A"]), AutoConfig.from_pretrained(models["A"])
    out = {}
    for name, coefs in recipes.items():
        t0 = time.time()
        state = {n: sum(c * states[k][n].float() for k, c in coefs.items()).to(ref[n].dtype) for n in ref}
        f = measure(build_model(state, conf), tok, items, FitnessConfig(max_new_tokens=128, batch_size=16))
        out[name] = {"acc": f.value, "ci": [f.low, f.high], "per_family": f.details["per_family"],
                     "no_answer": f.details["no_answer_rate"], "correct": f.details["correct"],
                     "s": round(time.time() - t0)}
        fam = " ".join(f"{k} {100 * v:.1f}%" for k, v in f.details["per_family"].items())
        print(f"  {name:26s} {100 * f.value:5.1f}% [{100 * f.low:.1f}, {100 * f.high:.1f}]  {fam}  "
              f"no answer {100 * f.details['no_answer_rate']:.0f}%", flush=True)
    return out


def vs_best_parent(recipes: dict) -> dict:
    """Each merge minus the best single parent, paired over the same questions."""
    from agent_forge.validation.stats import paired_gain

    best = max((k for k in PARENTS if k in recipes), key=lambda k: recipes[k]["acc"])
    out = {}
    for name, r in recipes.items():
        if name in PARENTS or name == "start":
            continue
        g = paired_gain(recipes[best]["correct"], r["correct"])
        out[name] = {"vs": best, "points": g["points"], "ci95_points": g["ci95_points"], "mcnemar_p": g["mcnemar_p"]}
        print(f"  {name:26s} - {best}: {g['points']:+.1f} points [{g['ci95_points'][0]:+.1f}, "
              f"{g['ci95_points'][1]:+.1f}], McNemar p={g['mcnemar_p']:.2g}")
    return out


def summarise() -> None:
    import json

    for arm, rec in json.loads(RESULT.read_text()).items():
        print(f"arm {arm}:")
        save_result({**rec, "vs_best_parent": vs_best_parent(rec["recipes"])}, RESULT, arm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="base,warm,lr")
    p.add_argument("--warm-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="runs/evomerge_task_vectors")
    p.add_argument("--summarise", action="store_true", help="only the paired comparisons, from the JSON")
    args = p.parse_args()
    if args.summarise:
        return summarise()
    from agent_forge.data.evalsets import load_eval_set

    items = [it for it in load_eval_set("easy_arithmetic_val", limit=300) if it.family in FAMILIES][:120]
    for arm in args.arms.split(","):
        print(f"arm {arm}:", flush=True)
        models, recipes = arm_models(arm, Path(args.out), args)
        scored = score_recipes(models, recipes, items)
        rec = {"recipes": scored, "vs_best_parent": vs_best_parent(scored), "models": models,
               "warm_steps": args.warm_steps if arm == "warm" else 0,
               "lr": args.lr if arm == "lr" else ParentsConfig.lr}
        save_result(rec, RESULT, arm)


if __name__ == "__main__":
    main()
