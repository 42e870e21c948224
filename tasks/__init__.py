"""Prefect tasks: thin wrappers over the engine that take and return paths and small dicts."""
