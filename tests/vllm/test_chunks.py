"""The chunk loop shared by ``ttadapt.vllm.generate`` and ``ttadapt serve`` (no vLLM: runs everywhere).

A fake trainer records its jobs and forks; a fake decoder makes tokens from the request, so the
schedule (who adapts on what, chunk sizes, seeds, min_tokens, stops) is checked exactly. The same
loop with vLLM: test_generate_n.py, test_search.py (offline) and test_serve.py (HTTP).
"""

from __future__ import annotations

import asyncio

import pytest

from ttadapt.vllm.chunks import ChunkLoop, ChunkRequest, Decoded, StopStrings, arun_chunks, run_chunks
from ttadapt.vllm.trainers import AdaptJob

PROMPTS = [[1, 2, 3], [4, 5]]


class FakeTrainer:
    """Returns the job's (seq, chunk) as its "state"; records jobs and forks."""

    def __init__(self) -> None:
        self.jobs: list[AdaptJob] = []
        self.forks: list[tuple[int, int]] = []

    def adapt(self, jobs: list[AdaptJob]) -> list[tuple[int, int]]:
        self.jobs.extend(jobs)
        return [(j.seq, j.chunk) for j in jobs]

    def fork(self, src: int, dst: int) -> None:
        self.forks.append((src, dst))


class FakeDecoder:
    """Sample ``i`` of a request gets ``max_tokens`` tokens ``100 * seq + position``; sequence 3 stops
    after its first chunk, so it must get no second one."""

    def __init__(self) -> None:
        self.requests: list[ChunkRequest] = []

    def __call__(self, reqs: list[ChunkRequest]) -> list[list[Decoded]]:
        self.requests.extend(reqs)
        out = []
        for r in reqs:
            done = len(r.context) - len(PROMPTS[r.prompt_index])
            out.append([
                Decoded([100 * k + done + t for t in range(r.max_tokens)], "stop" if k == 3 else "length")
                for k in r.seqs
            ])
        return out


def _loop() -> ChunkLoop:
    return ChunkLoop(PROMPTS, n=2, max_tokens=7, interval=3, min_tokens=4, seed=10)


def test_schedule_prefill_once_per_prompt_then_each_sample_alone() -> None:
    loop, trainer, decode = _loop(), FakeTrainer(), FakeDecoder()
    run_chunks(loop, trainer.adapt, trainer.fork, decode)
    # Round 0: one job per prompt (seq i * n), the other sample forked from it, one request with n samples.
    assert [(j.seq, j.chunk, j.context, j.prompt_len) for j in trainer.jobs[:2]] == [
        (0, 0, [1, 2, 3], 3), (2, 0, [4, 5], 2)]
    assert trainer.forks == [(0, 1), (2, 3)]
    first = decode.requests[:2]
    assert [(r.seqs, r.state, r.round, r.max_tokens, r.min_tokens, r.seed) for r in first] == [
        ((0, 1), (0, 0), (0, 0), 3, 3, 10), ((2, 3), (2, 0), (2, 0), 3, 3, 10)]
    # Later rounds: each unfinished sample on its own context; seed + c * n + j; min_tokens over all chunks.
    later = [(r.seqs, r.round, r.max_tokens, r.min_tokens, r.seed) for r in decode.requests[2:]]
    assert later == [
        ((0,), (0, 1), 3, 1, 12), ((1,), (1, 1), 3, 1, 13), ((2,), (2, 1), 3, 1, 12),  # seq 3 stopped
        ((0,), (0, 2), 1, 0, 14), ((1,), (1, 2), 1, 0, 15), ((2,), (2, 2), 1, 0, 14),  # 7 - 6 = 1 token left
    ]
    assert trainer.jobs[2].context == [1, 2, 3, 0, 1, 2] and trainer.jobs[2].prompt_len == 3
    assert [s.tokens for s in loop.seqs] == [[100 * k + t for t in range(7)] for k in range(3)] + [[300, 301, 302]]
    assert [(s.prompt_index, s.sample_index, s.chunks, s.finish_reason) for s in loop.seqs] == [
        (0, 0, 3, "length"), (0, 1, 3, "length"), (1, 0, 3, "length"), (1, 1, 1, "stop")]
    assert loop.jobs() == []


def test_async_driver_runs_the_same_schedule() -> None:
    sync, a_trainer = _loop(), FakeTrainer()
    run_chunks(sync, a_trainer.adapt, a_trainer.fork, FakeDecoder())
    loop, trainer, decode = _loop(), FakeTrainer(), FakeDecoder()

    async def adapt(jobs: list[AdaptJob]) -> list[tuple[int, int]]:
        await asyncio.sleep(0)
        return trainer.adapt(jobs)

    async def adecode(reqs: list[ChunkRequest]) -> list[list[Decoded]]:
        await asyncio.sleep(0)
        return decode(reqs)

    asyncio.run(arun_chunks(loop, adapt, trainer.fork, adecode))
    assert loop.seqs == sync.seqs and trainer.jobs == a_trainer.jobs and trainer.forks == a_trainer.forks


def test_no_interval_is_one_chunk_and_empty_chunks_end_a_sequence() -> None:
    loop, trainer = ChunkLoop([[7, 8]], max_tokens=5, interval=None), FakeTrainer()
    run_chunks(loop, trainer.adapt, trainer.fork, lambda reqs: [[Decoded([1, 2, 3, 4, 5], "length")] for _ in reqs])
    assert len(trainer.jobs) == 1 and loop.seqs[0].tokens == [1, 2, 3, 4, 5] and loop.seqs[0].chunks == 1
    # "length" with no new token (e.g. the context filled the model): no endless re-adaptation.
    loop, trainer = ChunkLoop([[7, 8]], max_tokens=5, interval=2), FakeTrainer()
    run_chunks(loop, trainer.adapt, trainer.fork, lambda reqs: [[Decoded([], "length")] for _ in reqs])
    assert len(trainer.jobs) == 1 and loop.seqs[0].chunks == 1


def test_mismatched_trainer_or_decoder_output_is_an_error() -> None:
    loop = _loop()
    jobs = loop.jobs()
    with pytest.raises(ValueError, match="returned 1 states for 2 jobs"):
        loop.requests([None], lambda s, d: None)  # type: ignore[list-item]
    reqs = loop.requests([None] * len(jobs), lambda s, d: None)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="a chunk request for 2 samples returned 1"):
        loop.decoded(reqs, [[Decoded([1], "length")]] * len(reqs))


# Token t decodes to the t-th letter ("a" = 0), so token lists read as words.
def _letters(tokens: list[int]) -> str:
    return "".join(chr(ord("a") + t) for t in tokens)


def _tok(word: str) -> list[int]:
    return [ord(c) - ord("a") for c in word]


def test_stop_strings_find_the_token_completing_a_straddling_stop() -> None:
    stop = StopStrings(["end", "", "xy"], _letters)
    assert stop(_tok("abcen" + "dxyz"), 5) == 6  # "en|d": keep through "d"
    assert stop(_tok("abcx" + "yzen"), 4) == 5  # the earliest stop ending in the new chunk wins
    assert stop(_tok("endab" + "cd"), 5) is None  # a stop wholly before the chunk is not this chunk's
    assert stop(_tok("abc" + "dfg"), 3) is None
    assert StopStrings([], _letters)(_tok("end"), 1) is None
    assert stop.find(_tok("abcx" + "yzen"), 4) == (3, 5, "xy")  # where it is in the text, for the server's cut
    assert stop.find(_tok("abcen" + "dxyz"), 5) == (3, 6, "end")


def test_a_stop_straddling_two_chunks_ends_the_sequence() -> None:
    text = _tok("abcdeendfghij")  # chunks of 3: "abc" "dee" "ndf" ...: "end" straddles chunks 2 and 3

    def decode(reqs: list[ChunkRequest]) -> list[list[Decoded]]:
        out = []
        for r in reqs:
            done = len(r.context) - 1
            out.append([Decoded(text[done:done + r.max_tokens], "length") for _ in r.seqs])
        return out

    for min_tokens, want, reason in ((0, "abcdeend", "stop"), (9, "abcdeendfghi", "length")):
        loop = ChunkLoop([[0]], max_tokens=12, interval=3, min_tokens=min_tokens,
                         stop_at=StopStrings(["end"], _letters))
        trainer = FakeTrainer()
        run_chunks(loop, trainer.adapt, trainer.fork, decode)
        s = loop.seqs[0]
        assert (_letters(s.tokens), s.finish_reason) == (want, reason)
        assert s.chunks == (3 if reason == "stop" else 4) and loop.jobs() == []


def test_a_straddling_stop_wins_over_a_later_stop_the_decoder_saw() -> None:
    # chunks of 3: "abc" "dee" "ndf" ...; "end" straddles chunks 2 and 3, and the decoder (vLLM) itself
    # stops chunk 3 at "df", a stop it sees within the request: the earlier, straddling one ends the sequence.
    text = _tok("abcdeendfgh")

    def decode(reqs: list[ChunkRequest]) -> list[list[Decoded]]:
        done = len(reqs[0].context) - 1
        part = text[done:done + reqs[0].max_tokens]
        end = _letters(part).find("df")
        return [[Decoded(part[:end + 2], "stop") if end >= 0 else Decoded(part, "length")]]

    trainer = FakeTrainer()
    for stops, want in ((["end", "df"], ("abcdeend", "stop", True, 2)), (["df"], ("abcdeendf", "stop", False, 3))):
        loop = ChunkLoop([[0]], max_tokens=12, interval=3, stop_at=StopStrings(stops, _letters))
        run_chunks(loop, trainer.adapt, trainer.fork, decode)
        s = loop.seqs[0]
        assert (_letters(s.tokens), s.finish_reason, s.straddled, s.last_got) == want, stops
