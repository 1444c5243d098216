"""`forge data build` and `forge data stats`: thin typer commands over the data modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from agent_forge.data.procedural import DEFAULT_FAMILIES

console = Console()
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="reasoning data: build and inspect")


def _split(text: Optional[str], default) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else tuple(default)


def load_questions(path: Optional[Path], n: int, seed: int, difficulty: str, families) -> list[dict]:
    """Questions with gold answers: from a JSONL file ({question, answer|gold[, id, family]}),
    or fresh training problems from the procedural generator (never an eval set)."""
    if path is not None:
        out = []
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
            if line.strip():
                d = json.loads(line)
                out.append({"id": str(d.get("id", f"{Path(path).stem}-{i}")), "question": d["question"],
                            "gold": str(d.get("gold", d.get("answer"))), "family": d.get("family", "")})
        return out[:n] if n else out
    from agent_forge.data.procedural import build_gym_records

    return [{"id": r.id, "question": r.question, "gold": r.gold, "family": r.family}
            for r in build_gym_records(n, seed=seed, families=families, difficulty=difficulty)]


def _drop_eval_overlap(items: list, check: bool) -> list:
    """Drop records or question dicts whose question duplicates an evaluation item."""
    if not check:
        return items
    from agent_forge.data.overlap import find_overlap
    from agent_forge.data.schema import Record

    texts = [x["question"] if isinstance(x, dict) else x.question for x in items]
    hits = find_overlap([Record(str(i), q, [], "", "", "") for i, q in enumerate(texts)])
    if hits:
        console.print(f"[yellow]dropped {len(hits)} item(s) that duplicate evaluation questions[/]")
    return [x for i, x in enumerate(items) if str(i) not in hits]


def data_build(
    source: str = typer.Option("gym", help="gym (procedural), api (teacher models), star (local model)"),
    n: int = typer.Option(2000, help="records (gym) or questions (api, star)"),
    out: Path = typer.Option(Path("data/train.jsonl"), help="output JSONL (api: appended, resumable)"),
    seed: int = typer.Option(0, help="training seed; evaluation seeds never overlap it"),
    difficulty: str = typer.Option("easy_wide", help="easy, easy_wide (the whole easy range: the pipeline's default), medium or hard"),
    families: Optional[str] = typer.Option(None, help=f"comma list; default {','.join(DEFAULT_FAMILIES)}"),
    questions: Optional[Path] = typer.Option(None, help="api/star: JSONL of {question, answer}"),
    base_url: str = typer.Option("https://openrouter.ai/api/v1", help="OpenAI-compatible endpoint"),
    models: Optional[str] = typer.Option(None, help="api: comma list of teacher models"),
    budget_usd: float = typer.Option(1.0, help="api: hard budget for this output file"),
    api_key_env: str = typer.Option("OPENROUTER_API_KEY", help="api: env var holding the key"),
    strategies: Optional[str] = typer.Option(None, help="api: comma list (default: all ten)"),
    concurrency: int = typer.Option(4, help="api: requests in flight"),
    model: str = typer.Option("default", help="star: the model that writes rationales"),
    k: int = typer.Option(4, help="star: samples per question"),
    rationalize: bool = typer.Option(False, help="star: retry unsolved questions with the answer as a hint"),
    check_overlap: bool = typer.Option(True, help="drop items that duplicate evaluation questions"),
):
    """Build reasoning records and write them as JSONL."""
    fams = _split(families, DEFAULT_FAMILIES)
    if source == "gym":
        _build_gym(n, out, seed, difficulty, fams, check_overlap)
    elif source == "api":
        _build_api(n, out, seed, difficulty, fams, questions, check_overlap, base_url, models,
                   budget_usd, api_key_env, strategies, concurrency)
    elif source == "star":
        _build_star(n, out, seed, difficulty, fams, questions, check_overlap, model, k, rationalize)
    else:
        console.print(f"[red]unknown source {source!r}; choose gym, api or star[/]")
        raise typer.Exit(2)


def _build_gym(n, out, seed, difficulty, fams, check_overlap) -> None:
    import time

    from agent_forge.data.overlap import asked_by
    from agent_forge.data.procedural import build_gym_records
    from agent_forge.data.schema import write_records

    t0, stats = time.perf_counter(), {}
    with console.status(f"generating {n} procedural records"):
        records = build_gym_records(n, seed=seed, families=fams, difficulty=difficulty, stats=stats,
                                    exclude=asked_by() if check_overlap else None)
    write_records(out, records)
    console.print(f"wrote {len(records)} records to {out} in {time.perf_counter() - t0:.1f} s "
                  f"(gold fixed {stats.get('gold_fixed', 0)}, bad gold {stats.get('bad_gold', 0)}, "
                  f"failed verification {stats.get('failed_verification', 0)}, "
                  f"skipped as asked by an eval set {stats.get('eval_overlap', 0)})")


def _build_api(n, out, seed, difficulty, fams, questions, check_overlap, base_url, models,
               budget_usd, api_key_env, strategies, concurrency) -> None:
    from rich.progress import Progress

    from agent_forge.data.api import DEFAULT_MODELS, FAILED, TeacherConfig, run_api_build
    from agent_forge.vocab import STRATEGIES

    qs = _drop_eval_overlap(load_questions(questions, n, seed, difficulty, fams), check_overlap)
    cfg = TeacherConfig(base_url=base_url, api_key_env=api_key_env, models=_split(models, DEFAULT_MODELS),
                        strategies=_split(strategies, STRATEGIES), budget_usd=budget_usd, concurrency=concurrency)
    total = len(qs) * len(cfg.models) * len(cfg.strategies)
    with Progress(console=console) as bar:
        task = bar.add_task("teacher calls", total=total)
        try:
            report = run_api_build(qs, out, cfg, progress=lambda: bar.advance(task))
        except RuntimeError as e:  # a missing or refused key: one message, the server's text unparsed
            bar.stop()
            console.print(str(e), style="red", markup=False, highlight=False)
            raise typer.Exit(2)
    console.print_json(json.dumps(report.to_dict()))
    failed = sum(report.rejected_by_reason.get(k, 0) for k in FAILED)
    if failed:
        console.print(f"[yellow]{failed} job(s) failed (API errors or budget); rerun the same command "
                      "to retry them[/]")


def _build_star(n, out, seed, difficulty, fams, questions, check_overlap, model_spec, k, rationalize) -> None:
    from agent_forge.data.schema import write_records
    from agent_forge.data.star import star_records
    from agent_forge.models import load_model

    qs = _drop_eval_overlap(load_questions(questions, n, seed, difficulty, fams), check_overlap)
    model, tokenizer = load_model(model_spec)
    with console.status(f"sampling {k} rationales for {len(qs)} questions"):
        records, report = star_records(model, tokenizer, qs, k=k, rationalize=rationalize)
    write_records(out, records)
    console.print(f"kept {len(records)} of {report.samples} samples -> {out}")
    console.print_json(json.dumps(report.to_dict()))


def data_stats(path: Path = typer.Argument(..., help="records JSONL"),
               json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Counts per strategy, source and family; trace lengths; cost."""
    from agent_forge.data.stats import file_stats

    s = file_stats(path)
    if json_out:
        console.print_json(json.dumps(s))
        return
    table = Table(title=f"{path}: {s['records']} records")
    table.add_column("strategy")
    table.add_column("records", justify="right")
    table.add_column("share", justify="right")
    table.add_column("segments", justify="right")
    for name, count in s["strategy_records"].items():
        table.add_row(name, str(count), f"{s['strategy_share'][name]:.1%}", str(s["strategy_segments"][name]))
    console.print(table)
    for key in ("source", "family", "teacher"):
        if s[key]:
            console.print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in sorted(s[key].items())))
    w = s["thinking_words"]
    console.print(f"thinking words: mean {w['mean']:.1f}, median {w['median']:.0f}, max {w['max']}; "
                  f"segments/record {s['segments_mean']:.2f}; cost ${s['cost_usd']:.4f}; bad lines {s['bad_lines']}")


data_app.command("build")(data_build)
data_app.command("stats")(data_stats)
