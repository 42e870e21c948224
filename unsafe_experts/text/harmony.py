"""GPT-OSS prompts in the harmony format, rendered here rather than by `openai-harmony`.

`openai-harmony` (the reference renderer) installs beside the pins but cannot render offline:
it loads its o200k vocabulary by downloading it on first use, and neither the hub nor that
host is reachable where this runs. The format is small and written down
(https://cookbook.openai.com/articles/openai-harmony), so it is rendered here as text the
model's own tokenizer then encodes; tests/test_chat_templates.py checks it against the
reference renderer's own expected output (openai/harmony test-data).

What the surgery needs from it:
- the prompt ends with the assistant header of the `final` channel
  (`<|start|>assistant<|channel|>final<|message|>`): the model answers there directly,
  without an `analysis` message first, so training supervises the refusal itself (not a
  chain of thought) and evaluation generates from exactly the prompt training saw;
- a trained response ends with `<|return|>`, the token that ends the final answer (harmony's
  training rendering; an earlier assistant turn ends with `<|end|>`), which is supervised;
- generation stops at the first `<|return|>`, `<|end|>` or `<|call|>` (`STOP`), so the reply
  is the final channel's text and nothing the model might add after it.
The system message is harmony's default (identity, knowledge cutoff, reasoning effort,
channels) without its optional "Current date" line, so a prompt is the same text on every
day a run trains, resumes and evaluates. A system message of a record becomes the developer
message's instructions, as the harmony format and GPT-OSS's chat template both do.
"""
from __future__ import annotations

from ..errors import HarmonyError

START, END, MESSAGE, CHANNEL, RETURN, CALL = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>")
TOKENS = (START, END, MESSAGE, CHANNEL, RETURN, CALL)
STOP = (RETURN, END, CALL)  # each ends what the model says in the final channel
FINAL_HEADER = f"{START}assistant{CHANNEL}final{MESSAGE}"
SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\n\n"
          "Reasoning: medium\n\n"
          "# Valid channels: analysis, commentary, final. Channel must be included for every message.")


def is_harmony(tokenizer) -> bool:
    """A tokenizer that has harmony's structural tokens, each as one token (GPT-OSS's)."""
    cached = getattr(tokenizer, "_unsafe_experts_harmony", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        cached = all(t in vocab for t in TOKENS)
        tokenizer._unsafe_experts_harmony = cached
    return cached


def _message(role: str, content: str, end: str = END) -> str:
    return f"{START}{role}{MESSAGE}{content}{end}"


def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as harmony text. With add_generation_prompt: ending with the final
    channel's header (the prompt). Without: a trailing assistant message ends with <|return|>
    (the trained response); earlier assistant turns (few-shot examples) are final-channel
    messages ending with <|end|>."""
    instructions = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    out = [_message("system", SYSTEM)]
    if instructions:
        out.append(_message("developer", f"# Instructions\n\n{instructions}"))
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            out.append(_message("user", m["content"]))
        elif m["role"] == "assistant":
            last = i == len(turns) - 1 and not add_generation_prompt
            out.append(FINAL_HEADER + m["content"] + (RETURN if last else END))
        else:
            raise HarmonyError(f"harmony prompts take system, user and assistant messages, "
                               f"not {m['role']!r}")
    if add_generation_prompt:
        out.append(FINAL_HEADER)
    return "".join(out)

