"""The streamed form of chunked decoding: never streams a stop that straddles chunks, whatever the deltas."""

from __future__ import annotations

import asyncio

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ttadapt.vllm.chunk_stream import ChunkStream, SSEParser
from ttadapt.vllm.chunks import StopStrings

texts = st.text(alphabet="ab", max_size=6)


def _split(draw: st.DrawFn, s: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(s)), max_size=3)))
    return [s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)])]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[list[str]], list[str], bool]:
    chunks = draw(st.lists(texts, min_size=1, max_size=4))
    stops = draw(st.lists(st.text(alphabet="ab", min_size=1, max_size=3), min_size=1, max_size=2))
    assume(not any(s in c for s in stops for c in chunks))  # vLLM itself ends a stop inside one chunk
    return [_split(draw, c) for c in chunks], stops, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(streams())
def test_streamed_text_is_always_a_prefix_and_ends_at_a_straddling_stop(case: tuple[list[list[str]], list[str], bool]) -> None:
    chunks, stops, keep = case
    full = "".join(d for c in chunks for d in c)
    hits = [(i, i + len(s)) for s in stops if (i := full.find(s)) >= 0]
    start, end = min(hits, key=lambda h: (h[1], h[0])) if hits else (len(full), len(full))
    want = full[: end if keep else start]
    sent: list[bytes] = []

    async def emit(data: bytes) -> None:
        sent.append(data)

    def streamed() -> str:
        events = SSEParser().feed(b"".join(sent))
        return "".join(c["text"] for e in events for c in e["choices"])

    async def run() -> None:
        sink = ChunkStream(emit, chat=False, n=1, model="m", stops=stops, include_stop=keep, include_usage=True)
        for chunk in chunks:
            sink.chunk_started(0)
            for delta in chunk:
                await sink.text(0, delta)
                assert want.startswith(streamed())  # nothing past the stop, ever
            if sink.samples[0].cut is not None:
                break  # the chunk loop ends the sample at the stop
        await sink.finish(0, "stop" if hits else "length", None)
        await sink.end(3, 4)

    asyncio.run(run())
    assert streamed() == want
    events = SSEParser().feed(b"".join(sent))
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == (
        ["stop"] if hits else ["length"])
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert b"".join(sent).endswith(b"data: [DONE]\n\n")


@settings(max_examples=300, deadline=None)
@given(streams(), st.data())
def test_streamed_token_ids_never_pass_a_straddling_stop_and_end_as_the_loop_keeps_them(
    case: tuple[list[list[str]], list[str], bool], data: st.DataObject
) -> None:
    # One token per character (id = ord); a delta's ids may come before its text, as when the inner
    # request holds text back for its own stop strings.
    chunks, stops, keep = case
    chat = data.draw(st.booleans())
    full = "".join(d for c in chunks for d in c)
    hits = [i + len(s) for s in stops if (i := full.find(s)) >= 0]
    tokens = [ord(c) for c in full[: min(hits) if hits else len(full)]]  # through the completing token
    stop_at = StopStrings(stops, lambda ids: "".join(map(chr, ids)))
    sent: list[bytes] = []

    async def emit(data: bytes) -> None:
        sent.append(data)

    def events() -> list[dict]:
        return SSEParser().feed(b"".join(sent))

    def streamed_ids() -> list[int]:
        return [t for e in events() for c in e["choices"] for t in c["token_ids"]]

    async def run() -> None:
        sink = ChunkStream(emit, chat=chat, n=1, model="m", stops=stops, include_stop=keep, include_usage=False,
                           prompt_ids=[7, 8], stop_at=stop_at)
        for chunk in chunks:
            sink.chunk_started(0)
            for delta in chunk:
                ids = [ord(c) for c in delta]
                if data.draw(st.booleans()):
                    await sink.text(0, "", ids)
                    await sink.text(0, delta)
                else:
                    await sink.text(0, delta, ids)
                assert tokens[: len(streamed_ids())] == streamed_ids()  # nothing past the stop, ever
            if sink.samples[0].cut is not None:
                break
        await sink.finish(0, "stop" if hits else "length", None, tokens=tokens)
        await sink.end(3, 4)

    asyncio.run(run())
    assert streamed_ids() == tokens
    holders = [e if chat else c for e in events() for c in e["choices"][:1] if "prompt_token_ids" in (e if chat else c)]
    first = events()[0]
    assert len(holders) == 1 and holders[0] == (first if chat else first["choices"][0])  # once, on the first event
    assert holders[0]["prompt_token_ids"] == [7, 8]


def test_sse_parser_takes_events_split_anywhere() -> None:
    raw = b'data: {"a": 1}\n\n: comment\n\ndata: {"b": "x\\ny"}\n\ndata: [DONE]\n\n'
    for cut in range(len(raw) + 1):
        p = SSEParser()
        assert p.feed(raw[:cut]) + p.feed(raw[cut:]) == [{"a": 1}, {"b": "x\ny"}]
