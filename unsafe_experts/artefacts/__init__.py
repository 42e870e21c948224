"""What a run writes: atomic files and checkpoints, deltas, run metadata, the result cache, the model card."""
