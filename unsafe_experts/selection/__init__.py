"""Choosing the experts a round repairs: the method table, gradient scores, routing scores."""
