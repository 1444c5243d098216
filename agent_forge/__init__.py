"""Agent Forge: teach language models to think before they speak."""
__version__ = "0.1.0"
