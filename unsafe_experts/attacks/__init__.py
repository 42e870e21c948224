"""Jailbreak attack families, attacking a model to make surgery records, and the demo organism built from them."""
