"""`endpoint:URL[@MODEL]`: a guard model behind an OpenAI-compatible chat completions endpoint.

The guard model (Llama Guard style) reads the conversation, the prompt as the user turn and the
response as the assistant turn, and replies `safe` or `unsafe` (Llama Guard then lists the
violated categories, `unsafe\\nS1`). The score is the probability of `unsafe`:

* from log-probs when the server returns them: the request asks for `logprobs` with
  `top_logprobs`; at the first reply token that is not whitespace (Llama Guard 3 opens with a
  blank line), the candidates that spell the start of `unsafe` (`unsafe`, `un`, ` Unsafe`...)
  and those that spell the start of `safe` are summed, and the score is
  P(unsafe) / (P(unsafe) + P(safe)). When the two carry less than half of that token's
  probability, the reply is counted as malformed and reported by `warnings()`; when neither
  appears among the candidates, the reply text decides, as below.
* else from the reply text: 1.0 when it starts with `unsafe`, 0.0 when it starts with `safe`
  (case-insensitive, after whitespace). Such replies are counted in `warnings()`, since the score
  is then 0/1 rather than graded. Any other reply is a `RuntimeFailure`: the endpoint is not
  serving a guard model.

URL is the server's OpenAI base URL (`http://localhost:8000/v1`), to which `/chat/completions`
is appended, or the full `.../chat/completions` URL. MODEL, after the first `@`, is the served
model name; without it the judge asks `GET {base}/models` once and uses the first model listed.
Credentials do not go in the URL (so `@` always starts MODEL): the API key, when the server needs
one, is read from the environment variable TAILMON_ENDPOINT_API_KEY when the judge is built and
sent as `Authorization: Bearer KEY`; it never appears in a spec or report.

Requests use temperature 0 and a few tokens. Each has a total deadline (`timeout`, 30 s: for the
whole exchange, so a server that drips its reply cannot stretch it) and a reply size cap (1 MiB).
A redirect is a failure naming both URLs, never followed: it would carry the API key to another
place (and turn the POST into a body-less GET). Connection errors, timeouts, HTTP 408, 429 and 5xx
are retried (`retries`, 4) after exponential backoff
(`backoff` * 2^attempt, 0.5 s, 1 s, 2 s, ...; a Retry-After header, capped at 30 s, is honoured
when longer), other HTTP errors fail at once. At most `concurrency` (8) requests are in flight.
When an endpoint still fails, the judge raises `RuntimeFailure` naming the URL and the last
error (credentials in it masked). Requests go through `tailmon.httpclient` (the standard
library's urllib underneath); proxies come from the usual environment variables.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tailmon import httpclient
from tailmon.engines.base import checkpoint
from tailmon.errors import InputError, RuntimeFailure, SpecError
from tailmon.httpclient import HttpFailure, mask_url

from .base import Judge

API_KEY_ENV = "TAILMON_ENDPOINT_API_KEY"
_COMPLETIONS = "/chat/completions"
_RETRY_STATUS = {408, 429}
_MAX_RETRY_AFTER = 30.0
_TOP_LOGPROBS = 5
_MAX_TOKENS = 8  # "unsafe\nS1" and a blank line before it, with room to spare
# A guard's reply is a few hundred bytes and a model listing a few KB; a reply past this is not
# one, and reading it whole is what a hostile or broken server would want.
MAX_REPLY_BYTES = 1024 * 1024


def split_endpoint_arg(arg: str) -> tuple[str, str | None]:
    """`URL[@MODEL]` -> (url, model or None): MODEL follows the first `@`."""
    url, at, model = arg.strip().partition("@")
    url, model = url.strip(), model.strip()
    if at and not model:
        raise SpecError("the model after '@' is empty: endpoint:URL[@MODEL]")
    return url, (model if at else None)


def _is_unsafe_start(word: str) -> bool:
    return bool(word) and "unsafe".startswith(word)


def _is_safe_start(word: str) -> bool:
    return bool(word) and "safe".startswith(word)


def unsafe_probability(content: list[dict]) -> tuple[float, float] | None:
    """(P(unsafe) renormalised over safe/unsafe, their total probability) from the `logprobs.content`
    of a chat completion, or None when the first non-blank token's candidates name neither."""
    for entry in content:
        token = entry.get("token")
        if not isinstance(token, str) or not token.strip():
            continue
        candidates = entry.get("top_logprobs") or [entry]
        unsafe = safe = 0.0
        for cand in candidates:
            word = str(cand.get("token", "")).strip().lower()
            logprob = cand.get("logprob")
            if not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
                continue
            if _is_unsafe_start(word):
                unsafe += math.exp(logprob)
            elif _is_safe_start(word):
                safe += math.exp(logprob)
        if unsafe + safe <= 0.0:
            return None
        return unsafe / (unsafe + safe), unsafe + safe
    return None


class EndpointJudge(Judge):
    """P(`unsafe`) of a guard model served by an OpenAI-compatible endpoint (see module doc)."""

    def __init__(self, url: str, model: str | None = None, *, timeout: float = 30.0,
                 retries: int = 4, backoff: float = 0.5, concurrency: int = 8,
                 api_key_env: str = API_KEY_ENV) -> None:
        super().__init__()
        url = url.strip()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SpecError(f"endpoint URL must be http:// or https:// with a host, got {mask_url(url)!r}")
        try:
            parts.port
        except ValueError:
            # Typically "http://user:key@host": '@' starts MODEL, so the URL is cut at it and
            # what looks like a port is the key: never echoed.
            raise SpecError(f"endpoint URL {parts.scheme}://{parts.hostname}:... has an invalid port (credentials "
                            f"go in ${API_KEY_ENV}, not in the URL)") from None
        if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1:
            raise InputError("endpoint judge: timeout must be > 0, retries >= 0, backoff >= 0, "
                             "concurrency >= 1")
        self.url = url
        base = url.rstrip("/")
        if base.endswith(_COMPLETIONS):
            self.completions_url = base
            base = base[: -len(_COMPLETIONS)]
        else:
            self.completions_url = base + _COMPLETIONS
        self.models_url = base + "/models"
        self.model = model.strip() if model is not None else None
        if self.model == "":
            raise SpecError("the model after '@' is empty: endpoint:URL[@MODEL]")
        self.spec = f"endpoint:{url}" + (f"@{self.model}" if self.model else "")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self._api_key = os.environ.get(api_key_env) or None
        self._lock = threading.Lock()
        self.new_run()

    def new_run(self) -> None:
        super().new_run()
        self.replies = 0
        """Replies scored so far."""
        self.text_only = 0
        """Replies scored 0/1 from their text (no usable log-probs)."""
        self.malformed = 0
        """Replies whose safe/unsafe candidates carried less than half the first token's mass."""

    # -- HTTP ------------------------------------------------------------------------------------

    def _request(self, url: str, payload: dict | None) -> dict:
        """One JSON request with retries; the decoded JSON reply, or RuntimeFailure.

        Through `tailmon.httpclient`: a redirect fails at once (following it would send the API
        key to wherever the Location points, as a body-less GET), `timeout` bounds the whole
        exchange, and a reply larger than `MAX_REPLY_BYTES` fails instead of filling memory."""
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        shown = mask_url(url)
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            delay = self.backoff * 2**attempt
            try:
                reply = httpclient.request(url, method="POST" if data is not None else "GET", body=data,
                                           headers=headers, timeout=self.timeout, max_bytes=MAX_REPLY_BYTES)
            except HttpFailure as exc:
                if not exc.retryable:
                    raise RuntimeFailure(f"judge endpoint {exc}") from None
                last = exc.detail
            else:
                if reply.status >= 400:
                    detail = _error_detail(reply.body)
                    last = f"HTTP {reply.status}{': ' + detail if detail else ''}"
                    if reply.status not in _RETRY_STATUS and reply.status < 500:
                        raise RuntimeFailure(f"judge endpoint {shown}: {last}")
                    delay = max(delay, _retry_after(reply.headers.get("Retry-After")))
                else:
                    try:
                        decoded = json.loads(reply.body)
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        raise RuntimeFailure(
                            f"judge endpoint {shown}: the reply is not JSON ({reply.body[:80]!r})"
                        ) from None
                    if not isinstance(decoded, dict):
                        raise RuntimeFailure(f"judge endpoint {shown}: the reply is not a JSON object")
                    return decoded
            if attempt < self.retries:
                time.sleep(delay)
        raise RuntimeFailure(
            f"judge endpoint {shown} failed after {self.retries + 1} attempt(s): {last}"
        )

    def _served_model(self) -> str:
        with self._lock:
            if self.model is None:
                listing = self._request(self.models_url, None)
                models = listing.get("data")
                first = models[0].get("id") if isinstance(models, list) and models and isinstance(models[0], dict) else None
                if not isinstance(first, str) or not first:
                    raise RuntimeFailure(
                        f"judge endpoint {self.models_url} lists no model: give one, "
                        "endpoint:URL@MODEL"
                    )
                # Remembered for this judge but kept out of the spec: the spec says what the
                # user wrote, and the same spec on another day may reach another served model.
                self.model = first
            return self.model

    # -- scoring ---------------------------------------------------------------------------------

    def _judge_one(self, model: str, prompt: str, response: str) -> tuple[float, float | None]:
        """(score, safe+unsafe mass or None when the score came from the text)."""
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}],
            "temperature": 0,
            "max_tokens": _MAX_TOKENS,
            "logprobs": True,
            "top_logprobs": _TOP_LOGPROBS,
        }
        reply = self._request(self.completions_url, payload)
        try:
            choice = reply["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeFailure(f"judge endpoint {self.completions_url}: the reply has no "
                                 f"choices[0].message ({json.dumps(reply)[:120]})") from None
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(content, list):
            read = unsafe_probability([c for c in content if isinstance(c, dict)])
            if read is not None:
                return read
        word = text.strip().lower()
        if word.startswith("unsafe"):
            return 1.0, None
        if word.startswith("safe"):
            return 0.0, None
        raise RuntimeFailure(f"judge endpoint {self.completions_url}: the reply {text[:80]!r} is "
                             "neither 'safe' nor 'unsafe' (is it serving a guard model?)")

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        model = self._served_model()
        workers = min(self.concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tailmon-endpoint") as pool:
            futures = [pool.submit(self._judge_one, model, p, r) for p, r in zip(prompts, responses)]
            try:
                results = []
                for f in futures:
                    results.append(f.result())
                    checkpoint()  # each reply is progress, and a place where a daemon's run may stop
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        self.replies += len(results)
        self.text_only += sum(mass is None for _, mass in results)
        self.malformed += sum(mass is not None and mass < 0.5 for _, mass in results)
        return np.array([score for score, _ in results], dtype=np.float64)

    def warnings(self) -> list[str]:
        out = []
        if self.text_only:
            out.append(f"{self.spec}: {self.text_only} of {self.replies} replies came without "
                       "usable log-probs; their scores are 0/1 from the reply text")
        if self.malformed:
            out.append(f"{self.spec}: {self.malformed} of {self.replies} replies malformed "
                       "(safe/unsafe mass < 0.5 at the first token); their scores use the "
                       "renormalised safe/unsafe probabilities")
        return out


def _error_detail(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        message = json.loads(text).get("error", {})
        message = message.get("message", "") if isinstance(message, dict) else str(message)
    except (json.JSONDecodeError, AttributeError):
        message = text
    return " ".join(str(message).split())[:200]


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER) if value is not None else 0.0
    except ValueError:  # an HTTP date: not worth parsing, the backoff still applies
        return 0.0
