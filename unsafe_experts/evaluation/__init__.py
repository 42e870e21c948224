"""Measuring a model: suites (the organism's eval set is one), judges, their prompts, lm-eval utility."""
