"""How the summary rows write a measured figure: a percentage, its interval, a target's verdict.
One place, so every phase's rows say "met" only as strongly as their evidence does."""

from __future__ import annotations


def pct(x, missing: str = "-") -> str:
    """A fraction as a percentage with one decimal; `missing` for a figure not measured."""
    return missing if x is None else f"{100 * x:.1f}%"


def ci_text(ci) -> str:
    """A 95% interval of fractions as " [lo, hi]" in percent; "" when there is none."""
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def spans(ci, target: float, shown: str | None = None) -> str:
    """"; its 95% interval spans <target>" when the interval holds the target (the sample does
    not settle which side of it the model is on), else "". `shown`: the target as the row
    writes it (default: a percentage)."""
    if ci and ci[0] < target <= ci[1]:
        return f"; its 95% interval spans {shown or f'{100 * target:.0f}%'}"
    return ""


def met_within(ok: bool, ci, target: float, shown: str | None = None) -> str:
    """met / MISSED, and "by the point estimate" with the interval's span when the 95% interval
    holds the target."""
    clause = spans(ci, target, shown)
    return f"{met(ok)} by the point estimate{clause}" if clause else met(ok)
