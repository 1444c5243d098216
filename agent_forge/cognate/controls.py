"""The controls a reader needs to judge a Cognate run (stages run when `controls` is on).

- control_independent: a second trunk, the same recipe from another seed. Merging two
  specialisations of one trunk should beat merging two independently initialised trunks,
  whose neurons are not aligned: that is why the three share a trunk.
- control_transformer: a plain Llama-style transformer with as many parameters (the MLP
  width is chosen to match Cognate's non-embedding parameters) trained with the same
  optimiser on the same token budget as one specialisation's whole path (foundation, then
  reasoning and advanced blocks). If it matches Cognate's validation loss, the memory and
  the recursion did not help at this scale.
"""

from __future__ import annotations

import torch


def matched_transformer_config(cognate_config):
    """A LlamaConfig with Cognate's width, depth, heads and vocabulary, and an MLP width that
    gives (about) Cognate's parameter count outside the embeddings."""
    from transformers import LlamaConfig

    from agent_forge.cognate.model import CognateForCausalLM

    with torch.device("meta"):
        cognate = CognateForCausalLM(cognate_config)
    non_embedding = sum(p.numel() for n, p in cognate.named_parameters() if "embed_tokens" not in n)
    h, layers = cognate_config.hidden_size, cognate_config.num_hidden_layers
    per_layer = non_embedding / layers - 4 * h * h - 2 * h  # attention and norms
    mlp = max(8, round(per_layer / (3 * h)))
    return LlamaConfig(vocab_size=cognate_config.vocab_size, hidden_size=h, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=cognate_config.num_attention_heads,
                       num_key_value_heads=cognate_config.num_attention_heads, tie_word_embeddings=True,
                       max_position_embeddings=cognate_config.max_position_embeddings,
                       eos_token_id=cognate_config.eos_token_id, pad_token_id=cognate_config.pad_token_id,
                       bos_token_id=cognate_config.bos_token_id)


def stage_control_independent(ctx) -> dict:
    """The foundation recipe from seed + 1000: a trunk no specialisation shares."""
    from agent_forge.cognate.model import CognateForCausalLM
    from agent_forge.cognate.phase import _train_and_save, device, load_stage, model_config, train_config

    cfg = ctx.cfg
    train = train_config(ctx, seed=cfg.train.seed + 1000)
    torch.manual_seed(train.seed)
    model = CognateForCausalLM(model_config(ctx, cfg.foundation)).to(device(ctx))
    pools = [load_stage(ctx.out / "data", "foundation")["train"]]
    return _train_and_save(ctx, model, pools, cfg.train.foundation_steps, train, ctx.out / "control" / "independent",
                           "cognate_control_independent", {"role": "control", "control": "independent trunk"})


def stage_control_transformer(ctx) -> dict:
    """A same-size plain transformer on one specialisation's token budget and curriculum."""
    from transformers import LlamaForCausalLM

    from agent_forge.cognate.phase import _train_and_save, device, load_stage, model_config, train_config
    from agent_forge.models import measure_model

    cfg = ctx.cfg
    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(matched_transformer_config(model_config(ctx, cfg.foundation))).to(device(ctx))
    pools = [load_stage(ctx.out / "data", s)["train"] for s in ("foundation", "reasoning", "advanced")]
    steps = cfg.train.foundation_steps + cfg.train.specialise_steps
    result = _train_and_save(ctx, model, pools, steps, train_config(ctx), ctx.out / "control" / "transformer",
                             "cognate_control_transformer", {"role": "control", "control": "plain transformer"})
    return {**result, "n_params": measure_model(model).n_params}


@torch.no_grad()
def plain_block_losses(model, blocks: torch.Tensor, batch_size: int) -> list[float]:
    """Mean next-token cross-entropy of any causal LM on each of the blocks."""
    from agent_forge.cognate.metrics import block_losses

    model.eval()
    device = next(model.parameters()).device
    per_block = []
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        per_block += block_losses(model(input_ids=ids).logits, ids).tolist()
    return per_block


def evaluate_controls(ctx, specialists: dict, blocks: torch.Tensor, merge: dict) -> dict:
    """For each control the run trained: the merge of the two independent trunks against
    `merge`, the merge of two specialisations; the plain transformer's validation loss against
    the best of `specialists` (their evaluate_model figures). Both paired over the blocks."""
    from agent_forge.evaluation.metrics import mean_interval

    bs, out = ctx.cfg.eval_batch_size, {}
    if "independent" in ctx.cfg.controls:
        out.update(_independent_merge(ctx, blocks, merge))
    if "transformer" in ctx.cfg.controls:
        from transformers import AutoModelForCausalLM

        from agent_forge.cognate.phase import device

        plain = AutoModelForCausalLM.from_pretrained(ctx.out / "control" / "transformer" / "model").to(device(ctx))
        per_block = plain_block_losses(plain, blocks, bs)
        summary = mean_interval(per_block)
        out.update({"transformer_val_loss": summary["mean"], "transformer_val_loss_ci95": summary["ci95"],
                    "best_minus_transformer": versus_transformer(specialists, per_block)})
    return out


def versus_transformer(specialists: dict, transformer_losses: list[float]) -> dict:
    """The specialisation with the lowest validation loss, and its block losses minus the
    plain transformer's, paired over the same blocks (< 0: the architecture wins)."""
    from agent_forge.evaluation.metrics import paired_difference

    best = min(specialists, key=lambda n: specialists[n]["val_loss"])
    return {"specialisation": best, **paired_difference(specialists[best]["block_losses"], transformer_losses)}


def _independent_merge(ctx, blocks: torch.Tensor, merge: dict) -> dict:
    from agent_forge.cognate.metrics import average_weights, evaluate_model
    from agent_forge.cognate.model import CognateForCausalLM
    from agent_forge.cognate.phase import device
    from agent_forge.evaluation.metrics import clearly_below, paired_difference

    bs, dev = ctx.cfg.eval_batch_size, device(ctx)
    trunk = CognateForCausalLM.from_pretrained(ctx.out / "foundation" / "model").to(dev)
    other = CognateForCausalLM.from_pretrained(ctx.out / "control" / "independent" / "model").to(dev)
    independent, _, _ = evaluate_model(average_weights(trunk, other), blocks, bs)
    other_alone, _, _ = evaluate_model(other, blocks, bs)
    diff = paired_difference(merge["merged_block_losses"], independent["block_losses"])
    return {"independent_trunk_val_loss": other_alone["val_loss"],
            "independent_merge_val_loss": independent["val_loss"],
            "shared_trunk_merge_val_loss": merge["merged_val_loss"],
            "shared_minus_independent": diff,  # paired over the blocks: < 0 favours the shared trunk
            "shared_trunk_merges_better": clearly_below(diff)}
