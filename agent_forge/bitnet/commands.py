"""`forge bitnet`: the Phase 4 command, and the summary it prints from the run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from agent_forge.figures import ci_text, met, met_within, pct
from agent_forge.progress import print_rows
from agent_forge.stages import resumed_note


def bitnet_cmd(model: str = typer.Option(..., help="Phase 3 output dir (or any HF causal LM: hub id, dir, default)"),
               out: Path = typer.Option(..., help="output directory (model/, bitnet_report.json, ...)"),
               preset: str = typer.Option("quick", help="smoke (seconds), quick (<= 10 min CPU), standard (GPU)"),
               config: Optional[Path] = typer.Option(None, help="YAML overriding BitNetConfig fields"),
               eval_samples: Optional[int] = typer.Option(None, help="test questions (before/after, anti-theater)"),
               device: Optional[str] = typer.Option(None),
               tracking: Optional[str] = typer.Option(None, help="W&B mode: offline, disabled, online"),
               force: bool = typer.Option(False, help="compress even if the Phase 3 -> 4 handoff fails"),
               resume: bool = typer.Option(False, help="continue a killed run in --out")):
    """Phase 4: ternary (1.58-bit) weights by quantisation-aware distillation, measured."""
    from agent_forge.bitnet.phase import BitNetPhaseError, make_config, run_bitnet
    from agent_forge.cli import fail, run_phase_command

    try:
        cfg = make_config(preset, config, model=model, out=str(out), eval_samples=eval_samples, device=device,
                          tracking=tracking, force=force or None)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    run_phase_command(run_bitnet, cfg, resume, BitNetPhaseError, print_summary)


def _pct(x) -> str:
    return pct(x, missing="n/a")


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(what, measured) rows for the terminal and the README; every target says met or MISSED,
    or why it cannot be judged."""
    st = report["stages"]
    inp, before, after, save, speed = (st.get(k, {}) for k in ("validate_input", "before", "after", "save", "speed"))
    rows = [("input", f"{report['model']}" + (" (FORCED past a failed 3->4 handoff)" if inp.get("forced") else ""))]
    if after:
        ch, target = after["change"], report.get("config", {}).get("max_relative_drop", 0.10)
        how = "thinking on" if _thinks(after) else "answering directly (no thinking tokens)"
        rows += [(f"test accuracy, {how}: before", _pct(before["accuracy_on"]) + ci_text(before["ci95_on"])
                  + f" (n={before['n']}" + ("; Phase 3's own greedy pass" if before.get("replayed") else "") + ")"),
                 (f"test accuracy, {how}: ternary", _pct(after["accuracy_on"]) + ci_text(after["ci95_on"])
                  + _rounding_note(report)),
                 ("change (paired)", f"{ch['points']:+.1f} points [{ch['ci95_points'][0]:+.1f}, "
                                     f"{ch['ci95_points'][1]:+.1f}], McNemar p={ch['mcnemar_p']:.2g}"),
                 (f"relative drop (target < {100 * target:g}%)", _drop_text(after, target)),
                 ("anti-theater on the ternary model", after["anti_theater"]["sentence"])]
        if _thinks(after):
            rows[-1:-1] = [("ternary, thinking off", _pct(after["accuracy_off"]) + ci_text(after["ci95_off"])),
                           ("ternary thinking closes / well-formed", _pct(after["closed_rate"]) + " / "
                            + _pct(after.get("well_formed_rate")))]
    cost = st.get("store_cost") or {}
    if cost.get("measured"):
        ch = cost["change"]
        rows.append((f"input model with its kept matrices in {cost['store_dtype']}",
                     f"{_pct(cost['accuracy_on'])}{ci_text(cost['ci95_on'])}: {ch['points']:+.1f} points "
                     f"[{ch['ci95_points'][0]:+.1f}, {ch['ci95_points'][1]:+.1f}] vs before, McNemar "
                     f"p={ch['mcnemar_p']:.2g} (the storage's own cost, inside the change above)"))
    if save:
        s = save["sizes"]
        rows += [("size on disk", f"{_mb(s['total'])} (packed linears {_mb(s['packed_linears'])}, embeddings "
                                  f"{_mb(s['embeddings'])}, head {_mb(s['head'])}, norms {_mb(s['norms'])})"),
                 (f"compression vs fp32 (target {save['ratio_target_vs_fp32']:.0f}x, {save['size_category']})",
                  f"{save['ratio_vs_fp32']:.2f}x: {met(save['ratio_vs_fp32'] >= save['ratio_target_vs_fp32'])}"),
                 ("compression vs bf16", f"{save['ratio_vs_bf16']:.2f}x"),
                 ("sparsity (target > 30%)", f"{_pct(save['sparsity']['overall'])}: {met(save['sparsity_target_met'])}"),
                 ("reload with plain transformers", _reload_text(save["reload"], _thinks(after)))]
    for r in speed.get("rows", []):
        rows.append((f"decode tok/s: {r['name']}", f"{r['tokens_per_s']:.1f} ({r['ratio']:.2f}x fp32)"))
    if speed:
        rows.append(("ternary >= 2x fp32 PyTorch", f"best {speed['best_ternary_ratio']:.2f}x: "
                                                  f"{met(speed['speed_target_met'])}"))
        if "ternary_vs_q8_0" in speed:
            rows.append(("llama.cpp ternary ahead of llama.cpp Q8_0", f"{speed['ternary_vs_q8_0']:.2f}x: "
                                                                     f"{met(speed['ahead_of_q8_0'])}"))
        if speed.get("not_measured") not in (None, "nothing"):
            rows.append(("not measured", speed["not_measured"]))
    rows += _gguf_rows(speed, save) + _agreement_rows(st.get("agreement"), _thinks(after)) + _curve_rows(st.get("qat", {}).get("curve"))
    hand = st.get("handoff")
    if hand:
        rows.append(("Phase 4 handoff", "passed" if hand["ok"] else "FAILED: " + ", ".join(
            c["name"] for c in hand["checks"] if not c["ok"] and c["severity"] == "error")))
    rows.append(("time", f"{report['total_seconds']:.0f} s{resumed_note(st)}"))
    return rows


def _drop_text(after: dict, target: float) -> str:
    """The relative drop with its paired bootstrap interval (runs before it had none: no interval)."""
    if after["relative_drop"] is None:
        return "n/a: nothing was right before, so there is no drop to measure"
    ci = after.get("relative_drop_ci95")
    return f"{_pct(after['relative_drop'])}{ci_text(ci)}: {met_within(after['drop_target_met'], ci, target)}"


def _rounding_note(report: dict) -> str:
    """Which activation rounding the ternary model ran with, when it is not the paper's per token."""
    method = report.get("config", {}).get("act_quant", "token")
    return "" if method == "token" else " (activations rounded in llama.cpp's blocks: the GGUF's arithmetic)"


def _thinks(after: dict) -> bool:
    """Whether the model has thinking tokens, as its after stage recorded (reports written before
    that field: it measured thinking off). No after stage yet: assume so."""
    return not after or after.get("thinking", after.get("accuracy_off") is not None)


def _reload_text(reload: dict, thinks: bool = True) -> str:
    """The reload row: the logit check, then the reloaded model's answers to a few test questions
    (a run saved before those probes existed says only whether one probe's thinking closed)."""
    text = f"max |logit diff| {reload['max_abs_logit_diff']:.2e}"
    if reload.get("rounding_logit_diff", 0.0) > reload["max_abs_logit_diff"]:
        text += f" (activations per token, as the file runs; {reload['rounding_logit_diff']:.2e} from the trained rounding)"
    if "probes" not in reload:
        return text + f", thinking closed: {reload['closed_thinking']}"
    same = f"same answer as ours {_pct(reload['same_answer_rate'])}"
    if "same_text_rate" in reload:  # ours in the same batch (earlier runs: the after stage's)
        same += f" (same text {_pct(reload['same_text_rate'])})"
    thinking = (f", thinking closes / well-formed {_pct(reload['closed_rate'])} / {_pct(reload['well_formed_rate'])}"
                if thinks else "")
    return text + f"; on {reload['probes']} test questions, one batch: {same}, correct {_pct(reload['accuracy_on'])}{thinking}"


def _gguf_rows(speed: dict, save: dict) -> list[tuple[str, str]]:
    """The ternary GGUF's size beside the HF directory's: llama.cpp's file stores rows that do
    not fill 256-weight TQ blocks as 4-bit codes, so its ratio is its own."""
    from agent_forge.llamacpp_engine import TERNARY_ROW

    f = (speed.get("llamacpp") or {}).get("files", {}).get(TERNARY_ROW)
    if not f or not save:
        return []
    fp32 = save["fp32_bytes"]
    share = f.get("ternary_share")
    kinds = "" if share is None else f", {_pct(share)} of linear weights {f['weight_type'].upper()}, the rest Q4_0 codes"
    return [("ternary GGUF on disk (llama.cpp)", f"{_mb(f['bytes'])} ({fp32 / f['bytes']:.2f}x fp32{kinds})")]


def _agreement_rows(agree: dict | None, thinks: bool = True) -> list[tuple[str, str]]:
    """The agreement row when it was measured; when not, the speed stage's "not measured" row
    already says why the llama.cpp rows are missing (the reason is in the report too)."""
    if not agree or not agree["measured"]:
        return []
    return [(f"llama.cpp GGUF gives the ternary model's answer (target >= {100 * agree['target']:.0f}%)",
             f"{_pct(agree['agreement'])}{ci_text(agree['ci95'])} of {agree['n']}: "
             f"{met_within(agree['target_met'], agree['ci95'], agree['target'])}; "
             f"GGUF accuracy {_pct(agree['gguf_accuracy_on'])}" + (
                 f", thinking closes {_pct(agree['gguf_closed_rate'])} (well-formed "
                 f"{_pct(agree.get('gguf_well_formed_rate'))})" if thinks else ""))]


def _curve_rows(curve: list[dict] | None) -> list[tuple[str, str]]:
    """QAT's validation accuracy as fine-tuning tokens grow (qat.eval_every > 0)."""
    if not curve:
        return []
    points = "; ".join(f"{p['tokens'] / 1000:.0f}k tokens (step {p['step']}, lambda {p['strength']:.2f}): "
                       f"{_pct(p['val_accuracy_on'])}{ci_text(p['val_ci95_on'])}" for p in curve)
    return [(f"QAT curve: validation accuracy, thinking on (n={curve[0]['val_n']})", points)]


def print_summary(console: Console, report: dict) -> None:
    print_rows(console, f"forge bitnet: {report['out']}", summary_rows(report))
