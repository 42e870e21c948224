"""Validation of what enters the pipeline: datasets (pandera) and params.yaml (pydantic)."""
