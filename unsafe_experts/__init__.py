"""Unsafe-expert surgery for Mixture-of-Experts LLMs: the model engine (torch + transformers)."""
__version__ = "0.1.0"
