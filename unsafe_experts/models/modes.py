"""Eval mode for a block of work, and the mode the model had afterwards, even if it raises."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def eval_mode(model):
    """Dropout and router jitter off inside the block (scores and answers are reproducible);
    on exit the model is in the mode it had, also when the block raises. `model` None (a
    server generates) passes through."""
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        yield model
    finally:
        if model is not None:
            model.train(was_training)
