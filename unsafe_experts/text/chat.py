"""Rendering chat messages with a model's own template, around the traps real templates carry.

- Qwen3 renders the last assistant turn as `<think>\\n\\n</think>\\n\\n` + content unless asked
  with `enable_thinking=False`, which moves the empty think block into the generation prompt.
  Training, routing and evaluation all render with it off, so the surgery supervises the
  refusal and not "stop thinking", and generation starts where training did.
- Mixtral-8x7B-Instruct-v0.1 (and Mistral v0.1/v0.2) have no system role and raise on one:
  the system message is folded into the first user turn, as those models' users do.
- Tulu (OLMoE-0125-Instruct) closes the assistant turn with eos inside it: the response is
  the content plus eos, which is what should be supervised.
- GPT-OSS speaks the harmony format: a tokenizer with harmony's tokens is rendered by
  harmony.py, the prompt ending in the `final` channel's header and the response in
  `<|return|>`; generation stops at harmony's end tokens (`end_token_ids`).
Every other template is used as it is.
"""
from __future__ import annotations

from jinja2 import TemplateError

from . import harmony

Messages = list[dict[str, str]]


def template_kwargs(tokenizer) -> dict:
    template = tokenizer.chat_template or ""
    return {"enable_thinking": False} if "enable_thinking" in template else {}


def _takes_system(tokenizer) -> bool:
    """Whether the template renders a system message (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_unsafe_experts_takes_system", None)
    if cached is None:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True,
                                          **template_kwargs(tokenizer))
            cached = True
        except TemplateError:
            cached = False
        tokenizer._unsafe_experts_takes_system = cached
    return cached


def fold_system(messages: Messages) -> Messages:
    """The system text joins the first user turn (for templates without a system role)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        first_user = next((m for m in rest if m["role"] == "user"), None)
        if first_user is None:
            rest.insert(0, {"role": "user", "content": system})
        else:
            first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    """The template's text for `messages` (the prompt when add_generation_prompt)."""
    if harmony.is_harmony(tokenizer):
        return harmony.render(messages, add_generation_prompt)
    if any(m["role"] == "system" for m in messages) and not _takes_system(tokenizer):
        messages = fold_system(messages)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False, **template_kwargs(tokenizer))


def end_token_ids(tokenizer) -> list[int]:
    """The tokens that end a reply: eos, or harmony's end tokens (GPT-OSS's eos is one of
    them, but a reply may also end in <|end|> or <|call|>)."""
    if harmony.is_harmony(tokenizer):
        return tokenizer.convert_tokens_to_ids(list(harmony.STOP))
    return [tokenizer.eos_token_id]
