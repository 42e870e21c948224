"""Changing the chosen weights: masked SFT, the sparse optimizer, router alignment, retention data."""
