"""Greedy generation through an OpenAI-compatible server (vLLM, SGLang, TGI, `transformers
serve`) instead of the model in this process; the standard library's urllib, no client package.

Same tokens as the in-process path (generation.py): requests go to /v1/chat/completions with
the chat messages, not to /v1/completions with a prompt rendered here. Those servers render
the messages with the served model's own chat template and tokenize the result without adding
special tokens, which is what generation.py does; their /v1/completions tokenizes a prompt
with special tokens (vLLM and `transformers serve` both), so a template that writes its BOS
would get two. The two traps chat.py handles are handled here too, from the local tokenizer
(the same model's): a system message is folded into the first user turn when the template has
no system role, and `chat_template_kwargs` turns Qwen3's thinking off. One difference stays:
in process a prompt longer than max_prompt_tokens is cut from the left; a server gets it whole.

Greedy: temperature 0, `max_tokens` = max_new_tokens. Requests run `concurrency` at a time
(the evaluation's batch size) so the server can batch them; each has a timeout, and a refused
connection, 429 or 5xx is tried again with backoff, a few times (a call is bounded in time).
Whatever a user can fix (no server at the URL, a model the server does not serve, a request
it rejects) is an EndpointError, which the CLI shows as one `error:` line.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import EndpointError
from .chat import Messages, _takes_system, fold_system, template_kwargs

RETRIED = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Endpoint:
    url: str  # the server's base URL, with or without the trailing /v1
    model: str  # the served model's name, as the server's /v1/models lists it
    concurrency: int = 16
    timeout_s: float = 600.0  # one request: generating max_new_tokens on a loaded server
    retries: int = 4
    backoff_s: float = 1.0  # doubled after each failed try: 1 + 2 + 4 + 8 s at most

    @property
    def base(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None,
                 retries: int | None = None) -> dict:
        """One call; a refused or dropped connection, 429 or 5xx is tried again after 1, 2,
        4, 8 s (a busy or restarting server), a timeout is not (it would only wait as long
        again), so a call lasts at most timeout_s plus 15 s. EndpointError when the tries are
        spent or the server rejects the request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data,
                                         headers={"Content-Type": "application/json"})
        timeout = timeout or self.timeout_s
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}: {_detail(e)}"
                if e.code not in RETRIED:
                    raise EndpointError(f"endpoint {self.base}{path}: {why}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise EndpointError(f"endpoint {self.base}{path}: no reply within {timeout:g} s") from None
                why = str(reason)
            except json.JSONDecodeError:
                raise EndpointError(f"endpoint {self.base}{path}: the reply is not JSON; is this an "
                                    "OpenAI-compatible server?") from None
            if attempt < retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise EndpointError(f"endpoint {self.base}{path}: no answer after {retries + 1} tries ({why})")

    def check(self) -> Endpoint:
        """The server answers and serves `model`; checked before any work starts."""
        # one quick retry: a wrong URL should not keep the user waiting
        listed = self._request("/models", timeout=min(self.timeout_s, 30.0), retries=1)
        names = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)]
        if self.model not in names:
            raise EndpointError(f"endpoint {self.base}: serves no model {self.model!r} (it serves: "
                                f"{', '.join(map(str, names)) or 'none'}); --served_model takes "
                                "one of those names")
        return self

    def complete(self, messages: Messages, max_new_tokens: int, chat_kwargs: dict | None = None) -> str:
        """The greedy reply to one chat prompt, stripped as generation.generate strips it."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                "temperature": 0}
        if chat_kwargs:  # only when needed: some servers reject fields they do not know
            body["chat_template_kwargs"] = chat_kwargs
        reply = self._request("/chat/completions", body)
        try:
            return (reply["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"endpoint {self.base}/chat/completions: no choices[0].message."
                                f"content in the reply {str(reply)[:200]}") from None

    def generate(self, tokenizer, prompts: list[Messages], max_new_tokens: int = 48,
                 desc: str = "generate", progress: bool = False) -> list[str]:
        """Greedy replies to chat prompts, in order, `concurrency` requests at a time."""
        folded = not _takes_system(tokenizer)
        kwargs = template_kwargs(tokenizer)
        messages = [fold_system(m) if folded else [dict(x) for x in m] for m in prompts]
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            jobs = pool.map(lambda m: self.complete(m, max_new_tokens, kwargs), messages)
            return list(tqdm(jobs, total=len(messages), desc=desc, leave=False, disable=not progress))
        finally:  # after a failure, the requests not yet sent are not sent
            pool.shutdown(wait=True, cancel_futures=True)


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's own message: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or text."""
    text = error.read().decode("utf-8", "replace")
    try:
        body = json.loads(text)
        found = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
        found = found.get("message", found) if isinstance(found, dict) else found
        return str(found)[:300]
    except json.JSONDecodeError:
        return text[:300] or error.reason
