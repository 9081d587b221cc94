"""ASGI middleware of ``ttadapt serve``: the ``ttadapt`` request field of vLLM's OpenAI-compatible server.

vLLM's server accepts a router vector only as the flat ``vllm_xargs["ttadapt"]`` list. This middleware
(loaded with vLLM's ``--middleware ttadapt.vllm.server.TTAdaptMiddleware``; ``ttadapt serve`` adds it)
lets ``POST /v1/completions`` and ``/v1/chat/completions`` bodies carry a readable field instead::

    "ttadapt": {"state": "NAME", "steer": {...}, "reroute": {...}}     # see ttadapt.vllm.http_schema

It builds the request's router state (registered state + steering; with ``reroute``, adapted on the
prompt by the HF trainer of ``ttadapt.vllm.runtime``), turns it into the flat payload, calls the
inner vLLM app and adds a compact ``"ttadapt"`` summary to the JSON response (streams: an
``x-ttadapt`` header). Re-adaptation every ``interval`` tokens runs for non-streaming
``/v1/completions`` (one inner request per chunk, concatenated); everything else adapts on the
prompt only, and the summary says which and why. Bad fields get HTTP 400 naming the fix.
Requests without a ``ttadapt`` field pass through unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ttadapt.vllm.generation import chunk_min_tokens, chunk_seed, continues
from ttadapt.vllm.http_schema import FIELD, RequestError, RequestSpec, parse_request
from ttadapt.vllm.payload import AUTO_SALT_KEY, PAYLOAD_KEY, payload_salt
from ttadapt.vllm.runtime import Adapted, ServerRuntime, current_runtime

__all__ = ["ENDPOINTS", "SUMMARY_HEADER", "TTAdaptMiddleware"]

logger = logging.getLogger("vllm.ttadapt")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
SUMMARY_HEADER = "x-ttadapt"
_DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions


class TTAdaptMiddleware:
    """Pure ASGI middleware: ``ttadapt`` request field -> router state -> ``vllm_xargs['ttadapt']``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = _endpoint(scope)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away before sending its body
            return
        data = _json_object(body)
        if data is None or data.get(FIELD) is None:
            await self.app(scope, _replay(body, receive), send)
            return
        inner = _Inner(self.app, scope, receive)
        out = _Output(send)
        try:
            runtime = await _runtime(scope)
            await _Handler(inner, runtime, endpoint, data, out).run()
        except RequestError as exc:
            if out.started:
                raise
            await out.json(exc.status, _error(exc.message, exc.param, exc.status))
        except Exception as exc:
            logger.exception("ttadapt: request failed")
            if out.started:
                raise
            await out.json(500, _error(f"ttadapt: {type(exc).__name__}: {exc}", FIELD, 500))


# ---------------------------------------------------------------------------------- one request
@dataclass
class _Seq:
    """One sample of a chunked completion: its tokens, text and Rerouter (warm start)."""

    index: int
    rerouter: Any
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: Any = None
    last_got: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)


class _Handler:
    """Serves one request that carries a ``ttadapt`` field."""

    def __init__(
        self, inner: _Inner, runtime: ServerRuntime, endpoint: str, data: dict[str, Any], out: _Output
    ) -> None:
        self.inner = inner
        self.runtime = runtime
        self.endpoint = endpoint
        self.path = inner.scope["path"]
        self.data = data
        self.out = out

    async def run(self) -> None:
        # Authorise through the inner app first (it runs vLLM's API-key check): no schema feedback,
        # state names or trainer time for clients the server would refuse.
        probe = await self.inner.call("GET", "/v1/models", None)
        if probe.status in (401, 403):
            await self.out.raw(probe)
            return
        rt = self.runtime
        spec = parse_request(
            self.data, states=rt.states, trainer=rt.trainer is not None, max_steps=rt.config.max_reroute_steps
        )
        base = rt.base_state(spec)
        body = {k: v for k, v in self.data.items() if k != FIELD}
        if not isinstance(body.get("vllm_xargs", {}), dict):
            raise RequestError("'vllm_xargs' must be an object", param="vllm_xargs")
        summary: dict[str, Any] = {"state": spec.state}
        if spec.reroute is None:
            payload = rt.payload(base)
            summary.update(mode="static", state_hash=base.content_hash(), payload_salt=payload_salt(payload))
            await self._forward(body, payload, summary)
            return
        ids = await self._prompt_ids(body)
        if ids is None:
            return  # vLLM's error (e.g. no chat template) was sent
        why = _prefill_only_reason(self.endpoint, body, spec)
        if why is None:
            await self._chunked(body, spec, base, ids)
            return
        first = await rt.adapt(rt.rerouter(spec.reroute), base, ids, len(ids))
        if self.endpoint == "completions":
            body["prompt"] = ids  # decode exactly the tokens the state was adapted on
        payload = rt.payload(first.state)
        summary.update(mode="prefill", reason=why, rounds=[first.record], payload_salt=payload_salt(payload))
        extra = _stale_salt(body, spec)
        await self._forward(body, payload, summary, extra)

    # ------------------------------------------------------------------ single request
    async def _forward(
        self,
        body: dict[str, Any],
        payload: list[float | int],
        summary: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        body = _with_payload(body, payload, extra)
        if body.get("stream"):
            await self.inner.stream(self.path, body, self.out, {SUMMARY_HEADER: _compact(summary)})
            return
        resp = await self.inner.call("POST", self.path, body)
        obj = resp.json() if resp.status == 200 else None
        if not isinstance(obj, dict):
            await self.out.raw(resp)
            return
        obj[FIELD] = summary
        await self.out.json(200, obj, resp.headers)

    # ------------------------------------------------------------------ prompt
    async def _prompt_ids(self, body: dict[str, Any]) -> list[int] | None:
        """The token ids vLLM will decode from, via the server's own ``/tokenize`` (same template)."""
        if self.endpoint == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                return [int(t) for t in prompt]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError(
                    "'ttadapt.reroute' adapts on one prompt: 'prompt' must be one non-empty string or one list of "
                    "token ids (send one request per prompt; each prompt gets its own adapted state)",
                    param="prompt",
                )
            special = body.get("add_special_tokens", True)
            req = {"model": body.get("model"), "prompt": prompt, "add_special_tokens": special}
        else:
            keys = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                    "chat_template", "chat_template_kwargs", "tools")
            req = {"model": body.get("model"), **{k: body[k] for k in keys if k in body}}
        resp = await self.inner.call("POST", "/tokenize", req)
        obj = resp.json() if resp.status == 200 else None
        if not isinstance(obj, dict) or not isinstance(obj.get("tokens"), list):
            await self.out.raw(resp)
            return None
        if not obj["tokens"]:
            raise RequestError("the prompt tokenizes to nothing; nothing to adapt on", param="prompt")
        return [int(t) for t in obj["tokens"]]

    # ------------------------------------------------------------------ chunked re-adaptation
    async def _chunked(self, body: dict[str, Any], spec: RequestSpec, base: Any, ids: list[int]) -> None:
        """Adapt on the prompt, decode ``interval`` tokens (n samples), re-adapt each sample, repeat."""
        rt, cfg = self.runtime, spec.reroute
        assert cfg is not None and cfg.interval is not None
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens", _DEFAULT_MAX_TOKENS))
        seed = body.get("seed")
        min_tokens = int(body.get("min_tokens") or 0)
        want_ids = bool(body.get("return_token_ids"))
        extra = _stale_salt(body, spec)

        def request(ctx: list[int], done: int, k: int, s: Any, payload: list[float | int]) -> dict[str, Any]:
            chunk = min(cfg.interval, max_tokens - done)
            req = dict(body, prompt=ctx, max_tokens=chunk, n=k, return_token_ids=True,
                       min_tokens=chunk_min_tokens(min_tokens, done, chunk))
            if s is not None:
                req["seed"] = s
            return _with_payload(req, payload, extra)

        rr0 = rt.rerouter(cfg)
        first = await rt.adapt(rr0, base, ids, len(ids))
        resp = await self.inner.call("POST", self.path, request(ids, 0, n, seed, rt.payload(first.state)))
        head = resp.json() if resp.status == 200 else None
        if not isinstance(head, dict) or not isinstance(head.get("choices"), list):
            await self.out.raw(resp)
            return
        choices = sorted(head["choices"], key=lambda c: c.get("index", 0))
        seqs = [
            _Seq(index=j, rerouter=rr0 if j == 0 else rt.fork(rr0), rounds=[first.record])
            for j in range(len(choices))
        ]
        for s, ch in zip(seqs, choices):
            _extend(s, ch)
        chunk_no = 1
        while active := [s for s in seqs if continues(s.finish_reason, len(s.tokens), max_tokens, s.last_got)]:
            adapted: list[Adapted] = []
            for s in active:  # one trainer thread: rounds run one after another
                adapted.append(await rt.adapt(s.rerouter, base, ids + s.tokens, len(ids)))
            resps = await asyncio.gather(*(
                self.inner.call("POST", self.path, request(
                    ids + s.tokens, len(s.tokens), 1, chunk_seed(seed, chunk_no, n, s.index), rt.payload(a.state)))
                for s, a in zip(active, adapted)
            ))
            for s, a, r in zip(active, adapted, resps):
                obj = r.json() if r.status == 200 else None
                if not isinstance(obj, dict) or not obj.get("choices"):
                    await self.out.raw(r)
                    return
                s.rounds.append(a.record)
                _extend(s, obj["choices"][0])
            chunk_no += 1
        for s, ch in zip(seqs, choices):
            ch.update(text=s.text, finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                      token_ids=s.tokens if want_ids else None, prompt_token_ids=ids if want_ids else None)
        completion = sum(len(s.tokens) for s in seqs)
        head["choices"] = choices
        head["usage"] = {
            "prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion,
        }
        summary: dict[str, Any] = {"state": spec.state, "mode": "chunked", "interval": cfg.interval}
        if len(seqs) == 1:
            summary["rounds"] = seqs[0].rounds
        else:
            summary["samples"] = [{"index": s.index, "rounds": s.rounds} for s in seqs]
        head[FIELD] = summary
        await self.out.json(200, head, resp.headers)


def _extend(s: _Seq, choice: dict[str, Any]) -> None:
    new = [int(t) for t in choice.get("token_ids") or []]
    s.tokens.extend(new)
    s.text += choice.get("text") or ""
    s.finish_reason = choice.get("finish_reason")
    s.stop_reason = choice.get("stop_reason")
    s.last_got = len(new)


def _prefill_only_reason(endpoint: str, body: dict[str, Any], spec: RequestSpec) -> str | None:
    """Why this request cannot be re-adapted every ``interval`` tokens (None: it can)."""
    cfg = spec.reroute
    assert cfg is not None
    if cfg.steps == 0:
        return "steps=0 (no adaptation)"
    if cfg.interval is None:
        return "interval is null (prefill-only requested)"
    if endpoint != "completions":
        return "chat completions are adapted on the rendered prompt only (chunked re-adaptation needs /v1/completions)"
    if body.get("stream"):
        return "streaming responses are adapted on the prompt only"
    if "max_tokens" in body and body["max_tokens"] is None:
        return "max_tokens is null"
    max_tokens = body.get("max_tokens", _DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or max_tokens <= cfg.interval:
        return f"max_tokens ({max_tokens}) <= interval ({cfg.interval}): one chunk"
    for key in ("echo", "logprobs", "prompt_logprobs", "best_of", "use_beam_search", "suffix"):
        if body.get(key) not in (None, False):
            return f"'{key}' is not supported with chunked re-adaptation"
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return "n is not a positive integer"
    return None


def _stale_salt(body: dict[str, Any], spec: RequestSpec) -> dict[str, Any] | None:
    """``kv_policy="stale"``: one cache salt for all chunks (reuse KV made under earlier vectors)."""
    if spec.reroute is None or spec.reroute.kv_policy != "stale":
        return None
    salt = f"ttadapt-seq:{uuid.uuid4().hex}"
    old = body.get("cache_salt")
    return {"cache_salt": f"{old}|{salt}" if old else salt, "xargs": {AUTO_SALT_KEY: 0}}


def _with_payload(
    body: dict[str, Any], payload: list[float | int], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    out = dict(body)
    xargs = dict(out.get("vllm_xargs") or {})
    xargs[PAYLOAD_KEY] = payload
    if extra is not None:
        xargs.update(extra["xargs"])
        out["cache_salt"] = extra["cache_salt"]
    out["vllm_xargs"] = xargs
    return out


# ---------------------------------------------------------------------------------- ASGI plumbing
@dataclass
class _Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _Inner:
    """Calls the wrapped vLLM app with a synthetic request (same client, headers and connection)."""

    def __init__(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        self.app = app
        self.scope = scope
        self.receive = receive
        root = scope.get("root_path", "")
        # Inner paths take the same form as the client's (with the root path or without it).
        self.prefix = root if root and scope.get("path", "").startswith(root) else ""

    def _scope(self, method: str, path: str, body: bytes) -> Scope:
        skip = {b"content-length", b"transfer-encoding", b"content-type"}
        headers = [(k, v) for k, v in self.scope.get("headers", []) if k.lower() not in skip]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        full = path if path.startswith(self.prefix + "/") else self.prefix + path
        return dict(self.scope, method=method, path=full, raw_path=full.encode(), query_string=b"", headers=headers)

    def _receive(self, body: bytes) -> Receive:
        return _replay(body, self.receive)  # then the real client: blocks until it disconnects

    async def call(self, method: str, path: str, payload: Any) -> _Response:
        body = b"" if payload is None else json.dumps(payload).encode()
        status, headers, chunks = 500, [], []

        async def send(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(self._scope(method, path, body), self._receive(body), send)
        return _Response(status, headers, b"".join(chunks))

    async def stream(self, path: str, payload: Any, out: _Output, extra_headers: dict[str, str]) -> None:
        body = json.dumps(payload).encode()
        added = [(k.encode(), v.encode("latin-1")) for k, v in extra_headers.items()]

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + added)
            await out.send(message)

        await self.app(self._scope("POST", path, body), self._receive(body), send)


class _Output:
    """The client's ``send``, remembering whether a response has started."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def raw(self, resp: _Response) -> None:
        await self.send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
        await self.send({"type": "http.response.body", "body": resp.body, "more_body": False})

    async def json(self, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(obj).encode()
        keep = [(k, v) for k, v in headers or [] if k.lower() not in (b"content-length", b"content-type")]
        keep += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.raw(_Response(status, keep, body))


def _endpoint(scope: Scope) -> str | None:
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return None
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return ENDPOINTS.get(path)


async def _read_body(receive: Receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """An ASGI receive that yields ``body`` once, then defers to ``receive`` (e.g. for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


async def _runtime(scope: Scope) -> ServerRuntime:
    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    model = getattr(args, "model", None)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, current_runtime, model)


def _error(message: str, param: str | None, status: int) -> dict[str, Any]:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _compact(summary: dict[str, Any]) -> str:
    return json.dumps(summary, separators=(",", ":"), sort_keys=True)
