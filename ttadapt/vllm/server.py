"""ASGI middleware of ``ttadapt serve``: the ``ttadapt`` request field of vLLM's OpenAI-compatible server.

vLLM's server accepts a router vector only as the flat ``vllm_xargs["ttadapt"]`` list. This middleware
(loaded with vLLM's ``--middleware ttadapt.vllm.server.TTAdaptMiddleware``; ``ttadapt serve`` adds it)
lets ``POST /v1/completions`` and ``/v1/chat/completions`` bodies carry a readable field instead::

    "ttadapt": {"state": "NAME", "steer": {...}, "reroute": {...}}     # see ttadapt.vllm.http_schema

It builds the request's router state (registered state + steering; with ``reroute``, adapted on the
prompt by a trainer of ``ttadapt.vllm.runtime``: the HF copy, or the search scored by the server's own
engine), turns it into the flat payload, calls the inner vLLM app and adds a compact ``"ttadapt"``
summary to the JSON response (streams: an ``x-ttadapt`` header). Re-adaptation every ``interval``
tokens runs for non-streaming ``/v1/completions``: the chunk loop of ``ttadapt.vllm.generate``
(:mod:`ttadapt.vllm.chunks`), one inner request per chunk, concatenated; everything else adapts on
the prompt only, and the summary says which and why. Bad fields get HTTP 400 naming the fix.
Requests without a ``ttadapt`` field pass through unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ttadapt.vllm.chunk_stream import ChunkStream, SSEParser
from ttadapt.vllm.chunks import ChunkLoop, ChunkRequest, Decoded, StopStrings, arun_chunks
from ttadapt.vllm.http_schema import FIELD, RequestError, RequestSpec, parse_request
from ttadapt.vllm.payload import AUTO_SALT_KEY, PAYLOAD_KEY, payload_salt
from ttadapt.vllm.runtime import EngineScorer, ServerRuntime, current_runtime
from ttadapt.vllm.trainers import AdaptJob

if TYPE_CHECKING:
    from ttadapt.vllm.trainers import ChunkTrainer

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
class _InnerFailed(Exception):
    """An inner chunk request did not answer 200 with choices; its response goes to the client as is."""

    def __init__(self, resp: _Response) -> None:
        super().__init__(resp.status)
        self.resp = resp


class _StreamFailed(Exception):
    """An inner chunk's stream carried an error event."""

    def __init__(self, event: Any) -> None:
        super().__init__(str(event))
        self.error = event.get("error", event) if isinstance(event, dict) else event


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
        spec = parse_request(self.data, states=rt.states, trainers=rt.trainers, max_steps=rt.config.max_reroute_steps)
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
        trainer = rt.chunk_trainer(spec, base, self._scorer() if spec.trainer == "search" else None)
        summary["trainer"] = spec.trainer
        why = _prefill_only_reason(self.endpoint, body, spec, trainer.adapts, self._reasoning_parser())
        if why is None:
            await self._chunked(body, spec, ids, trainer, summary)
            return
        (first,) = await rt.adapt(trainer, [AdaptJob(seq=0, context=ids, prompt_len=len(ids), chunk=0)])
        if self.endpoint == "completions":
            body["prompt"] = ids  # decode exactly the tokens the state was adapted on
        payload = rt.payload(first)
        summary.update(mode="prefill", reason=why, rounds=[rt.record(trainer, (0, 0), first)],
                       payload_salt=payload_salt(payload))
        extra = _stale_salt(body, spec)
        await self._forward(body, payload, summary, extra)

    async def _stop_strings(self, body: dict[str, Any]) -> StopStrings | None:
        """The request's stop strings, decoded as vLLM decodes its output text (None: none, or no tokenizer)."""
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [x for x in stop if isinstance(x, str)] if isinstance(stop, list) else []
        if not stops:
            return None
        get = getattr(self._engine_client(), "get_tokenizer", None)
        tokenizer = get() if callable(get) else None
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer
        if tokenizer is None:
            logger.warning("ttadapt: no tokenizer in the engine client; stop strings straddling chunks go unseen")
            return None
        skip = bool(body.get("skip_special_tokens", True))
        return StopStrings(stops, lambda ids: tokenizer.decode(ids, skip_special_tokens=skip))

    def _reasoning_parser(self) -> str:
        """The server's ``--reasoning-parser`` ("" when none or unknown)."""
        config = getattr(getattr(self._engine_client(), "vllm_config", None), "structured_outputs_config", None)
        return str(getattr(config, "reasoning_parser", "") or "")

    def _engine_client(self) -> Any:
        """vLLM's engine client (``app.state.engine_client``, what its endpoints submit to), or None."""
        return getattr(getattr(self.inner.scope.get("app"), "state", None), "engine_client", None)

    def _scorer(self) -> EngineScorer:
        """The search's scorer: this server's own engine client."""
        engine = self._engine_client()
        if engine is None:
            raise RequestError("the search trainer needs vLLM's engine client (app.state.engine_client), "
                               "which this server does not expose", status=500)
        return EngineScorer(engine, asyncio.get_running_loop())

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
    async def _chunked(
        self, body: dict[str, Any], spec: RequestSpec, ids: list[int], trainer: ChunkTrainer, summary: dict[str, Any]
    ) -> None:
        """The chunk loop of ``ttadapt.vllm.generate`` over the inner app: one inner request per chunk."""
        rt, cfg = self.runtime, spec.reroute
        assert cfg is not None and cfg.interval is not None
        chat = self.endpoint == "chat"
        streamed, usage = bool(body.get("stream")), bool((body.get("stream_options") or {}).get("include_usage"))
        if chat:  # chunks are token-id completions of the rendered prompt; the answer is shaped as a chat one
            body = _completion_fields(body)
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        n = int(body.get("n") or 1)
        stop_at = await self._stop_strings(body)
        loop = ChunkLoop([ids], n=n, max_tokens=int(_max_tokens(body, self.endpoint)),
                         interval=cfg.interval, min_tokens=int(body.get("min_tokens") or 0), seed=body.get("seed"),
                         stop_at=stop_at)
        extra = _stale_salt(body, spec)
        summary.update(mode="chunked", interval=cfg.interval)
        if streamed:
            sink = ChunkStream(self._stream_emitter(summary), chat=chat, n=n, model=body.get("model"),
                               stops=stop_at.stops if stop_at else [], include_usage=usage,
                               include_stop=bool(body.get("include_stop_str_in_output")),
                               prompt_ids=ids if body.get("return_token_ids") else None, stop_at=stop_at)
            await self._chunked_stream(body, loop, trainer, sink, extra, summary, len(ids))
            return
        texts: list[str] = [""] * n
        stops: list[Any] = [None] * n
        rounds: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        head: tuple[dict[str, Any], list[tuple[bytes, bytes]]] | None = None  # the first chunk's response

        async def decode(reqs: list[ChunkRequest]) -> list[list[Decoded]]:
            nonlocal head
            path = _COMPLETIONS if chat else self.path
            calls = [self.inner.call("POST", path, _chunk_body(body, r, rt.payload(r.state), extra)) for r in reqs]
            resps = await asyncio.gather(*calls)
            out = []
            for req, resp in zip(reqs, resps):
                obj = resp.json() if resp.status == 200 else None
                if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list) or not obj["choices"]:
                    raise _InnerFailed(resp)
                if head is None:
                    head = (obj, resp.headers)
                choices = sorted(obj["choices"], key=lambda c: c.get("index", 0))
                record = rt.record(trainer, req.round, req.state)
                for k, ch in zip(req.seqs, choices):
                    texts[k] += ch.get("text") or ""
                    stops[k] = ch.get("stop_reason")
                    rounds[k].append(record)
                out.append([Decoded([int(t) for t in ch.get("token_ids") or []], ch.get("finish_reason"))
                            for ch in choices])
            return out

        try:
            await arun_chunks(loop, lambda jobs: rt.adapt(trainer, jobs), trainer.fork, decode)
        except _InnerFailed as exc:
            await self.out.raw(exc.resp)
            return
        assert head is not None
        obj, headers = head
        choices = sorted(obj["choices"], key=lambda c: c.get("index", 0))
        want_ids = bool(body.get("return_token_ids"))
        for k, s in enumerate(loop.seqs):
            if stop_at is not None and s.straddled:  # the loop ended it at a stop straddling two chunks
                texts[k], stops[k] = _cut_at_stop(stop_at, s.tokens, len(s.tokens) - s.last_got, body)
        for k, (s, ch) in enumerate(zip(loop.seqs, choices)):
            ch.update(text=texts[k], finish_reason=s.finish_reason, stop_reason=stops[k],
                      token_ids=s.tokens if want_ids else None, prompt_token_ids=ids if want_ids else None)
        completion = sum(len(s.tokens) for s in loop.seqs)
        obj["choices"] = choices
        obj["usage"] = {
            "prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion,
        }
        if chat:
            obj = _as_chat(obj, ids if want_ids else None)
        _add_rounds(summary, rounds)
        obj[FIELD] = summary
        await self.out.json(200, obj, headers)

    def _stream_emitter(self, summary: dict[str, Any]) -> Callable[[bytes], Awaitable[None]]:
        """Writes event bytes to the client, starting the 200 event-stream response (with the summary
        header as it stands) at the first write, so errors before any text still get their status."""

        async def emit(data: bytes) -> None:
            if not self.out.started:
                await self.out.send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                    (SUMMARY_HEADER.encode(), _compact(summary).encode("latin-1"))]})
            await self.out.send({"type": "http.response.body", "body": data, "more_body": True})

        return emit

    async def _chunked_stream(
        self, body: dict[str, Any], loop: ChunkLoop, trainer: ChunkTrainer, sink: ChunkStream,
        extra: dict[str, Any] | None, summary: dict[str, Any], prompt_tokens: int,
    ) -> None:
        """The chunk loop with every chunk streamed through ``sink``; the summary rides on the last sample's
        final event. A failure after the stream began ends it with an error event, as vLLM does."""
        rt, n = self.runtime, loop.n
        stops: list[Any] = [None] * n
        rounds: list[list[dict[str, Any]]] = [[] for _ in range(n)]

        def uncut_continued() -> None:  # a straddling stop the loop did not take (min_tokens): stream on
            for k, s in enumerate(loop.seqs):
                if sink.samples[k].cut is not None and s.finish_reason != "stop":
                    sink.uncut(k)

        async def one(req: ChunkRequest) -> list[Decoded]:
            got: dict[int, list[int]] = {k: [] for k in req.seqs}
            fin: dict[int, str | None] = {k: None for k in req.seqs}
            for k in req.seqs:
                sink.chunk_started(k)

            async def on_event(event: Any) -> None:
                if not isinstance(event, dict) or "error" in event:
                    raise _StreamFailed(event)
                if sink.model is None:
                    sink.model = event.get("model")
                for ch in event.get("choices") or []:
                    k = req.seqs[int(ch.get("index", 0))]
                    new = [int(t) for t in ch.get("token_ids") or []]
                    got[k].extend(new)
                    if ch.get("text") or new:
                        await sink.text(k, ch.get("text") or "", new)
                    if ch.get("finish_reason") is not None:
                        fin[k], stops[k] = ch["finish_reason"], ch.get("stop_reason")

            chunk = dict(_chunk_body(body, req, rt.payload(req.state), extra), stream=True)
            failed = await self.inner.events(_COMPLETIONS, chunk, on_event)
            if failed is not None:
                raise _InnerFailed(failed)
            record = rt.record(trainer, req.round, req.state)
            for k in req.seqs:
                rounds[k].append(record)
            return [Decoded(got[k], fin[k]) for k in req.seqs]

        async def decode(reqs: list[ChunkRequest]) -> list[list[Decoded]]:
            uncut_continued()
            done = await asyncio.gather(*(one(r) for r in reqs), return_exceptions=True)  # none left streaming
            for d in done:
                if isinstance(d, BaseException):
                    raise d
            return [d for d in done if not isinstance(d, BaseException)]

        try:
            await arun_chunks(loop, lambda jobs: rt.adapt(trainer, jobs), trainer.fork, decode)
        except (_InnerFailed, _StreamFailed) as exc:
            if not self.out.started:
                if isinstance(exc, _InnerFailed):
                    await self.out.raw(exc.resp)
                else:
                    code = exc.error.get("code") if isinstance(exc.error, dict) else None
                    await self.out.json(code if isinstance(code, int) and 400 <= code < 600 else 500, {"error": exc.error})
                return
            err = exc.error if isinstance(exc, _StreamFailed) else exc.resp.json()
            await sink.error(json.dumps(err)[:2000], 500)
            await self.out.send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        except Exception as exc:
            if not self.out.started:
                raise
            logger.exception("ttadapt: streamed chunked request failed")
            await sink.error(f"ttadapt: {type(exc).__name__}: {exc}", 500)
            await self.out.send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        uncut_continued()
        _add_rounds(summary, rounds)
        for k, s in enumerate(loop.seqs):
            await sink.finish(k, s.finish_reason, stops[k], extra={FIELD: summary} if k == n - 1 else None,
                              tokens=s.tokens)
        await sink.end(prompt_tokens, sum(len(s.tokens) for s in loop.seqs))
        await self.out.send({"type": "http.response.body", "body": b"", "more_body": False})


def _add_rounds(summary: dict[str, Any], rounds: list[list[dict[str, Any]]]) -> None:
    """Each sample's round records: ``rounds`` for one sample, ``samples`` for ``n > 1``."""
    if len(rounds) == 1:
        summary["rounds"] = rounds[0]
    else:
        summary["samples"] = [{"index": k, "rounds": r} for k, r in enumerate(rounds)]


def _cut_at_stop(stop_at: StopStrings, tokens: list[int], before: int, body: dict[str, Any]) -> tuple[str, str | None]:
    """Text and ``stop_reason`` of a sequence the chunk loop ended at a straddling stop, as vLLM reports a stop
    within one request: the text ends before the stop string (at its end with ``include_stop_str_in_output``)."""
    hit = stop_at.find(tokens, before)
    if hit is None:  # only if decoding a prefix of the tokens is not a prefix of their text
        return stop_at.decode(tokens), None
    start, end, stop = hit
    return stop_at.decode(tokens)[: end if body.get("include_stop_str_in_output") else start], stop


def _chunk_body(
    body: dict[str, Any], req: ChunkRequest, payload: list[float | int], extra: dict[str, Any] | None
) -> dict[str, Any]:
    """The inner ``/v1/completions`` body of one chunk: token-id prompt, chunk limits, seed and vector."""
    out = dict(body, prompt=req.context, max_tokens=req.max_tokens, n=len(req.seqs), return_token_ids=True,
               min_tokens=req.min_tokens)
    if req.seed is not None:
        out["seed"] = req.seed
    return _with_payload(out, payload, extra)


def _prefill_only_reason(
    endpoint: str, body: dict[str, Any], spec: RequestSpec, adapts: bool, reasoning_parser: str = ""
) -> str | None:
    """Why this request cannot be re-adapted every ``interval`` tokens (None: it can); ``adapts``: its trainer's;
    ``reasoning_parser``: the server's (chunked chat replies are assembled without vLLM's chat parsing)."""
    cfg = spec.reroute
    assert cfg is not None
    if not adapts:
        return "search rounds=0 (no adaptation)" if spec.trainer == "search" else "steps=0 (no adaptation)"
    if cfg.interval is None:
        return "interval is null (prefill-only requested)"
    max_tokens = _max_tokens(body, endpoint)
    if max_tokens is None:
        return "max_tokens is null (chunked re-adaptation needs a limit: set max_tokens)"
    if not isinstance(max_tokens, int) or max_tokens <= cfg.interval:
        return f"max_tokens ({max_tokens}) <= interval ({cfg.interval}): one chunk"
    for key in _UNCHUNKABLE:
        if body.get(key) not in (None, False):
            return f"'{key}' is not supported with chunked re-adaptation"
    if endpoint == "chat" and reasoning_parser:
        return (f"the server's reasoning parser ({reasoning_parser}) splits chat replies as one request; "
                "use /v1/completions for chunked re-adaptation")
    if endpoint == "chat":
        other = sorted(k for k, v in body.items() if k not in _CHAT_RENDER | _SAMPLING and v not in (None, False))
        if other:
            return f"{other} not supported with chunked re-adaptation of chat completions"
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return "n is not a positive integer"
    return None


# Options a chunk cannot carry: each chunk is its own request, which would restart their state.
_UNCHUNKABLE = ("echo", "logprobs", "top_logprobs", "prompt_logprobs", "best_of", "use_beam_search", "suffix",
                "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                "guided_grammar", "truncate_prompt_tokens")
# Chat fields the rendering (``/tokenize``) consumes, and sampling fields a chunk's completion request takes.
_CHAT_RENDER = frozenset({"messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                          "chat_template", "chat_template_kwargs", "documents", "stream", "stream_options"})
_SAMPLING = frozenset({"model", "max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p", "top_k",
                       "min_p", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
                       "repetition_penalty", "ignore_eos", "min_tokens", "skip_special_tokens",
                       "spaces_between_special_tokens", "include_stop_str_in_output", "logit_bias", "bad_words",
                       "allowed_token_ids", "user", "priority", "cache_salt", "vllm_xargs", "return_token_ids"})
_COMPLETIONS = "/v1/completions"


def _max_tokens(body: dict[str, Any], endpoint: str) -> Any:
    """The request's token limit: chat's ``max_completion_tokens`` (else ``max_tokens``, default none);
    completions' ``max_tokens`` (default vLLM's 16)."""
    if endpoint == "chat":
        limit = body.get("max_completion_tokens")
        return body.get("max_tokens") if limit is None else limit
    return body.get("max_tokens", _DEFAULT_MAX_TOKENS)


def _completion_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A chat body's sampling fields as a completion body (the prompt, as token ids, comes per chunk)."""
    out = {k: v for k, v in body.items() if k in _SAMPLING and k != "max_completion_tokens"}
    out["max_tokens"] = _max_tokens(body, "chat")
    return out


def _as_chat(obj: dict[str, Any], prompt_ids: list[int] | None) -> dict[str, Any]:
    """A completion response (concatenated chunks) in the shape of vLLM's chat completion response."""
    choices = [
        {"index": ch.get("index", k), "message": {"role": "assistant", "content": ch.get("text") or ""},
         "logprobs": None, "finish_reason": ch.get("finish_reason"), "stop_reason": ch.get("stop_reason"),
         **({"token_ids": ch.get("token_ids")} if prompt_ids is not None else {})}
        for k, ch in enumerate(obj["choices"])
    ]
    cid = str(obj.get("id") or uuid.uuid4().hex)
    out = {"id": "chatcmpl-" + cid.removeprefix("cmpl-"), "object": "chat.completion", "created": obj.get("created"),
           "model": obj.get("model"), "choices": choices, "usage": obj.get("usage")}
    if prompt_ids is not None:
        out["prompt_token_ids"] = prompt_ids
    return out


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

    async def events(self, path: str, payload: Any, on_event: Callable[[Any], Awaitable[None]]) -> _Response | None:
        """A streamed call: each server-sent event's JSON to ``on_event`` as it arrives; the response if not 200."""
        body = json.dumps(payload).encode()
        parser, status, headers, chunks = SSEParser(), 500, [], []

        async def send(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = int(message["status"]), list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                data = message.get("body", b"")
                if status != 200:
                    chunks.append(data)
                    return
                for event in parser.feed(data):
                    await on_event(event)

        await self.app(self._scope("POST", path, body), self._receive(body), send)
        return None if status == 200 else _Response(status, headers, b"".join(chunks))

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
