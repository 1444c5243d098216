"""Typer command functions for `forge eval`, `forge anti-theater` and `forge ab`.

The lead wires them into the `forge` app (e.g. `app.command("eval")(eval_cmd)`). Each
prints a rich table, or with --json exactly ONE JSON object on stdout.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from agent_forge.figures import pct

console = Console(stderr=False)
MODEL_HELP = "hub id, HF dir, .gguf, .pt, or 'default'"
BATCH_HELP = "questions generated together (default: inference.GENERATION_BATCH, 32)"
DATA_HELP = ("gsm8k, arc_easy, arc_challenge, commonsense_qa, easy_arithmetic, easy_arithmetic_val, "
             "easy_arithmetic_confirm, gym:<family>, a .jsonl, or sets joined by + (easy_arithmetic+easy_arithmetic_val)")
SEEN_HELP = ("JSONL of questions a model trained on (its 'question' fields); eval items that ask the same "
             "question are left out (repeatable)")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _load(model: str, device: Optional[str], engine: str = "torch"):
    from agent_forge.models import ModelLoadError, load_model

    if engine == "llamacpp":
        from agent_forge.llamacpp_engine import llamacpp_status, load_llamacpp

        ok, why = llamacpp_status()
        if not ok:
            _fail(f"--engine llamacpp: {why}")
        try:
            return load_llamacpp(model)
        except (OSError, ValueError, RuntimeError) as e:
            _fail(f"--engine llamacpp: cannot load {model}: {e}")
    if engine != "torch":
        _fail(f"--engine must be torch or llamacpp, not {engine!r}")
    try:
        return load_model(model, device=device)
    except ModelLoadError as e:
        _fail(str(e))


def _items(data: str, limit: Optional[int], exclude_seen: Optional[list[str]] = None, quiet: bool = False):
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.overlap import unseen_items

    try:
        items = load_eval_set(data, limit)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(f"cannot load eval set {data!r}: {e}")
    if exclude_seen:
        before = len(items)
        try:
            items = unseen_items(items, exclude_seen)
        except (ValueError, OSError) as e:
            _fail(f"--exclude-seen: {e}")
        if not quiet:
            console.print(f"left out {before - len(items)} of {before} items asked in {', '.join(exclude_seen)}")
    if not items:
        _fail(f"eval set {data!r} is empty")
    return items


def _batch(batch_size: int | None) -> int:
    """The CLI leaves the default to inference (imported late: `forge --help` stays fast)."""
    from agent_forge.inference import GENERATION_BATCH

    return batch_size or GENERATION_BATCH


POSITIONS_HELP = ("silent thoughts of a token-level Quiet-STaR model (a directory with a mixing head): "
                  "all | difficult | none (default: difficult when the model has a mixing head, else none)")


def _thought_modes(models: list[str], positions: Optional[str]) -> list[Optional[str]]:
    """Each model's silent-thought mode; --thought-positions applies to the models with a mixing head."""
    from agent_forge.quietstar.thought_inference import (HEAD_FILE, POSITIONS, has_mixing_head,
                                                         resolve_thought_positions)

    if positions is not None and positions not in POSITIONS:
        _fail(f"--thought-positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    if positions not in (None, "none") and not any(has_mixing_head(m) for m in models):
        _fail(f"--thought-positions {positions} needs a token-level Quiet-STaR model; "
              f"no {HEAD_FILE} in {', '.join(models)}")
    return [resolve_thought_positions(m, positions) if has_mixing_head(m) else None for m in models]


def _thought_line(mode: Optional[str], ms: float) -> str:
    """Which silent thoughts ran and what they cost, for the table output."""
    where = {"all": "before every visible token", "difficult": "at difficult (high-entropy) positions",
             None: "none (plain decoding)"}[mode]
    return f"silent thoughts: {where}; {ms:.0f} ms/example"


class _Timer:
    """Wall time of the generations that pass through, per label: the ms/example reported."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, label: str, gens: list) -> list:
        t = self.totals.setdefault(label, [0.0, 0])
        t[0] += sum(g.seconds for g in gens)
        t[1] += len(gens)
        return gens

    def ms(self) -> dict[str, float]:
        return {k: 1000 * sec / max(1, n) for k, (sec, n) in self.totals.items()}


def eval_cmd(model: str = typer.Option("default", help=MODEL_HELP),
             data: str = typer.Option("easy_arithmetic", help=DATA_HELP),
             limit: Optional[int] = typer.Option(None, help="first N items only"),
             thoughts: str = typer.Option("auto", help="on | off | auto (off on a model without "
                                          "thinking tokens: it answers directly)"),
             thought_positions: Optional[str] = typer.Option(None, help=POSITIONS_HELP),
             batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
             max_new_tokens: Optional[int] = typer.Option(None, help="default: 256 thinking, 48 otherwise"),
             device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
             exclude_seen: Optional[list[str]] = typer.Option(None, help=SEEN_HELP),
             engine: str = typer.Option("torch", help="torch, or llamacpp: MODEL is a .gguf file (or a folder "
                                        "with one), e.g. a BitNet run's gguf/ternary-tq2_0.gguf; greedy, batch 1"),
             json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Accuracy (Wilson 95% interval), per family, ms per example, thinking-token usage."""
    from agent_forge.evaluation.runner import evaluate

    if thoughts not in ("on", "off", "auto"):
        _fail("--thoughts must be on, off or auto")
    [thought_mode] = _thought_modes([model], thought_positions) if engine == "torch" else [None]
    m, tok = _load(model, device, engine)
    items = _items(data, limit, exclude_seen, quiet=json_out)
    try:  # the llama.cpp engine has no batched forward for multiple-choice log-likelihoods
        res = evaluate(m, tok, items, thinking=thoughts, batch_size=_batch(batch_size),
                       max_new_tokens=max_new_tokens, progress=not json_out, loglik=engine == "torch",
                       thought_mode=thought_mode, model_dir=model if thought_mode else None)
    except ValueError as e:
        _fail(str(e))
    out = {"model": model, "data": data, "engine": engine, **res.to_dict(),
           "thought_positions": thought_mode or "none"}
    if thoughts == "off" and res.mode == "direct":
        out["note"] = "the model has no thinking tokens, so thoughts off means answering directly"
    if out.get("loglik"):
        out["loglik"] = {k: v for k, v in out["loglik"].items() if k != "per_example"}
    if json_out:
        print(json.dumps(out))
        return
    _print_eval(out, res)


def _print_eval(out: dict, res) -> None:
    """The table and the lines under it."""
    table = Table(title=f"forge eval: {out['model']} on {out['data']} (thoughts {res.mode})")
    for col in ("family", "n", "accuracy", "95% CI"):
        table.add_column(col)
    for fam, s in res.per_family.items():
        table.add_row(fam, str(s["n"]), pct(s["accuracy"]), f"{pct(s['ci95'][0])} - {pct(s['ci95'][1])}")
    table.add_row("[bold]all", str(res.n), f"[bold]{pct(res.accuracy)}",
                  f"{pct(res.ci95[0])} - {pct(res.ci95[1])}")
    console.print(table)
    if out.get("note"):
        console.print(out["note"])
    mode = None if out["thought_positions"] == "none" else out["thought_positions"]
    console.print(f"{_thought_line(mode, res.ms_per_example)}   no answer {pct(res.no_answer_rate)}")
    if res.usage:
        console.print(f"thinking closed {pct(res.usage['closed_rate'])}, "
                      f"well-formed {pct(res.usage['well_formed_rate'])}")
    if res.flexible_accuracy is not None:
        console.print(f"lm-eval flexible match (last number of reply): {pct(res.flexible_accuracy)}")
    if res.loglik:
        console.print(f"log-likelihood choice: acc {pct(res.loglik['acc'])}, "
                      f"acc_norm {pct(res.loglik['acc_norm'])}")


AT_TOKENS_HELP = ("new tokens per reply (default: 256 thinking on, 48 off); the pipeline's anti-theater "
                  "uses its preset's max_new_tokens (quick: 96): pass that to compare with it")


def anti_theater_cmd(model: str = typer.Option(..., help=MODEL_HELP),
                     data: str = typer.Option("easy_arithmetic", help=DATA_HELP),
                     limit: Optional[int] = typer.Option(100, help="first N items only"),
                     batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
                     device: Optional[str] = typer.Option(None),
                     thought_positions: Optional[str] = typer.Option(None, help=POSITIONS_HELP),
                     max_new_tokens: Optional[int] = typer.Option(None, help=AT_TOKENS_HELP),
                     exclude_seen: Optional[list[str]] = typer.Option(None, help=SEEN_HELP),
                     json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Do the thoughts carry the answer? Divergence, ablation, coherence-utility correlation.

    A token-level model thinks silently in the thinking-on pass; the off pass has no thinking.
    Exit status 1 when any test fails (the recommendation is then "roll back")."""
    from agent_forge.validation.anti_theater import comparison, run_anti_theater, value_text

    [thought_mode] = _thought_modes([model], thought_positions)
    items = _items(data, limit, exclude_seen, quiet=json_out)
    m, tok = _load(model, device)
    timer = _Timer()
    gen = _anti_theater_generate(m, tok, model, thought_mode, _batch(batch_size), not json_out, timer,
                                 max_new_tokens)
    try:
        report = run_anti_theater(m, tok, items, generate_fn=gen, batch_size=_batch(batch_size),
                                  progress=not json_out)
    except ValueError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps({"model": model, "data": data, **report.to_dict(),
                          "thought_positions": thought_mode or "none", "ms_per_example": timer.ms()}))
        raise typer.Exit(0 if report.passed else 1)
    table = Table(title=f"forge anti-theater: {model} on {data}")
    for col in ("test", "value", "threshold", "passed", "detail"):
        table.add_column(col)
    for t in report.tests:
        table.add_row(t["name"], value_text(t, ".3f"),
                      f"{comparison(t)} {t['threshold']}" + (f", p < {t['alpha']}" if "alpha" in t else ""),
                      "[green]yes" if t["passed"] else "[red]no", t["detail"])
    console.print(table)
    ms = timer.ms()
    console.print(f"thinking on: {_thought_line(thought_mode, ms['on'])}; thinking off: {ms['off']:.0f} ms/example")
    colour = "green" if report.passed else "red"
    console.print(f"[bold {colour}]{report.recommendation}[/]: {report.sentence}")
    if not report.passed:
        raise typer.Exit(1)


def _anti_theater_generate(m, tok, model: str, thought_mode: Optional[str], batch_size: int,
                           progress: bool, timer: _Timer, max_new_tokens: Optional[int] = None):
    """generate_fn(questions, thinking) for run_anti_theater: silent thoughts (if any) in the
    thinking-on pass only, each pass timed."""
    from agent_forge.inference import generate_answers

    def generate(questions: list[str], thinking: str):
        tm = thought_mode if thinking == "on" else None
        return timer.add(thinking, generate_answers(m, tok, questions, thinking=thinking, batch_size=batch_size,
                                                    max_new_tokens=max_new_tokens, progress=progress,
                                                    thought_mode=tm, model_dir=model if tm else None))
    return generate


def ab_cmd(baseline: str = typer.Option(..., help=MODEL_HELP),
           candidate: str = typer.Option(..., help=MODEL_HELP),
           data: str = typer.Option("easy_arithmetic", help=DATA_HELP),
           rounds: int = typer.Option(3, help="round 0 greedy, later rounds sampled with new seeds"),
           limit: Optional[int] = typer.Option(100, help="first N items only"),
           threshold: float = typer.Option(2.0, help="improvement in points needed to win"),
           batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
           device: Optional[str] = typer.Option(None),
           exclude_seen: Optional[list[str]] = typer.Option(None, help=SEEN_HELP),
           thought_positions: Optional[str] = typer.Option(None, help=POSITIONS_HELP + "; applies to each "
                                                            "arm that has a mixing head"),
           json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Baseline vs candidate over several rounds with paired significance tests."""
    from agent_forge.validation.ab import Arm, model_arm, run_ab

    names = [baseline, candidate]
    modes = _thought_modes(names, thought_positions)
    items = _items(data, limit, exclude_seen, quiet=json_out)
    timer = _Timer()
    arms = []
    for role, name, mode in zip(("baseline", "candidate"), names, modes):
        arm = model_arm(name, *_load(name, device), batch_size=_batch(batch_size), thought_mode=mode,
                        model_dir=name if mode else None)
        arms.append(Arm(name, lambda qs, r, arm=arm, role=role: timer.add(role, arm.generate(qs, r))))
    report = run_ab(arms[0], arms[1], items, rounds=rounds, threshold=threshold, progress=not json_out)
    thoughts = {"baseline": modes[0] or "none", "candidate": modes[1] or "none"}
    if json_out:
        print(json.dumps({"data": data, **report.to_dict(), "thought_positions": thoughts,
                          "ms_per_example": timer.ms()}))
        return
    table = Table(title=f"forge ab on {data}: {rounds} round(s), {len(items)} items")
    for col in ("arm", "mean accuracy", "std over rounds", "per round", "silent thoughts", "ms/example"):
        table.add_column(col)
    for role, arm in (("baseline", report.baseline), ("candidate", report.candidate)):
        table.add_row(arm["name"], pct(arm["mean"]), f"{100 * arm['std']:.1f}",
                      ", ".join(pct(a) for a in arm["per_round"]), thoughts[role], f"{timer.ms()[role]:.0f}")
    console.print(table)
    console.print(report.sentence)
