"""Prefect flows that chain the tasks into pipeline runs."""
