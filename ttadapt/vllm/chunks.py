"""The chunk loop of online rerouting, shared by ``ttadapt.vllm.generate`` and ``ttadapt serve``.

A request's router vector is fixed for its lifetime, so rerouting decodes in chunks: adapt every
prompt on itself, decode ``interval`` tokens (``n`` samples per prompt in one request, sharing that
state), re-adapt every unfinished sample on its whole context, decode its next chunk, and so on until
each sample stops or reaches ``max_tokens``. :class:`ChunkLoop` holds that schedule and nothing about
transport: it hands out the adaptation jobs of a round and the chunk requests to decode under their
states, and takes back what was decoded. :func:`run_chunks` (``LLM.generate``) and
:func:`arun_chunks` (the server's inner HTTP app) drive it with a trainer and a decoder.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ttadapt.vllm.trainers import AdaptJob

if TYPE_CHECKING:
    from ttadapt.state import RouterState

__all__ = [
    "ChunkLoop", "ChunkRequest", "ChunkSeq", "Decoded", "StopStrings", "arun_chunks", "chunk_min_tokens", "chunk_seed",
    "continues", "run_chunks",
]

Fork = Callable[[int, int], None]
#: ``stop_at(tokens, before)``: how many of a sequence's ``tokens`` to keep when a stop ends after ``tokens[:before]``.
StopAt = Callable[[list[int], int], "int | None"]


@dataclass(frozen=True)
class ChunkRequest:
    """Decode the next chunk of ``context`` under ``state``: one sample per entry of ``seqs``, in order."""

    context: list[int]
    state: RouterState
    seqs: tuple[int, ...]  # the sequences these samples continue (several only in the first chunk)
    prompt_index: int
    round: tuple[int, int]  # (seq, chunk) of the adaptation job that produced ``state``
    max_tokens: int
    min_tokens: int
    seed: int | None  # the first chunk's ``n`` samples get ``seed + j`` from vLLM itself


@dataclass(frozen=True)
class Decoded:
    """One sample of a decoded chunk: its new tokens and why it stopped."""

    token_ids: list[int]
    finish_reason: str | None


@dataclass
class ChunkSeq:
    """One generated sequence: sample ``sample_index`` of prompt ``prompt_index``."""

    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    chunks: int = 0
    last_got: int = 0  # tokens of its last chunk
    straddled: bool = False  # ended by ``stop_at`` at a stop straddling two chunks (not by the decoder)


class ChunkLoop:
    """The schedule of chunked decoding with re-adaptation; sequence ``i * n + j`` is sample ``j`` of prompt ``i``.

    ``interval=None`` decodes everything in one chunk after the prefill round (no re-adaptation).
    ``min_tokens`` counts over all chunks; chunk ``c > 0`` of sample ``j`` is seeded ``seed + c * n + j``.
    ``stop_at`` (e.g. :class:`StopStrings`) ends a sequence when a stop that the decoder could not see, one
    straddling two chunks, ends in its last chunk before the decoder stopped.
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        interval: int | None,
        n: int = 1,
        min_tokens: int = 0,
        seed: int | None = None,
        stop_at: StopAt | None = None,
    ) -> None:
        if max_tokens < 1 or n < 1 or (interval is not None and interval < 1):
            raise ValueError(f"need max_tokens, n >= 1 and interval None or >= 1; got {max_tokens}, {n}, {interval}")
        self.prompts = [list(p) for p in prompts]
        self.n = n
        self.max_tokens = max_tokens
        self.interval = interval
        self.min_tokens = min_tokens
        self.seed = seed
        self.stop_at = stop_at
        self.seqs = [ChunkSeq(prompt_index=i, sample_index=j) for i in range(len(self.prompts)) for j in range(n)]
        self._chunk = 0  # number of the next chunk
        self._jobs: list[AdaptJob] = []

    def jobs(self) -> list[AdaptJob]:
        """The adaptation jobs before the next chunk: one per prompt first, then one per unfinished
        sequence (on its prompt + tokens so far); empty when every sequence is done."""
        if self._chunk == 0:
            self._jobs = [
                AdaptJob(seq=i * self.n, context=p, prompt_len=len(p), chunk=0) for i, p in enumerate(self.prompts)
            ]
        else:
            self._jobs = [
                AdaptJob(seq=k, context=self.prompts[s.prompt_index] + s.tokens,
                         prompt_len=len(self.prompts[s.prompt_index]), chunk=self._chunk)
                for k, s in enumerate(self.seqs) if self._continues(s)
            ]
        return self._jobs

    def requests(self, states: Sequence[RouterState], fork: Fork) -> list[ChunkRequest]:
        """The chunk requests under the states of :meth:`jobs`, in order; in the first round ``fork(src, dst)``
        gives each prompt's other samples the trainer's warm start of its first sample."""
        if len(states) != len(self._jobs):
            raise ValueError(f"the trainer returned {len(states)} states for {len(self._jobs)} jobs")
        out = []
        for job, state in zip(self._jobs, states):
            if self._chunk == 0:
                seqs = tuple(range(job.seq, job.seq + self.n))
                for dst in seqs[1:]:
                    fork(job.seq, dst)
                seed = self.seed
            else:
                seqs = (job.seq,)
                seed = chunk_seed(self.seed, self._chunk, self.n, self.seqs[job.seq].sample_index)
            done = len(job.context) - job.prompt_len
            size = self.max_tokens - done if self.interval is None else min(self.interval, self.max_tokens - done)
            out.append(ChunkRequest(
                context=job.context, state=state, seqs=seqs, prompt_index=self.seqs[job.seq].prompt_index,
                round=(job.seq, job.chunk), max_tokens=size, min_tokens=chunk_min_tokens(self.min_tokens, done, size),
                seed=seed,
            ))
        return out

    def decoded(self, requests: Sequence[ChunkRequest], outputs: Sequence[Sequence[Decoded]]) -> None:
        """Take what ``requests`` decoded (one :class:`Decoded` per sequence of each request, in order)."""
        for req, samples in zip(requests, outputs, strict=True):
            if len(samples) != len(req.seqs):
                raise ValueError(f"a chunk request for {len(req.seqs)} samples returned {len(samples)}")
            for k, o in zip(req.seqs, samples):
                s = self.seqs[k]
                before = len(s.tokens)
                s.tokens.extend(o.token_ids)
                s.finish_reason = o.finish_reason
                s.last_got = len(o.token_ids)
                s.chunks += 1
                if self.stop_at is not None and before and o.token_ids and o.finish_reason in ("length", "stop"):
                    # A straddling stop ends the sequence unless the decoder stopped earlier on its own.
                    keep = self.stop_at(s.tokens, before)
                    if keep is not None and keep >= self.min_tokens and (o.finish_reason == "length" or keep < len(s.tokens)):
                        del s.tokens[keep:]
                        s.finish_reason, s.last_got, s.straddled = "stop", keep - before, True
        self._chunk += 1

    def _continues(self, s: ChunkSeq) -> bool:
        return continues(s.finish_reason, len(s.tokens), self.max_tokens, s.last_got)


class StopStrings:
    """Stop strings that straddle two chunks: each chunk is its own vLLM request, which sees only its own text.

    Called with a sequence's tokens and the count before its last chunk, it returns the number of tokens
    up to the one that completes the earliest stop ending in that chunk (vLLM's rule within a request), or None.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stops = [s for s in stops if s]
        self.decode = decode

    def __call__(self, tokens: list[int], before: int) -> int | None:
        hit = self.find(tokens, before)
        if hit is None:
            return None
        end = hit[1]
        return next((k for k in range(before + 1, len(tokens)) if len(self.decode(tokens[:k])) >= end), len(tokens))

    def find(self, tokens: list[int], before: int) -> tuple[int, int, str] | None:
        """The earliest stop (by end) that ends after the text of ``tokens[:before]``: (start, end, stop) in
        the text of ``tokens``, or None."""
        if not self.stops:
            return None
        text, old = self.decode(tokens), len(self.decode(tokens[:before]))
        hits = [(i, i + len(s), s) for s in self.stops if (i := text.find(s, max(0, old - len(s) + 1))) >= 0]
        return min(hits, key=lambda h: (h[1], h[0])) if hits else None


Decode = Callable[[list[ChunkRequest]], list[list[Decoded]]]
AsyncDecode = Callable[[list[ChunkRequest]], Awaitable[list[list[Decoded]]]]


def run_chunks(
    loop: ChunkLoop, adapt: Callable[[list[AdaptJob]], list[RouterState]], fork: Fork, decode: Decode
) -> None:
    """Run ``loop`` to the end: adapt a round's jobs, decode their chunks (all in one call), repeat."""
    while jobs := loop.jobs():
        reqs = loop.requests(adapt(jobs), fork)
        loop.decoded(reqs, decode(reqs))


async def arun_chunks(
    loop: ChunkLoop, adapt: Callable[[list[AdaptJob]], Awaitable[list[RouterState]]], fork: Fork, decode: AsyncDecode
) -> None:
    """:func:`run_chunks` with an awaitable trainer and decoder (``ttadapt serve``)."""
    while jobs := loop.jobs():
        reqs = loop.requests(await adapt(jobs), fork)
        loop.decoded(reqs, await decode(reqs))


def chunk_seed(seed: int | None, chunk: int, n: int, sample: int) -> int | None:
    """Seed of chunk ``chunk`` (0 = first) of sample ``sample`` of ``n``; chunk 0 is vLLM's own ``seed + sample``."""
    return None if seed is None else seed + chunk * n + sample


def chunk_min_tokens(min_tokens: int, done: int, chunk: int) -> int:
    """``min_tokens`` of a chunk of length ``chunk`` after ``done`` tokens (the minimum counts over all chunks)."""
    return max(0, min(chunk, min_tokens - done))


def continues(finish_reason: str | None, produced: int, max_tokens: int, last_got: int) -> bool:
    """Whether a sequence gets another chunk: its last chunk ran out of length, not tokens or a stop."""
    return finish_reason == "length" and produced < max_tokens and last_got > 0
