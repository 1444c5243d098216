"""How often llama.cpp gives PyTorch's answer: the float baseline for BitNet's agreement target.

`forge bitnet` measures how often its ternary GGUF answers a test question as the PyTorch
ternary model does (target 90%). Two correct engines of the same weights still differ in
rounding (llama.cpp quantises activations per block of 32 or 256 values, our BitLinear per
token; F16 rounds weights and activations), and a greedy generation of 100+ tokens can turn
on one flipped token. This script measures that for the float *input* model: fp32 PyTorch
against llama.cpp's F16 and Q8_0 GGUFs of it (weights rounded to 16 bits, or to 8-bit blocks),
on the same test questions as the run, thinking on, greedy, the same budget, scored with the
phase's own answer_agreement. It prints those rows beside the run's ternary figure and
writes bench/results/gguf_agreement.json.

With --ternary it also tests the explanation for the ternary gap: the saved ternary model
(plain transformers, whose logits equal ours) answers again with its activations rounded as
llama.cpp rounds them (8 bits per block of 32 values, fp16 block scale, for the Q4_0-coded
linears; per block of 256 for the TQ2_0 ones) instead of per token, and is compared with
llama.cpp's TQ2_0 GGUF; the run's own per-token answers are compared with the same llama.cpp
pass, which must reproduce the run's agreement.

    python bench/bench_gguf_agreement.py --run runs/bitnet_hour [--ternary]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import save_result

from agent_forge.bitnet.export import eager, load_plain
from agent_forge.bitnet.phase import REPORT_FILE, STATE_FILE, answer_agreement, thinking_mode
from agent_forge.bitnet.quantize import act_llamacpp
from agent_forge.data.evalsets import load_eval_set
from agent_forge.evaluation.runner import score
from agent_forge.inference import GENERATION_BATCH, generate_answers
from agent_forge.llamacpp_engine import LlamaCppModel
from agent_forge.models import load_model

RESULTS = Path(__file__).parent / "results" / "gguf_agreement.json"
GGUFS = {"F16": "input-f16.gguf", "Q8_0": "input-q8_0.gguf"}


def answer_rows(items, gens) -> list[dict]:
    """Generations as the rows answer_agreement reads for 'our' model."""
    return [{"id": it.id, "on": g.answer_text, "closed_on": g.closed} for it, g in zip(items, gens, strict=True)]


def ternary_rows(run: Path, stages: dict, items, tok, gen: dict, act_quant: str = "token") -> dict:
    """The run's answers (its BitLinear rounding activations as the run trained: `act_quant`)
    and the saved model with llama.cpp's activation blocks, each against one llama.cpp pass
    over the ternary GGUF."""
    import transformers.integrations.bitnet as hf_bitnet

    gguf = generate_answers(LlamaCppModel(run / "gguf" / "ternary-tq2_0.gguf"), tok, [it.question for it in items],
                            batch_size=1, **gen)
    rounding = "llama.cpp-block" if act_quant == "llamacpp" else "per-token"
    rows = {f"llama.cpp TQ2_0 vs PyTorch BitLinear, {rounding} activations (the run's answers)":
            answer_agreement(items, stages["after"]["answers_on"], gguf)}
    original = hf_bitnet.BitLinear.activation_quant
    hf_bitnet.BitLinear.activation_quant = lambda self, x, num_bits=8: act_llamacpp(x)
    try:
        with eager():
            blocks = generate_answers(load_plain(run / "model"), tok, [it.question for it in items],
                                      batch_size=GENERATION_BATCH, **gen)
    finally:
        hf_bitnet.BitLinear.activation_quant = original
    rows["llama.cpp TQ2_0 vs PyTorch ternary, llama.cpp's activation blocks"] = {
        **answer_agreement(items, answer_rows(items, blocks), gguf),
        "pytorch_accuracy_on": sum(score(it, g.answer_text if g.closed else None)[0]
                                   for it, g in zip(items, blocks)) / len(items),
        "pytorch_closed_rate": sum(g.closed for g in blocks) / len(items)}
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a `forge bitnet` output directory (llama.cpp was installed)")
    p.add_argument("--kinds", default="F16,Q8_0", help="comma-separated GGUFs of the input model to compare")
    p.add_argument("--ternary", action="store_true", help="also the ternary model with llama.cpp's activation blocks")
    args = p.parse_args(argv)
    run = Path(args.run)
    report, stages = json.loads((run / REPORT_FILE).read_text()), json.loads((run / STATE_FILE).read_text())["stages"]
    cfg = report["config"]
    items = load_eval_set(stages["validate_input"]["eval_dataset"], limit=cfg["eval_samples"])
    model, tok = load_model(cfg["model"])
    questions = [it.question for it in items]
    gen = dict(thinking=thinking_mode(tok), max_new_tokens=cfg["max_new_tokens"], progress=True)
    kinds, rows = [k for k in args.kinds.split(",") if k], {}
    if kinds:
        t0 = time.time()
        ours = answer_rows(items, generate_answers(model.eval(), tok, questions, batch_size=GENERATION_BATCH, **gen))
        rows["PyTorch fp32 (input model)"] = {"seconds": time.time() - t0}
    for kind in kinds:
        t0 = time.time()
        gens = generate_answers(LlamaCppModel(run / "gguf" / GGUFS[kind]), tok, questions, batch_size=1, **gen)
        rows[f"llama.cpp {kind} (input model) vs PyTorch fp32"] = {
            **answer_agreement(items, ours, gens), "seconds": time.time() - t0}
    rows["llama.cpp TQ2_0 (ternary) vs PyTorch BitLinear (the run's agreement stage)"] = stages["agreement"]
    if args.ternary:
        rows.update(ternary_rows(run, stages, items, tok, gen, cfg.get("act_quant", "token")))
    print(f"{'pair':<78} {'same answer':>12} {'95% CI':>16} {'n':>4}")
    for name, r in rows.items():
        if "agreement" in r:
            lo, hi = r["ci95"]
            print(f"{name:<78} {100 * r['agreement']:>11.1f}% {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>16} {r['n']:>4}")
    rec = {"run": str(run), "model": cfg["model"], "eval_dataset": stages["validate_input"]["eval_dataset"],
           "n": len(items), "max_new_tokens": cfg["max_new_tokens"], "threads": torch.get_num_threads(), "rows": rows}
    save_result(rec, RESULTS, run.name + ("_ternary" if args.ternary else ""))


if __name__ == "__main__":
    main()
