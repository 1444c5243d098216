"""Phase 1, Cognate: small TRM x Titans-MAG models trained from scratch (model.py, config.py,
memory.py, recursion.py are the standalone model; the rest is the phase).

`register_auto_classes()` (called when agent_forge.models, the loader every command uses, is imported) makes AutoConfig /
AutoModelForCausalLM know model_type "cognate", and marks the classes so save_pretrained
copies their source files into the model directory with an `auto_map`.
"""

from __future__ import annotations


def register_auto_classes() -> None:
    """Register Cognate with the transformers Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from agent_forge.cognate.config import CognateConfig
    from agent_forge.cognate.model import CognateForCausalLM

    AutoConfig.register(CognateConfig.model_type, CognateConfig, exist_ok=True)
    AutoModelForCausalLM.register(CognateConfig, CognateForCausalLM, exist_ok=True)
    CognateConfig.register_for_auto_class()
    CognateForCausalLM.register_for_auto_class("AutoModelForCausalLM")
