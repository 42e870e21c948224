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
(the evaluation's batch size) so the server can batch them. A reply is never trusted as it
comes: a body over MAX_REPLY_BYTES, not UTF-8 JSON, cut short, without a string `content`, or
naming another model than the one asked for is an error naming the request, never a response
(a null content used to be scored as a compliance). Time is bounded per request, retries
included: a refused connection, 429 or 5xx is tried again with backoff while the request's
timeout_s lasts, and the caller's thread stops waiting at timeout_s whatever the socket does.
The first failure ends the whole call: requests not yet sent are never sent, and those in
flight are abandoned rather than waited for. Whatever a user can fix (no server at the URL, a
model the server does not serve, a request it rejects) is an EndpointError, which the CLI
shows as one `error:` line.
"""
from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import EndpointError
from .chat import Messages, _takes_system, fold_system, template_kwargs

RETRIED = {408, 429, 500, 502, 503, 504}
# a chat reply of max_new_tokens tokens is kilobytes; a body this large is a broken or hostile
# server, and reading it whole would put it in memory and then in the records
MAX_REPLY_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Endpoint:
    url: str  # the server's base URL, with or without the trailing /v1
    model: str  # the served model's name, as the server's /v1/models lists it
    concurrency: int = 16
    timeout_s: float = 600.0  # one request, its retries included: max_new_tokens on a loaded server
    retries: int = 4
    backoff_s: float = 1.0  # doubled after each failed try: 1 + 2 + 4 + 8 s at most

    @property
    def base(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None,
                 retries: int | None = None):
        """One call, finished within `timeout` (default timeout_s) from its start, retries and
        backoff included: a refused or dropped connection, a body cut short, 429 or 5xx is
        tried again after 1, 2, 4, 8 s (a busy or restarting server) while time is left; a
        timeout is not (it would only wait as long again). EndpointError when the tries or the
        time are spent or the server rejects the request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data,
                                         headers={"Content-Type": "application/json"})
        timeout = timeout or self.timeout_s
        deadline = time.monotonic() + timeout
        retries = self.retries if retries is None else retries
        where = f"endpoint {self.base}{path}"
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=max(deadline - time.monotonic(), 0.01)) as reply:
                    raw = _body(reply)
                if raw is None:
                    raise EndpointError(f"{where}: the reply is over {MAX_REPLY_BYTES / 2**20:g} MiB; "
                                        "a chat reply is far smaller, so this is not one")
                return json.loads(raw.decode("utf-8"))
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}: {_detail(e)}"
                if e.code not in RETRIED:
                    raise EndpointError(f"{where}: {why}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise EndpointError(f"{where}: no reply within {timeout:g} s") from None
                why = str(reason)
            except http.client.IncompleteRead as e:  # the connection closed inside the body
                why = f"the reply was cut short after {len(e.partial)} bytes"
            except http.client.HTTPException as e:  # a malformed status line or headers
                why = f"not an HTTP reply ({type(e).__name__})"
            except UnicodeDecodeError as e:
                raise EndpointError(f"{where}: the reply is not UTF-8 (byte {e.start}); is this an "
                                    "OpenAI-compatible server?") from None
            except json.JSONDecodeError:
                raise EndpointError(f"{where}: the reply is not JSON; is this an "
                                    "OpenAI-compatible server?") from None
            pause = self.backoff_s * 2 ** attempt
            if attempt == retries or time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
        raise EndpointError(f"{where}: no answer after {attempt + 1} tries ({why})")

    def check(self) -> Endpoint:
        """The server answers and serves `model`; checked before any work starts."""
        # one quick retry: a wrong URL should not keep the user waiting
        listed = self._request("/models", timeout=min(self.timeout_s, 30.0), retries=1)
        models = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(models, list):
            raise EndpointError(f"endpoint {self.base}/models: the reply has no `data` list of "
                                f"models ({str(listed)[:200]}); is this an OpenAI-compatible server?")
        names = [m.get("id") for m in models if isinstance(m, dict)]
        if self.model not in names:
            raise EndpointError(f"endpoint {self.base}: serves no model {self.model!r} (it serves: "
                                f"{', '.join(map(str, names)) or 'none'}); --served_model takes "
                                "one of those names")
        return self

    def complete(self, messages: Messages, max_new_tokens: int, chat_kwargs: dict | None = None,
                 which: str = "a request") -> str:
        """The greedy reply to one chat prompt, stripped as generation.generate strips it;
        `which` names the request in errors."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                "temperature": 0}
        if chat_kwargs:  # only when needed: some servers reject fields they do not know
            body["chat_template_kwargs"] = chat_kwargs
        reply = self._request("/chat/completions", body)
        where = f"endpoint {self.base}/chat/completions, {which}"
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{where}: no choices[0].message.content in the reply "
                                f"{str(reply)[:200]}") from None
        if not isinstance(content, str):
            # vLLM answers null when a reasoning parser took every token; a missing response
            # is not a compliance, and scoring it as one made the ASR 1.000
            raise EndpointError(f"{where}: the reply's content is {json.dumps(content)[:60]}, not "
                                "text (finish_reason: "
                                f"{reply['choices'][0].get('finish_reason')!r}); no response to judge")
        served = reply.get("model")
        # `transformers serve` names a Hub model `name@revision` in its replies
        if served is not None and served != self.model and not str(served).startswith(self.model + "@"):
            raise EndpointError(f"{where}: the reply is from model {str(served)[:100]!r}, not "
                                f"{self.model!r}; its responses would be scored as the wrong model's")
        return content.strip()

    def generate(self, tokenizer, prompts: list[Messages], max_new_tokens: int = 48,
                 desc: str = "generate", progress: bool = False) -> list[str]:
        """Greedy replies to chat prompts, in order, `concurrency` requests at a time. The first
        failure ends the call at once: nothing more is sent, and requests in flight are left
        to their daemon threads instead of being waited for."""
        folded = not _takes_system(tokenizer)
        kwargs = template_kwargs(tokenizer)
        messages = [fold_system(m) if folded else [dict(x) for x in m] for m in prompts]
        todo, done, stop = queue.Queue(), queue.Queue(), threading.Event()
        for item in enumerate(messages):
            todo.put(item)
        started = {}  # index -> monotonic start, of the requests in flight

        def work():
            while not stop.is_set():
                try:
                    i, m = todo.get_nowait()
                except queue.Empty:
                    return
                started[i] = time.monotonic()
                try:
                    done.put((i, self.complete(m, max_new_tokens, kwargs,
                                               f"request {i + 1} of {len(messages)}"), None))
                except Exception as e:  # handed to the caller's thread, which raises it
                    stop.set()  # before this worker could take another request
                    done.put((i, None, e))
                started.pop(i, None)

        for _ in range(min(self.concurrency, len(messages))):
            threading.Thread(target=work, daemon=True).start()
        replies = [None] * len(messages)
        try:
            with tqdm(total=len(messages), desc=desc, leave=False, disable=not progress) as bar:
                for _ in messages:
                    i, text, error = self._next(done, started, len(messages))
                    if error is not None:
                        raise error
                    replies[i] = text
                    bar.update()
        finally:  # after a failure nothing more is sent; a reply still in flight is dropped
            stop.set()
        return replies

    def _next(self, done: queue.Queue, started: dict, total: int):
        """The next finished request; EndpointError when one in flight passed timeout_s (the
        socket's own timeout restarts with every byte, so a trickling server would not end)."""
        while True:
            try:
                return done.get(timeout=0.25)
            except queue.Empty:
                now, slow = time.monotonic(), dict(started)
                late = [i for i, t in slow.items() if now - t > self.timeout_s + 1]
                if late:
                    raise EndpointError(f"endpoint {self.base}/chat/completions, request "
                                        f"{min(late) + 1} of {total}: no reply within "
                                        f"{self.timeout_s:g} s") from None


def _body(reply) -> bytes | None:
    """The reply's body, None past MAX_REPLY_BYTES (the rest is never read). IncompleteRead
    when the connection closed before Content-Length bytes came: http.client returns the
    short body as if whole."""
    parts, size = [], 0
    while size <= MAX_REPLY_BYTES:
        chunk = reply.read(min(2**16, MAX_REPLY_BYTES + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    if size > MAX_REPLY_BYTES:
        return None
    if reply.length:  # bytes the headers promised that never came
        raise http.client.IncompleteRead(b"".join(parts), reply.length)
    return b"".join(parts)


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's own message: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or text."""
    text = error.read(64 * 1024).decode("utf-8", "replace")
    try:
        body = json.loads(text)
        found = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
        found = found.get("message", found) if isinstance(found, dict) else found
        return str(found)[:300]
    except json.JSONDecodeError:
        return text[:300] or error.reason
