"""``ttadapt serve --trainer search``: rerouting without an HF copy of the model, adapted by the server's
own engine. ONE server subprocess (no HF copy loaded) plus ONE in-process engine for the offline
reference ``ttadapt.vllm.generate(..., trainer="search")``; the server launcher is test_serve.py's.

The context is the first 64 tokens of the shipped KJV snippet (shifted domain), where the search keeps
changes (as in test_search.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")

import ttadapt  # noqa: E402
from ttadapt.vllm import SearchConfig, generate  # noqa: E402
from tests.vllm.test_serve import Server, launch  # noqa: E402
from ttadapt.vllm.trainers import SearchTrainer  # noqa: E402

pytestmark = pytest.mark.vllm

SEARCH = {"rounds": 2, "candidates": 8, "seed": 3}


@pytest.fixture(scope="module")
def server(vt: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from launch(vt.model_path(), tmp_path_factory.mktemp("serve-search"), "--trainer", "search")


@pytest.fixture(scope="module")
def llm(vt: Any, server: Server) -> Iterator[Any]:
    engine = vt.engine()
    yield engine
    vt.shutdown(engine)


@pytest.fixture(scope="module")
def context(vt: Any) -> list[int]:
    from transformers import AutoTokenizer

    from ttadapt.demo import demo_snippets

    tok = AutoTokenizer.from_pretrained(vt.model_path())
    text = next(s["text"] for s in demo_snippets() if s["id"] == "kjv-genesis-1")
    return ([0] + list(tok(text)["input_ids"]))[:64]


def test_chunked_search_equals_offline_generate(server: Server, llm: Any, context: list[int]) -> None:
    obj = server.complete(context, max_tokens=10, ttadapt={"reroute": {"interval": 4, "search": SEARCH}})
    summary = obj["ttadapt"]
    assert summary["trainer"] == "search" and summary["mode"] == "chunked" and summary["interval"] == 4
    trainer = SearchTrainer(llm, SearchConfig(**SEARCH))
    (ref,) = generate(llm, [context], trainer=trainer, reroute=ttadapt.RerouteConfig.preset("default", interval=4),
                      max_tokens=10, sampling={"temperature": 0.0})
    rounds = summary["rounds"]
    assert [r["position"] for r in rounds] == [64, 68, 72]
    assert [r["state_hash"] for r in rounds] == [s.content_hash() for s in ref.states]
    traces = [trainer.traces[(0, c)] for c in range(3)]
    assert [r["kept_round"] for r in rounds] == [t.kept for t in traces]
    assert [r["requests"] for r in rounds] == [t.requests for t in traces] == [16, 16, 16]
    assert any(r["kept_round"] > 0 for r in rounds), "the search kept nothing: test is vacuous"
    assert obj["choices"][0]["token_ids"] == ref.token_ids and len(ref.token_ids) == 10


def test_search_server_has_no_hf_copy_and_refuses_bad_knobs(server: Server, vt: Any) -> None:
    bad = {
        "hf": ({"trainer": "hf"}, "this server was started with --trainer search"),
        "rounds": ({"search": {"rounds": 99}}, "exceeds this server's limit of 16"),
        "sigma": ({"search": {"sigma": 0}}, "SearchConfig.sigma must be a positive finite number"),
    }
    for reroute, message in bad.values():
        status, obj, _ = server.post("/v1/completions", {"prompt": vt.PROMPTS[0], "ttadapt": {"reroute": reroute}})
        assert status == 400 and message in obj["error"]["message"], obj
    # A prompt too short for the search's guard: nothing to adapt, said so, and the plain model decodes.
    obj = server.complete(vt.PROMPTS[0], max_tokens=4, ttadapt={"reroute": {"interval": None}})
    (record,) = obj["ttadapt"]["rounds"]
    assert "fit targets < min_tokens=8" in record["skipped"] and record["requests"] == 0
    assert obj["choices"][0]["token_ids"] == server.complete(vt.PROMPTS[0], max_tokens=4)["choices"][0]["token_ids"]
