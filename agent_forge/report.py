"""The short summary table printed at the end of `forge bake-quietstar`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    st = report.get("stages", {})
    s1, at, ab, ho = (st.get(k, {}) for k in ("step1", "anti_theater", "ab_test", "handoff"))
    rows = [("baking token accuracy (held-out)", _pct(s1.get("baking_accuracy"))),
            ("converged (>=85% overall)", str(s1.get("convergence", {}).get("converged"))),
            ("accuracy, thinking on", _pct(s1.get("accuracy_thinking_on")) + _ci(s1.get("ci95_on"))),
            ("accuracy, thinking forced off", _pct(s1.get("accuracy_thinking_off")) + _ci(s1.get("ci95_off"))),
            ("well-formed thinking", _pct((s1.get("usage") or {}).get("well_formed_rate")))]
    for arm in ("baseline", "candidate"):
        if arm in ab:
            rows.append((f"A/B {arm} accuracy", _pct(ab[arm].get("mean")) + f" ({ab[arm].get('name', '')})"))
    if ab:
        p = (ab.get("mcnemar") or {}).get("p", float("nan"))
        rows.append(("A/B difference (95% CI)", f"{ab.get('diff_points', 0):+.1f} points "
                     f"[{ab.get('diff_ci_points', [0, 0])[0]:+.1f}, {ab.get('diff_ci_points', [0, 0])[1]:+.1f}]"))
        rows.append(("A/B winner (McNemar p)", f"{ab.get('winner')} (p={p:.3g})"))
    if at:
        rows.append(("anti-theater", f"{'passed' if at.get('passed') else 'FAILED'}: {at.get('recommendation', '')}"))
    if ho:
        rows.append(("Phase 3 -> 4 handoff", "passed" if ho.get("ok") else "failed"))
    rows.append(("total time", f"{report.get('total_seconds', 0) / 60:.1f} min"))
    return rows


def print_summary(console: Console, report: dict) -> None:
    table = Table(title=f"Agent Forge Phase 3: {report.get('model')} ({report.get('preset')})", show_header=False)
    for name, value in summary_rows(report):
        table.add_row(name, value)
    console.print(table)
    console.print(f"report: {report.get('out')}/forge_report.json")
