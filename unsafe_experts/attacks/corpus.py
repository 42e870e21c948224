"""The tiny test models' tokenizer corpus (system prompts, refusal, goals and their FlipAttack
prompts), and a tiny model saved with a tokenizer trained on it (the CLI's `tiny-model`).

Here rather than in models/tiny.py: the corpus is made of attack prompts, and models must not
import attacks or text (the package order runs models < text < attacks).
"""
from __future__ import annotations

from pathlib import Path

from ..models.tiny import tiny_model
from ..text.examples import DEFAULT_REFUSAL, SAFE_SYSTEM_PROMPT
from ..text.tiny_tokenizer import build_tokenizer
from .flip import MODES, SYSTEM_PROMPT, flip_prompt


def tokenizer_corpus(goals: list[str], extra: list[str] = ()) -> list[str]:
    texts = [SYSTEM_PROMPT, SAFE_SYSTEM_PROMPT, DEFAULT_REFUSAL, *extra]
    for goal in goals:
        texts.append(goal)
        texts.extend(m["content"] for mode in MODES for m in flip_prompt(goal, mode)[1:])
    return texts


def save_tiny(architecture: str, out: str | Path, goals: list[str], seed: int = 0, **overrides) -> Path:
    out = Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus(goals))
    model = tiny_model(architecture, tokenizer, seed, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
