"""Typer command for `forge rl`: Step 2 (Quiet-STaR RL) on a Step 1 model.

The lead wires it into the app (`app.command("rl")(rl_cmd)`). Options left unset keep the
RLConfig default (or the --config YAML's value). With --json it prints ONE JSON object.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console


def _fail(message: str) -> None:
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def rl_cmd(model: str = typer.Option(..., help="the Step 1 model: HF dir (or hub id, .gguf, .pt, default)"),
           data: Optional[str] = typer.Option(None, help="records JSONL (question + gold); default: "
                                              "build easy arithmetic questions (seed 2)"),
           out: str = typer.Option("runs/step2", help="output folder: model/, step2.json, checkpoints/"),
           mode: str = typer.Option("answer", help="answer | token"),
           steps: Optional[int] = typer.Option(None, help="optimiser steps (default 30)"),
           samples: Optional[int] = typer.Option(None, help="K samples per question (default 4)"),
           questions: Optional[int] = typer.Option(None, help="questions per step (default 4)"),
           reward: Optional[str] = typer.Option(None, help="correct | loglik | both (default both)"),
           lr: Optional[float] = typer.Option(None, help="learning rate (default 1e-5)"),
           optimizer: Optional[str] = typer.Option(None, help="adamw | mugrokfast (default adamw)"),
           kl: Optional[float] = typer.Option(None, help="KL coefficient to the Step 1 model (default 0.1)"),
           config: Optional[str] = typer.Option(None, help="YAML file with RLConfig fields (--mode token: "
                                                 "TokenRLConfig fields)"),
           eval_data: str = typer.Option("easy_arithmetic", help="held-out set for the final evaluation"),
           eval_samples: Optional[int] = typer.Option(None, help="held-out questions (default 100)"),
           device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
           tracking: str = typer.Option("offline", help="W&B mode: offline | online | disabled"),
           resume: bool = typer.Option(False, "--resume", help="continue from out/checkpoints"),
           json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Reinforce thoughts that lead to right answers (GRPO-style groups, KL to the Step 1 model)."""
    if mode not in ("answer", "token"):
        _fail(f"--mode must be 'answer' or 'token', not {mode!r}")
    answer_only = {"--samples": samples, "--questions": questions, "--reward": reward}
    if mode == "token" and any(v is not None for v in answer_only.values()):
        _fail(f"{', '.join(k for k, v in answer_only.items() if v is not None)}: answer mode only; "
              "token mode sets its thoughts with --config (n_thoughts, thought_len, injection)")
    from agent_forge.quietstar.rl import run_step2
    from agent_forge.tracking import Tracker

    given = {"steps": steps, "samples_per_question": samples, "questions_per_step": questions,
             "reward": reward, "lr": lr, "optimizer": optimizer, "kl_coefficient": kl,
             "eval_samples": eval_samples}
    overrides = {k: v for k, v in given.items() if v is not None}
    progress = None if json_out else _printer()
    with Tracker(out, mode=tracking, config={"command": "rl", "mode": mode, **overrides}) as tracker:
        try:
            if mode == "token":
                metrics = _token_mode(model, out, data, overrides, config, eval_data, device, tracker,
                                      progress, resume)
            else:
                metrics = run_step2(model, out, overrides, config, data=data, eval_data=eval_data, resume=resume,
                                    device=device, tracker=tracker, progress=progress)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
    if json_out:
        print(json.dumps(metrics, default=str))
        return
    if mode == "token":
        _print_token(metrics)
        return
    _print_answer(metrics, out)


def _print_answer(metrics: dict, out: str) -> None:
    """Answer mode's training metrics and its held-out comparison, as lines."""
    console = Console()
    console.print(f"[green]Step 2 done[/]: model in {metrics.get('model_dir', out + '/model')}")
    console.print(f"  held-out {metrics.get('eval_data')}: {metrics.get('eval_n', '?')} questions, leaving out "
                  f"{metrics.get('eval_left_out_seen', 0)} that the training data asks")
    gain = metrics.get("gain_vs_before")
    if gain:
        console.print(f"  after - before (paired)  {gain['points']:+.1f} points [{gain['ci95_points'][0]:+.1f}, "
                      f"{gain['ci95_points'][1]:+.1f}], McNemar p={gain['mcnemar_p']:.3g}")
    _print_honesty(console, (metrics.get("before") or {}).get("check_honesty"), metrics.get("check_honesty"))
    for key in ("reward_first5", "reward_mean_last5", "accuracy_first5", "accuracy_last5", "kl_last5",
                "accuracy_thinking_on", "accuracy_thinking_off", "sec_per_step_mean"):
        value = metrics.get(key)
        console.print(f"  {key:24s} {value:.4g}" if isinstance(value, (int, float)) else f"  {key:24s} -")


def _print_honesty(console, before: dict | None, after: dict | None) -> None:
    """Check honesty of the held-out thoughts, before and after: do the checks check?"""
    def show(h):
        if not h or h["honesty_rate"] is None:
            return "no judged check"
        return f"{h['honesty_rate']:.2f} of {h['n_checks']} checks"
    if after:
        console.print(f"  check honesty            {show(before) + ' -> ' if before else ''}{show(after)}")


def _token_mode(model, out, data, given: dict, config, eval_data, device, tracker, progress, resume) -> dict:
    """Token-level Quiet-STaR (parallel thoughts after every position, mixing head), evaluated on
    held-out questions before and after."""
    from agent_forge.config import load_yaml
    from agent_forge.quietstar.token_rl import run_token_rl

    if not data:
        raise ValueError("--mode token needs --data (records JSONL or plain text to think over)")
    overrides = {**(load_yaml(config) if config else {}), **given}
    return run_token_rl(model, out, data, overrides, tracker=tracker, progress=progress, resume=resume,
                        eval_data=eval_data, device=device)


def _print_token(result: dict) -> None:
    """Token mode's training metrics and its held-out evaluation, as lines."""
    console = Console()
    console.print(f"[green]Step 2 (token) done[/]: model in {result['model_dir']}")
    m = result["metrics"]
    for key in ("steps", "first_reward_rolling", "reward_rolling", "kl", "mix_weight_mean", "frac_thought",
                "thought_diversity", "sec_per_step"):
        value = m.get(key)
        console.print(f"  {key:24s} {value:.4g}" if isinstance(value, (int, float)) else f"  {key:24s} -")
    h = result.get("held_out")
    if not h:
        return
    console.print(f"held-out {result['eval_data']} (n={h['n']}, thinking on):")
    for label, key in (("before", "before"), ("after", "after"), ("after, thoughts off", "after_no_thoughts")):
        r = h[key]
        console.print(f"  {label:20s} {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
                      f"  silent thoughts {r['thought_positions']}, {r['ms_per_example']:.0f} ms/example")
    for label, key in (("after - before", "gain_vs_before"), ("thoughts on - off", "gain_vs_no_thoughts")):
        g = h[key]
        console.print(f"  {label:20s} {g['points']:+.1f} points [{g['ci95_points'][0]:+.1f}, "
                      f"{g['ci95_points'][1]:+.1f}], McNemar p={g['mcnemar_p']:.3g}")


def _printer():
    console = Console()

    def show(step: int, total: int, row: dict) -> None:
        keys = ("reward_mean", "accuracy", "kl", "thought_length", "inference_seconds", "sec_per_step")
        console.print(f"step {step}/{total} " + " ".join(
            f"{k} {row[k]:.3g}" for k in keys if isinstance(row.get(k), (int, float))))
    return show
