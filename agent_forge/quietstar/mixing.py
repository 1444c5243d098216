"""The mixing head: how much of the post-thought hidden state to use for the next token.

    w     = tanh(MLP([h_base ; h_thought]))          one scalar per prediction
    mixed = h_base + w * (h_thought - h_base)        then the model's own LM head

The MLP's last layer starts at zero, so w = tanh(0) = 0 exactly and `mixed` is `h_base`
bit for bit: training starts from the unchanged base model. We use tanh rather than a
sigmoid because any smooth w >= 0 with w(0) = 0 has zero slope at 0, and a zero-initialised
head would then never receive a gradient; tanh lets w leave 0 in the first step. w is
bounded to (-1, 1); w in (0, 1) is the interpolation of the paper, w < 0 leans away from a
thought. Its weights travel as a small safetensors file next to the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from agent_forge.quietstar.thoughts import lm_logits


class MixingHead(nn.Module):
    """Two-layer MLP over [h_base ; h_thought] -> mixing weight w, zero at initialisation."""

    def __init__(self, hidden_size: int, inner_size: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.inner_size = inner_size or hidden_size
        self.net = nn.Sequential(
            nn.Linear(2 * hidden_size, self.inner_size),
            nn.ReLU(),
            nn.Linear(self.inner_size, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def weight(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        """w (..., 1) in (-1, 1), computed in the head's dtype and returned in h_base's."""
        dtype = self.net[0].weight.dtype
        z = self.net(torch.cat([h_base, h_thought], dim=-1).to(dtype))
        return torch.tanh(z).to(h_base.dtype)

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        """The mixed hidden state; equals h_base exactly while w == 0."""
        return h_base + self.weight(h_base, h_thought) * (h_thought - h_base)


def mixed_logits(model, head: MixingHead, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
    """Logits of the mixed hidden state through the model's own LM head."""
    return lm_logits(model, head(h_base, h_thought))


def save_head(head: MixingHead, path: str | Path) -> Path:
    """Write the head's weights (safetensors, sizes in the metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"hidden_size": str(head.hidden_size), "inner_size": str(head.inner_size),
            "format": json.dumps({"kind": "agent_forge.mixing_head", "version": 1})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_head(path: str | Path, device: str | torch.device = "cpu") -> MixingHead:
    """Rebuild a head saved by `save_head`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "hidden_size" not in meta:
        raise ValueError(f"{path} is not a mixing-head file (no hidden_size in its metadata)")
    head = MixingHead(int(meta["hidden_size"]), int(meta["inner_size"]))
    state = load_file(str(path), device=str(device))
    head.load_state_dict(state)
    return head.to(device=device, dtype=next(iter(state.values())).dtype)
