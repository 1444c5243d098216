"""What people see of a search: the fitness curve as an image, and the summary table."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], best_parent: float, path: str | Path) -> Path:
    """Best / mean / worst validation fitness per generation, the best parent as a line,
    diversity on a second axis; written as a PNG (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [row["generation"] for row in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(gens, [r["best"] for r in history], "o-", label="best")
    ax.plot(gens, [r["mean"] for r in history], "s--", label="mean")
    ax.plot(gens, [r["worst"] for r in history], "v:", label="worst")
    ax.axhline(best_parent, color="grey", lw=1, label="best parent")
    ax.set_xlabel("generation")
    ax.set_ylabel("validation fitness")
    ax.set_xticks(gens)
    twin = ax.twinx()
    twin.plot(gens, [r["diversity"] for r in history], color="tab:purple", alpha=0.5, label="diversity")
    twin.set_ylabel("diversity", color="tab:purple")
    twin.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
