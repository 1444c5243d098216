"""Optimisers: Grokfast filters, MuGrokfast (Muon x Grokfast + AdamW), QK-clip."""

from .grokfast import GrokfastEMA, GrokfastMA
from .mugrokfast import (PRESETS, MuGrokfast, MuGrokfastConfig, build_optimizer, get_config,
                         route_parameters)
from .qk_clip import ATTN_NAME, QKClip, max_logits_per_head

__all__ = ["ATTN_NAME", "PRESETS", "GrokfastEMA", "GrokfastMA", "MuGrokfast",
           "MuGrokfastConfig", "QKClip", "build_optimizer", "get_config",
           "max_logits_per_head", "route_parameters"]
