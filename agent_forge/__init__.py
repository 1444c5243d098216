"""Agent Forge: teach language models to think before they speak."""
__version__ = "0.1.0"

from agent_forge.cognate import register_auto_classes as _register_cognate  # noqa: E402

_register_cognate()  # AutoConfig / AutoModelForCausalLM know "cognate" once agent_forge is imported
