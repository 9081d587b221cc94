"""The client's event stream of a streamed request that ``ttadapt serve`` decodes in chunks.

Each chunk is its own inner vLLM request, streamed token by token; this module turns their events
into one OpenAI-style stream per request: one id, indices of the request's samples, no finish reason
until a sample really ends, usage once at the end. vLLM holds back text that could begin a stop
string only within a request, so a stop string straddling two chunks would be streamed before it is
seen: every sample's last ``max(len(stop)) - 1`` characters are held until more text shows they
cannot start one, and a stop found across a chunk boundary ends the sample there (the chunk loop
cuts its tokens at the same place). With ``return_token_ids``, token ids stream as vLLM streams them
(a delta per event, the prompt's ids on the first event), except that a chunk's first tokens wait
while a stop could still straddle its boundary, so no id past a straddling stop is ever sent.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ttadapt.vllm.chunks import StopAt

__all__ = ["ChunkStream", "SSEParser"]

Emit = Callable[[bytes], Awaitable[None]]


class SSEParser:
    """Incremental parser of ``data: <json>`` server-sent events (``[DONE]`` and comments are dropped)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        *events, self._buf = self._buf.split(b"\n\n")
        out = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload and payload != b"[DONE]":
                        out.append(json.loads(payload))
        return out


@dataclass
class _Sample:
    received: str = ""  # every character the inner requests streamed for this sample
    emitted: int = 0  # how many of them went to the client
    bounds: list[int] = field(default_factory=list)  # offsets in ``received`` where a later chunk began
    cut: tuple[int, int, str] | None = None  # (start, end, stop) of a stop straddling a chunk boundary
    started: bool = False  # the first event (chat: with the role) went out
    ids: list[int] = field(default_factory=list)  # every token id the inner requests streamed
    ids_sent: int = 0
    chunk_ids: int = 0  # where the current chunk's ids begin in ``ids``
    cut_ids: int | None = None  # ids to keep through the token completing ``cut`` (None: unknown)


class ChunkStream:
    """One streamed response over the chunks of a request with ``n`` samples (``chat``: chat-chunk events).

    ``prompt_ids`` (``return_token_ids``): stream token ids too; ``stop_at`` (the chunk loop's rule) then
    says how many ids to keep when a stop straddles a chunk boundary.
    """

    def __init__(
        self, emit: Emit, *, chat: bool, n: int, model: Any, stops: Sequence[str], include_stop: bool,
        include_usage: bool, prompt_ids: list[int] | None = None, stop_at: StopAt | None = None,
    ) -> None:
        self.emit = emit
        self.chat = chat
        self.model = model
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.include_stop = include_stop
        self.include_usage = include_usage
        self.prompt_ids = prompt_ids
        self.stop_at = stop_at
        self.samples = [_Sample() for _ in range(n)]
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    # ------------------------------------------------------------------ inner events
    def chunk_started(self, k: int) -> None:
        """Sample ``k``'s next text comes from a new chunk (a boundary a stop may straddle)."""
        s = self.samples[k]
        if s.received:
            s.bounds.append(len(s.received))
        s.chunk_ids = len(s.ids)

    async def text(self, k: int, text: str, ids: Sequence[int] = ()) -> None:
        """Text (and token ids) of sample ``k`` from its current chunk: emit what can no longer be part of a
        straddling stop."""
        s = self.samples[k]
        s.ids.extend(ids)
        before = len(s.received)
        s.received += text
        if s.cut is None and s.bounds:
            s.cut = self._straddling(s, before)
            if s.cut is not None and self.stop_at is not None and self.prompt_ids is not None:
                s.cut_ids = self.stop_at(s.ids, s.chunk_ids)  # the completing token came with (or before) its text
        if s.cut is not None:
            upto = s.cut[1] if self.include_stop else s.cut[0]
        else:
            upto = len(s.received) - self.hold
        await self._send(k, upto)

    def uncut(self, k: int) -> None:
        """The chunk loop went on with sample ``k`` despite its stop (``min_tokens``): stream on."""
        self.samples[k].cut = self.samples[k].cut_ids = None

    async def finish(
        self, k: int, finish_reason: str | None, stop_reason: Any, extra: dict[str, Any] | None = None,
        tokens: Sequence[int] | None = None,
    ) -> None:
        """Sample ``k`` ended: the rest of its text (to its stop, if one straddled chunks) and its finish reason;
        ``tokens``: its final token ids (the chunk loop's), whose unsent rest goes with this event."""
        s = self.samples[k]
        if s.cut is not None and finish_reason == "stop":
            upto, stop_reason = (s.cut[1] if self.include_stop else s.cut[0]), s.cut[2]
        else:
            upto = len(s.received)
        if tokens is not None:
            s.ids = list(tokens)
        await self._send(k, upto, finish_reason=finish_reason, stop_reason=stop_reason, final=True, extra=extra)

    async def end(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The usage event (only with ``stream_options.include_usage``, as vLLM), then the end of the stream."""
        if self.include_usage:
            await self._event({
                "id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })
        await self.emit(b"data: [DONE]\n\n")

    async def error(self, message: str, code: int) -> None:
        """An inner request failed after the stream began: an error event (vLLM's form), then the end."""
        await self._event({"error": {"message": message, "type": "BadRequestError", "code": code}})
        await self.emit(b"data: [DONE]\n\n")

    # ------------------------------------------------------------------ helpers
    def _straddling(self, s: _Sample, before: int) -> tuple[int, int, str] | None:
        """The earliest stop ending in the new text that spans a chunk boundary (vLLM saw the others)."""
        hits = []
        for stop in self.stops:
            i = s.received.find(stop, max(0, before - len(stop) + 1))
            while i >= 0:
                end = i + len(stop)
                if any(i < b < end for b in s.bounds):
                    hits.append((i, end, stop))
                    break
                i = s.received.find(stop, i + 1)
        return min(hits, key=lambda h: (h[1], h[0])) if hits else None

    def _safe_ids(self, s: _Sample) -> int:
        """How many of ``s.ids`` cannot lie past a stop straddling the current chunk's boundary."""
        if not self.stops or not s.bounds:
            return len(s.ids)
        if s.cut is not None:  # ids through the token completing the stop (as the chunk loop keeps them)
            return min(len(s.ids), s.cut_ids) if s.cut_ids is not None else s.chunk_ids
        # A straddling stop ends within ``hold`` characters of the boundary: past that, none can come.
        return len(s.ids) if len(s.received) - s.bounds[-1] >= self.hold else s.chunk_ids

    async def _send(
        self, k: int, upto: int, *, finish_reason: str | None = None, stop_reason: Any = None, final: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        s = self.samples[k]
        text = s.received[s.emitted:upto] if upto > s.emitted else ""
        ids: list[int] = []
        if self.prompt_ids is not None:
            safe = len(s.ids) if final else self._safe_ids(s)
            ids, s.ids_sent = s.ids[s.ids_sent:safe], max(s.ids_sent, safe)
        if not text and not ids and not final:
            return
        s.emitted = max(s.emitted, upto)
        first = not s.started
        s.started = True
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice: dict[str, Any] = {"index": k, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": k, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if final:
            choice["stop_reason"] = stop_reason
        event = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": [choice]}
        if self.prompt_ids is not None:  # as vLLM: ids per choice; the prompt's on its first event (chat: top level)
            choice["token_ids"] = ids
            if first:
                (event if self.chat else choice)["prompt_token_ids"] = self.prompt_ids
        if extra:
            event.update(extra)
        await self._event(event)

    async def _event(self, event: dict[str, Any]) -> None:
        await self.emit(b"data: " + json.dumps(event).encode() + b"\n\n")
