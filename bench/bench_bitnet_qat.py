"""BitNet QAT: what the learning rate, the weight scale and the steps buy, on held-out traces.

For each learning rate, weight scale (absmean, mse: bitnet/quantize.py) and starting point
(nearest rounding, or GPTQ's error-compensating rounding: bitnet/gptq.py), a fresh ternary student of `--model` is fine-tuned with `forge
bitnet`'s own QAT (lambda warm-in, distillation from the model itself) for `--steps` steps;
then, at full strength, it is measured on traces it never trained on (the distillation KL to
the teacher and the next-token loss) and, with `--eval N`, on N validation questions with
thinking on. The same held-out figures are taken once before training too, at full strength
(what the conversion alone leaves). Prints a table, writes bench/results/bitnet_qat.json.

    python bench/bench_bitnet_qat.py --model runs/demo/quietstar/model --lrs 2e-4,1e-3,3e-3 --steps 40
    python bench/bench_bitnet_qat.py --model runs/demo/quietstar/model --lrs 1e-3 --scales absmean,mse --steps 16
    python bench/bench_bitnet_qat.py --model runs/demo/quietstar/model --lrs 1e-3 --inits nearest,gptq --steps 16 --eval 40
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import save_result

from agent_forge.bitnet.bitlinear import calibrate_act_norms
from agent_forge.bitnet.convert import convert_to_bitnet, set_strength
from agent_forge.bitnet.gptq import gptq_initialise
from agent_forge.bitnet.phase import first_batches
from agent_forge.bitnet.qat import QATConfig, QATTrainer, distill_loss
from agent_forge.models import load_model
from agent_forge.quietstar.bake_data import collate, encode_records, shifted
from agent_forge.quietstar.pipeline import DataConfig

RESULTS = Path(__file__).parent / "results" / "bitnet_qat.json"


@torch.no_grad()
def held_out(student, teacher, examples, pad: int, cfg: QATConfig, batch: int = 8) -> dict:
    """Mean distillation KL and next-token loss of the fully ternary student on `examples`."""
    set_strength(student, 1.0)
    student.eval()
    kd = lm = 0.0
    chunks = [examples[i:i + batch] for i in range(0, len(examples), batch)]
    for chunk in chunks:
        b = collate(chunk, pad)
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels, _ = shifted(b)
        _, parts = distill_loss(s, t, labels, 1.0, 1.0, cfg.kl_top_k)
        kd, lm = kd + parts["kd"], lm + parts["lm"]
    return {"kd": kd / len(chunks), "lm": lm / len(chunks)}


def accuracy(model, tok, n: int) -> dict:
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.evaluation.runner import evaluate
    from agent_forge.inference import GENERATION_BATCH

    r = evaluate(model, tok, load_eval_set("easy_arithmetic_val", limit=n), thinking="on", max_new_tokens=128,
                 batch_size=GENERATION_BATCH, loglik=False, progress=False)
    closed = sum(bool(x["closed"]) for x in r.per_example) / max(1, r.n)
    return {"accuracy_on": r.accuracy, "ci95_on": r.ci95, "n": r.n, "closed_on": closed}


def run_one(teacher, tok, train, test, lr: float, scale: str, init: str, hidden: float, args) -> dict:
    cfg = QATConfig(steps=args.steps, batch_size=8, lr=lr, warmup_steps=max(1, args.steps // 10),
                    strength_warmup=args.steps // 2 if init == "nearest" else 0, save_every=10_000, seed=args.seed,
                    hidden_weight=hidden)
    student = copy.deepcopy(teacher).requires_grad_(True)
    convert_to_bitnet(student, act_norm=args.act_norm, scale_method=scale)  # as `forge bitnet` converts, then calibrates
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    calibrate_act_norms(student, first_batches(train, 8, 4, pad))
    t0 = time.time()
    if init == "gptq":  # GPTQ's codes from the start, so no lambda warm-in
        gptq_initialise(student, first_batches(train, 8, args.gptq_batches, pad))
    init_seconds = time.time() - t0
    start = held_out(student, teacher, test, pad, cfg)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        result = QATTrainer(student, teacher, tok, cfg, d).run(train)
    row = {"lr": lr, "scale": scale, "init": init, "hidden_weight": hidden, "init_seconds": init_seconds, "kd_start": start["kd"], "lm_start": start["lm"], "steps": args.steps, "tokens": result["tokens_seen"], "seconds": time.time() - t0,
           "train_last": result["last"], **held_out(student, teacher, test, pad, cfg)}
    if args.eval:
        row.update(accuracy(student, tok, args.eval))
    return row


def main(argv: list[str] | None = None) -> None:
    from agent_forge.data.general import build_mixture
    from agent_forge.data.overlap import asked_by, eval_sets_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Phase 3 model directory (or any causal LM)")
    p.add_argument("--lrs", default="2e-4,1e-3", help="comma-separated peak learning rates")
    p.add_argument("--scales", default="absmean", help="comma-separated weight scales (absmean, mse)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="QAT's seed (the order of its batches)")
    p.add_argument("--held-out", type=int, default=48, help="traces kept out of training and measured")
    p.add_argument("--eval", type=int, default=0, help="validation questions answered with thinking (0: skip)")
    p.add_argument("--act-norm", default="shared", help="shared (the phase default), per_linear or none")
    p.add_argument("--inits", default="nearest", help="comma-separated starting points: nearest (rounding, then "
                                                      "a lambda warm-in over half the steps), gptq (bitnet/gptq.py, "
                                                      "ternary from step 0)")
    p.add_argument("--hidden-weights", default="0", help="comma-separated qat.hidden_weight values (the layer-output "
                                                           "distillation term; 0: off)")
    p.add_argument("--gptq-batches", type=int, default=8, help="calibration batches of 8 traces for gptq")
    p.add_argument("--records", type=int, default=1200, help="procedural traces built (training + held out)")
    args = p.parse_args(argv)
    teacher, tok = load_model(args.model)
    teacher.eval().requires_grad_(False)
    records, _ = build_mixture(DataConfig(n_records=args.records, seed=7),
                               exclude=asked_by(eval_sets_for("easy_arithmetic", "easy_arithmetic_val")))
    examples, _ = encode_records(records, tok, max_len=256)
    train, test = examples[:-args.held_out], examples[-args.held_out:]
    rows = [run_one(teacher, tok, train, test, float(lr), scale, init, float(hidden), args)
            for lr in args.lrs.split(",") for scale in args.scales.split(",") for init in args.inits.split(",")
            for hidden in args.hidden_weights.split(",")]
    print(f"{'lr':>8} {'scale':>8} {'init':>8} {'hidden':>6} {'steps':>6} {'KL at start':>12} {'held-out KL':>12} "
          f"{'held-out LM':>12} {'accuracy':>16} {'closed':>7} {'s':>7}")
    for r in rows:
        acc = f"{100 * r['accuracy_on']:.1f}% (n={r['n']})" if "accuracy_on" in r else "-"
        closed = f"{100 * r['closed_on']:.0f}%" if "closed_on" in r else "-"
        print(f"{r['lr']:>8.0e} {r['scale']:>8} {r['init']:>8} {r['hidden_weight']:>6g} {r['steps']:>6} "
              f"{r['kd_start']:>12.3f} {r['kd']:>12.3f} {r['lm']:>12.3f} {acc:>16} {closed:>7} {r['seconds']:>7.0f}")
    rec = {"model": args.model, "act_norm": args.act_norm, "seed": args.seed, "rows": rows, "threads": torch.get_num_threads()}
    key = f"{Path(args.model).name}_{args.steps}_steps_seed{args.seed}"  # one entry per model, length, seed
    key += "" if args.inits == "nearest" else f"_inits_{args.inits.replace(',', '_')}"  # (and starting points)
    key += "" if args.hidden_weights == "0" else f"_hidden_{args.hidden_weights.replace(',', '_')}"  # (and terms)
    save_result(rec, RESULTS, key)


if __name__ == "__main__":
    main()
