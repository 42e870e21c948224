"""Re-attacking a model: router masks and steering, prefilled answers, optimised suffixes,
and durability under fine-tuning, top-k changes and quantisation."""
