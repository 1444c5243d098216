"""One page a person can open or attach: a chain run's table and its plots, self-contained.

`forge run` writes `out/forge_report.html` beside `forge_report.json`: the printed table (each
phase's own summary rows), then the training loss curves of every phase (from its
metrics.jsonl), the accuracy figures with their 95% intervals as bars (Quiet-STaR test and
fresh splits with thinking on and off, BitNet before and after, EvoMerge best parent and
champion), and EvoMerge's fitness per generation (the fitness.png its plot stage wrote). Images are embedded as PNG data URIs, so
the file needs nothing beside it. Every figure is read from the run's own reports.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from agent_forge.tracking import read_metrics

HTML_FILE = "forge_report.html"


def _png(fig) -> str:
    """The figure as an <img> with a base64 PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return _img(buf.getvalue())


def _img(png: bytes) -> str:
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(phase_dirs: dict[str, Path]) -> str | None:
    """Loss against step for every stage of every phase that logged a `loss`."""
    series = []
    for phase, d in phase_dirs.items():
        by_stage: dict[str, list[tuple[int, float]]] = {}
        for row in read_metrics(d):
            if isinstance(row.get("loss"), (int, float)) and row.get("step") is not None:
                by_stage.setdefault(row.get("stage", "?"), []).append((row["step"], row["loss"]))
        series += [(f"{phase}: {stage}", pts) for stage, pts in by_stage.items() if len(pts) > 1]
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), dpi=110, squeeze=False)
    for ax, (name, pts) in zip(axes[0], series):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    return _png(fig)


def accuracy_points(reports: dict) -> list[tuple[str, float, list | None]]:
    """(label, accuracy, [low, high]) for every measured accuracy the phase reports hold."""
    from agent_forge.report import headline

    points = []
    if "evomerge" in reports:
        test = reports["evomerge"].get("stages", {}).get("test", {})
        for key, label in (("best_parent", "EvoMerge: best parent (test)"), ("champion", "EvoMerge: champion (test)")):
            f = test.get(key) or {}
            if f.get("value") is not None:
                points.append((label, f["value"], [f.get("low"), f.get("high")]))
    if "quietstar" in reports:
        h = headline(reports["quietstar"])
        fresh = reports["quietstar"].get("stages", {}).get("fresh_split") or {}
        points += [("Quiet-STaR: test, thinking on", h["accuracy_on"], h["ci95_on"]),
                   ("Quiet-STaR: test, thinking off", h["accuracy_off"], h["ci95_off"]),
                   ("Quiet-STaR: fresh, thinking on", fresh.get("accuracy_on"), fresh.get("ci95_on"))]
    if "bitnet" in reports:
        st = reports["bitnet"].get("stages", {})
        before, after = st.get("before") or {}, st.get("after") or {}
        points += [("BitNet: input, thinking on", before.get("accuracy_on"), before.get("ci95_on")),
                   ("BitNet: ternary, thinking on", after.get("accuracy_on"), after.get("ci95_on")),
                   ("BitNet: ternary, thinking off", after.get("accuracy_off"), after.get("ci95_off"))]
    return [(label, acc, ci) for label, acc, ci in points if acc is not None]


def accuracy_bars(points: list[tuple[str, float, list | None]]) -> str | None:
    """Horizontal bars, one per accuracy, with its 95% interval as an error bar."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(points) + 1.0), dpi=110)
    ys = list(range(len(points)))[::-1]
    values = [100 * acc for _, acc, _ in points]
    err = [[max(0.0, 100 * (acc - ci[0])) if ci and ci[0] is not None else 0.0 for _, acc, ci in points],
           [max(0.0, 100 * (ci[1] - acc)) if ci and ci[1] is not None else 0.0 for _, acc, ci in points]]
    ax.barh(ys, values, xerr=err, capsize=3, color="tab:blue", alpha=0.7)
    ax.set_yticks(ys, [label for label, _, _ in points], fontsize=8)
    ax.set_xlabel("accuracy, % (bars: 95% interval)")
    ax.set_xlim(0, 100)
    return _png(fig)


def fitness_plot(evomerge_dir: Path) -> str | None:
    """EvoMerge's fitness per generation: the fitness.png its plot stage wrote, embedded."""
    path = evomerge_dir / "fitness.png"
    if not path.is_file():
        return None
    return _img(path.read_bytes())


def _table(rows: list[tuple[str, str]]) -> str:
    from rich.text import Text

    def plain(s: str) -> str:
        return html.escape(Text.from_markup(str(s)).plain)

    body = "\n".join(f"<tr><td>{plain(a)}</td><td>{plain(b)}</td></tr>" for a, b in rows)
    return f"<table>\n{body}\n</table>"


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:14px}td{border:1px solid #ccc;padding:3px 8px;"
         "vertical-align:top;white-space:pre-wrap}img{max-width:100%;margin:1em 0}")


def write_html_report(out: str | Path, report: dict) -> Path:
    """out/forge_report.html from a chain report (run_chain's return value)."""
    from agent_forge.chain import chain_rows

    out = Path(out)
    reports = report.get("reports", {})
    parts = [f"<h1>Agent Forge run: {html.escape(out.name)}</h1>",
             f"<p>phases: {html.escape(' -> '.join(report.get('phases', [])))}; "
             f"{report.get('total_seconds', 0) / 60:.1f} min in all</p>",
             "<h2>Figures</h2>", _table(chain_rows(report))]
    plots = [("Accuracy with 95% intervals", accuracy_bars(accuracy_points(reports))),
             ("Training loss", loss_curves({p: out / p for p in report.get("phases", [])})),
             ("EvoMerge fitness per generation", fitness_plot(out / "evomerge"))]
    parts += [f"<h2>{title}</h2>{img}" for title, img in plots if img]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Agent Forge: {html.escape(out.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = out / HTML_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
