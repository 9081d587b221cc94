"""``ttadapt serve`` end to end: ONE server subprocess for the module (vLLM's OpenAI server + ttadapt's
middleware and logits processor, HF trainer in the API process), driven with a real HTTP client.

Greedy outputs are compared with the HF model patched by ttadapt (``hf_greedy``, ``ttadapt.generate``)
and adapted states with a local ``ttadapt.Rerouter`` by content hash: the server and this process
both adapt in float32 on CPU with one thread, so the states are bit-identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import ttadapt  # noqa: E402
from ttadapt.vllm import Steer, steer_payload  # noqa: E402
from ttadapt.vllm.payload import merge_steer  # noqa: E402

pytestmark = pytest.mark.vllm

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
STARTUP_TIMEOUT = 600.0
API_KEY = "ttadapt-test-key"
# Rerouting settings that change the tiny model's greedy output on its short prompts (the paper preset:
# unguarded Adam, the preset least likely to be retuned).
REROUTE = {"preset": "paper", "steps": 2, "lr": 0.5, "selection": "all", "min_tokens": 1}


@dataclass
class Server:
    url: str
    model: str
    state: Any  # the RouterState registered as "rand"
    log: Path

    def post(
        self, path: str, body: dict[str, Any], timeout: float = 300.0, key: str | None = API_KEY
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        body = {"model": self.model, **body}
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read().decode()
                headers = {k.lower(): v for k, v in resp.headers.items()}
                status = resp.status
        except urllib.error.HTTPError as err:
            raw, status, headers = err.read().decode(), err.code, {k.lower(): v for k, v in err.headers.items()}
        if body.get("stream") and status == 200:
            return status, {"events": _sse(raw)}, headers
        return status, json.loads(raw), headers

    def complete(self, prompt: Any, **kw: Any) -> dict[str, Any]:
        kw.setdefault("max_tokens", 12)
        kw.setdefault("temperature", 0.0)
        kw.setdefault("return_token_ids", True)
        status, obj, _ = self.post("/v1/completions", {"prompt": prompt, **kw})
        assert status == 200, obj
        return obj


def _sse(raw: str) -> list[Any]:
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    return [json.loads(e) for e in events if e != "[DONE]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ttadapt serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"ttadapt serve not ready after {STARTUP_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def handle(hf_model: Any) -> Any:
    return ttadapt.get_handle(hf_model) or ttadapt.patch(hf_model)


def launch(model: str, d: Path, *args: str, state: Any = None) -> Iterator[Server]:
    """Run ``ttadapt serve --model model *args`` (plus the test engine's vLLM options) until closed.

    Shared with test_serve_search.py (``from tests.vllm.test_serve import launch``)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_CPU_OMP_THREADS_BIND="nobind", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "ttadapt.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
        *args,
        # passed through to vLLM:
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8", "--seed", "0", "--api-key", API_KEY,
    ]
    log = d / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url, log)
        yield Server(url=url, model=model, state=state, log=log)
    finally:
        _kill(proc)


@pytest.fixture(scope="module")
def server(vt: Any, handle: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("serve")
    state = vt.random_state(handle, seed=31)
    state.save(d / "rand.safetensors")
    (d / "chat.jinja").write_text(CHAT_TEMPLATE)
    args = ["--state", f"rand={d / 'rand.safetensors'}", "--chat-template", str(d / "chat.jinja")]
    yield from launch(vt.model_path(), d, *args, state=state)


def _config(fields: dict[str, Any]) -> ttadapt.RerouteConfig:
    return ttadapt.RerouteConfig.preset(fields["preset"], **{k: v for k, v in fields.items() if k != "preset"})


def _ids(obj: dict[str, Any], i: int = 0) -> list[int]:
    return obj["choices"][i]["token_ids"]


# ------------------------------------------------------------------------------------ fixed states
def test_plain_completion_equals_hf(server: Server, vt: Any, hf_model: Any) -> None:
    obj = server.complete(vt.PROMPTS[0], ignore_eos=True)
    assert _ids(obj) == vt.hf_greedy(hf_model, vt.PROMPTS[0], 12)
    assert "ttadapt" not in obj  # requests without the field pass through untouched


def test_steer_field_equals_hf_and_the_flat_payload(server: Server, vt: Any, hf_model: Any, handle: Any) -> None:
    p = vt.PROMPTS[1]
    obj = server.complete(p, ignore_eos=True, ttadapt={"steer": {"promote": [5], "bias": 50.0}})
    forced = handle.new_state()
    forced.steer[:, 5] = 50.0
    forced.refresh()
    assert _ids(obj) == vt.hf_greedy(hf_model, p, 12, forced)
    assert _ids(obj) != vt.hf_greedy(hf_model, p, 12), "steering changed nothing: test is vacuous"
    assert obj["ttadapt"]["mode"] == "static" and obj["ttadapt"]["state_hash"] == forced.content_hash()
    flat_payload = steer_payload(promote=[5], num_experts=16, bias=50.0)
    flat = server.complete(p, ignore_eos=True, vllm_xargs={"ttadapt": flat_payload})
    assert _ids(flat) == _ids(obj)
    # Hard forcing (SteerMoE) on two layers, in one request with a soft spec.
    spec = [{"promote": [11], "suppress": [2], "layers": [0, 5], "hard": True},
            {"promote": [3], "layers": [2], "bias": 4.0}]
    hard = server.complete(p, ignore_eos=True, ttadapt={"steer": spec})
    want = merge_steer(merge_steer(handle.new_state(), Steer(promote=[11], suppress=[2], layers=[0, 5], hard=True)),
                       Steer(promote=[3], layers=[2], bias=4.0))
    assert _ids(hard) == vt.hf_greedy(hf_model, p, 12, want)


def test_named_state_equals_hf(server: Server, vt: Any, hf_model: Any) -> None:
    p = vt.PROMPTS[2]
    obj = server.complete(p, ignore_eos=True, ttadapt={"state": "rand"})
    assert obj["ttadapt"]["state"] == "rand" and obj["ttadapt"]["state_hash"] == server.state.content_hash()
    assert _ids(obj) == vt.hf_greedy(hf_model, p, 12, server.state)
    both = server.complete(p, ignore_eos=True, ttadapt={"state": "rand", "steer": {"suppress": [1, 2], "bias": 3.0}})
    assert _ids(both) == vt.hf_greedy(hf_model, p, 12, merge_steer(server.state, Steer(suppress=[1, 2], bias=3.0)))


def test_streaming_carries_the_summary_header(server: Server, vt: Any) -> None:
    body = {"prompt": vt.PROMPTS[3], "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
            "ttadapt": {"steer": {"promote": [7], "bias": 5.0}}}
    status, obj, headers = server.post("/v1/completions", dict(body, stream=True))
    assert status == 200
    assert json.loads(headers["x-ttadapt"])["mode"] == "static"
    streamed = "".join(e["choices"][0]["text"] for e in obj["events"])
    assert streamed == server.complete(**body)["choices"][0]["text"]


# ------------------------------------------------------------------------------------ rerouting
def test_reroute_prefill_equals_hf_with_the_same_state(server: Server, vt: Any, hf_model: Any) -> None:
    p = vt.PROMPTS[0]
    fields = dict(REROUTE, interval=None)
    obj = server.complete(p, ignore_eos=True, ttadapt={"reroute": fields})
    summary = obj["ttadapt"]
    assert summary["mode"] == "prefill" and "interval is null" in summary["reason"]
    cfg = _config(fields)
    state = ttadapt.Rerouter(hf_model, cfg).adapt(torch.tensor([p]))
    assert state.delta.any(), "adaptation did nothing: test is vacuous"
    assert summary["rounds"][0]["state_hash"] == state.content_hash()
    assert summary["rounds"][0]["position"] == len(p)
    assert _ids(obj) == vt.hf_greedy(hf_model, p, 12, state)
    assert _ids(obj) != vt.hf_greedy(hf_model, p, 12), "the adapted state changed nothing: test is vacuous"


def test_reroute_chunked_equals_hf_ttadapt_generate(server: Server, vt: Any, hf_model: Any) -> None:
    p = vt.PROMPTS[2]
    fields = dict(REROUTE, interval=4)
    obj = server.complete(p, max_tokens=10, ttadapt={"reroute": fields})
    summary = obj["ttadapt"]
    assert summary["mode"] == "chunked" and summary["interval"] == 4
    cfg = _config(fields)
    ref = ttadapt.generate(hf_model, torch.tensor([p]), reroute=cfg, max_new_tokens=10, do_sample=False, pad_token_id=1)
    got = _ids(obj)
    assert got == ref[0, len(p):].tolist()
    assert len(summary["rounds"]) == ttadapt.rounds_for(len(got), 4) == 3
    assert len({r["state_hash"] for r in summary["rounds"]}) == 3, "rounds after the first did not re-adapt"
    assert obj["usage"]["completion_tokens"] == len(got) and obj["usage"]["prompt_tokens"] == len(p)
    assert obj["choices"][0]["text"] == _decode(server.model, got)  # chunk texts concatenated


def _stream(server: Server, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    status, obj, headers = server.post(path, dict(body, stream=True))
    assert status == 200, obj
    return obj["events"], headers


def _joined(events: list[dict[str, Any]], n: int = 1, chat: bool = False) -> list[str]:
    """Each sample's streamed text."""
    out = [""] * n
    for e in events:
        for c in e["choices"]:
            out[c["index"]] += (c["delta"].get("content") or "") if chat else c["text"]
    return out


def _streamed_ids(events: list[dict[str, Any]]) -> list[int]:
    return [t for e in events for c in e["choices"] for t in c["token_ids"]]


def _finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for e in events for c in e["choices"] if c["finish_reason"] is not None]


def test_reroute_chunked_ends_at_a_stop_string_straddling_two_chunks(server: Server, vt: Any) -> None:
    p, fields = vt.PROMPTS[2], dict(REROUTE, interval=4)
    ids = _ids(server.complete(p, max_tokens=10, ttadapt={"reroute": fields}))
    head, tail = _decode(server.model, ids[:4]), _decode(server.model, ids[:5])  # chunk 2 starts at token 4
    stop = head[-1:] + tail[len(head):len(head) + 1]
    assert len(ids) == 10 and len(stop) == 2 and stop not in head
    for keep in (False, True):
        body = {"prompt": p, "max_tokens": 10, "temperature": 0.0, "stop": [stop], "include_stop_str_in_output": keep,
                "ttadapt": {"reroute": fields}}
        want = tail[: tail.index(stop) + (len(stop) if keep else 0)]
        obj = server.complete(**body)
        ch = obj["choices"][0]
        assert _ids(obj) == ids[:5] and obj["usage"]["completion_tokens"] == 5
        assert ch["finish_reason"] == "stop" and ch["stop_reason"] == stop and ch["text"] == want
        assert len(obj["ttadapt"]["rounds"]) == 2
        events, _ = _stream(server, "/v1/completions", dict(body, return_token_ids=True))  # the stop's first half
        assert _joined(events) == [want]  # is held back, and so are the ids after the chunk boundary
        assert _streamed_ids(events) == ids[:5] and events[0]["choices"][0]["prompt_token_ids"] == p
        assert [(c["finish_reason"], c["stop_reason"]) for c in _finals(events)] == [("stop", stop)]


def test_reroute_chunked_streams_token_by_token_with_one_id_and_the_summary_last(server: Server, vt: Any) -> None:
    p, fields = vt.PROMPTS[2], dict(REROUTE, interval=4)
    whole = server.complete(p, max_tokens=10, ttadapt={"reroute": fields})
    body = {"prompt": p, "max_tokens": 10, "temperature": 0.0, "stream_options": {"include_usage": True},
            "ttadapt": {"reroute": fields}}
    events, headers = _stream(server, "/v1/completions", body)
    assert _joined(events) == [whole["choices"][0]["text"]]
    assert sum(1 for e in events for c in e["choices"] if c["text"]) > 3  # more events than chunks
    assert len({e["id"] for e in events}) == 1 and events[0]["object"] == "text_completion"
    (final,) = _finals(events)
    assert final["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert json.loads(headers["x-ttadapt"])["mode"] == "chunked"
    (summary,) = [e["ttadapt"] for e in events if "ttadapt" in e]
    assert [r["state_hash"] for r in summary["rounds"]] == [r["state_hash"] for r in whole["ttadapt"]["rounds"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    # n samples: each index streams the text of the same seeded non-streamed request.
    kw = {"prompt": vt.PROMPTS[1], "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 5,
          "ttadapt": {"reroute": fields}}
    both = server.complete(**kw)
    events, _ = _stream(server, "/v1/completions", kw)
    assert _joined(events, 2) == [c["text"] for c in sorted(both["choices"], key=lambda c: c["index"])]
    assert sorted(c["index"] for c in _finals(events)) == [0, 1]


def test_chat_reroute_streams_in_chunks(server: Server) -> None:
    req = {"messages": [{"role": "user", "content": "def fibonacci(n):"}], "max_completion_tokens": 10,
           "temperature": 0.0, "ttadapt": {"reroute": dict(REROUTE, interval=4)}}
    status, chat, _ = server.post("/v1/chat/completions", req)
    assert status == 200, chat
    events, headers = _stream(server, "/v1/chat/completions", dict(req, return_token_ids=True))
    assert _joined(events, chat=True) == [chat["choices"][0]["message"]["content"]]
    ids = server.post("/v1/chat/completions", dict(req, return_token_ids=True))[1]
    assert _streamed_ids(events) == ids["choices"][0]["token_ids"] and len(ids["choices"][0]["token_ids"]) == 10
    assert events[0]["prompt_token_ids"] == ids["prompt_token_ids"]
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(headers["x-ttadapt"])["mode"] == "chunked" and len(_finals(events)) == 1


def _decode(model: str, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).decode(ids, skip_special_tokens=True)


def test_reroute_samples_share_the_prefill_state(server: Server, vt: Any) -> None:
    obj = server.complete(vt.PROMPTS[1], max_tokens=10, n=3, temperature=1.0, seed=11,
                          ttadapt={"reroute": dict(REROUTE, interval=4)})
    samples = obj["ttadapt"]["samples"]
    assert [s["index"] for s in samples] == [0, 1, 2] and len(obj["choices"]) == 3
    assert len({s["rounds"][0]["state_hash"] for s in samples}) == 1
    assert obj["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in obj["choices"])
    again = server.complete(vt.PROMPTS[1], max_tokens=10, n=3, temperature=1.0, seed=11,
                            ttadapt={"reroute": dict(REROUTE, interval=4)})
    assert [c["token_ids"] for c in again["choices"]] == [c["token_ids"] for c in obj["choices"]]  # seeded


def test_an_hf_server_also_adapts_with_the_search_on_request(server: Server, vt: Any) -> None:
    search = {"rounds": 2, "candidates": 3, "min_tokens": 1, "guard": False}
    obj = server.complete(vt.PROMPTS[2], ttadapt={"reroute": {"trainer": "search", "interval": None, "search": search}})
    summary = obj["ttadapt"]
    assert summary["trainer"] == "search" and summary["mode"] == "prefill"
    (record,) = summary["rounds"]
    assert record["position"] == len(vt.PROMPTS[2]) and record["skipped"] is None
    assert record["requests"] == 6 and record["val_nll"] is None  # 2 rounds x 3 candidates; no guard
    assert record["fit_nll"][1] <= record["fit_nll"][0]
    hf = server.complete(vt.PROMPTS[2], ttadapt={"reroute": dict(REROUTE, interval=None)})["ttadapt"]
    assert hf["trainer"] == "hf" and "kept_step" in hf["rounds"][0]  # the server's default stays the HF copy


def test_chat_reroute_is_chunked_on_the_rendered_prompt(server: Server) -> None:
    msgs, fields = [{"role": "user", "content": "def fibonacci(n):"}], dict(REROUTE, interval=4)
    req = {"messages": msgs, "max_completion_tokens": 10, "temperature": 0.0, "ttadapt": {"reroute": fields}}
    status, chat, _ = server.post("/v1/chat/completions", dict(req, return_token_ids=True))
    assert status == 200, chat
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["ttadapt"]["mode"] == "chunked" and len(chat["ttadapt"]["rounds"]) == 3
    status, tok, _ = server.post("/tokenize", {"messages": msgs})
    assert status == 200, tok
    comp = server.complete(tok["tokens"], max_tokens=10, ttadapt={"reroute": fields})  # the same rendered tokens
    (choice,) = chat["choices"]
    assert choice["message"] == {"role": "assistant", "content": comp["choices"][0]["text"]}
    assert choice["token_ids"] == _ids(comp) and chat["prompt_token_ids"] == tok["tokens"]
    assert [r["state_hash"] for r in chat["ttadapt"]["rounds"]] == [r["state_hash"] for r in comp["ttadapt"]["rounds"]]
    assert chat["usage"] == comp["usage"] and choice["finish_reason"] == comp["choices"][0]["finish_reason"]
    # What one chunk cannot carry keeps the prefill-only mode, said in the summary.
    status, pre, _ = server.post("/v1/chat/completions", dict(req, logprobs=True))
    assert status == 200 and pre["ttadapt"]["mode"] == "prefill" and "'logprobs'" in pre["ttadapt"]["reason"]
    assert pre["ttadapt"]["rounds"][0]["state_hash"] == comp["ttadapt"]["rounds"][0]["state_hash"]


# ------------------------------------------------------------------------------------ errors
BAD = {
    "not an object": ({"ttadapt": "rand"}, "'ttadapt' must be an object"),
    "unknown state": ({"ttadapt": {"state": "nope"}}, "unknown state 'nope'; this server has states ['rand']"),
    "huge bias": ({"ttadapt": {"steer": {"promote": [5], "bias": 1e9}}}, "|bias| must be <= 10000"),
    "unknown layer": ({"ttadapt": {"steer": {"promote": [5], "layers": [9]}}}, "layer 9 is not a MoE layer"),
    "wrong type": ({"ttadapt": {"steer": {"promote": "5"}}}, "must be expert ids"),
    "bad reroute field": ({"ttadapt": {"reroute": {"stepz": 2}}}, "unknown 'ttadapt.reroute' fields ['stepz']"),
    "bad reroute value": ({"ttadapt": {"reroute": {"kv_policy": "keep"}}}, "RerouteConfig.kv_policy='keep'"),
    "too many steps": ({"ttadapt": {"reroute": {"steps": 500}}}, "exceeds this server's limit"),
    "unknown trainer": ({"ttadapt": {"reroute": {"trainer": "sgd"}}}, "'ttadapt.reroute.trainer' must be one of"),
    "search knobs for hf": ({"ttadapt": {"reroute": {"search": {"rounds": 1}}}}, "configures the search trainer"),
    "search layer": ({"ttadapt": {"reroute": {"trainer": "search", "search": {"layers": [9]}}}},
                     "[9] are not MoE layers of this model"),
    "two prompts": ({"prompt": ["a", "b"], "ttadapt": {"reroute": "default"}}, "send one request per prompt"),
    "field and xargs": ({"ttadapt": {"state": "rand"}, "vllm_xargs": {"ttadapt": [1, 1, 16, 0, -1] + [0.0] * 16}},
                        "send one of them"),
    # The flat payload is checked by the plugin at admission (vLLM's own 400).
    "flat wrong shape": ({"vllm_xargs": {"ttadapt": [1, 6, 16, 0, 0, 1, 2, 3, 4, 5] + [0.0] * 10}}, "needs 106"),
    "flat unknown layer": ({"vllm_xargs": {"ttadapt": [1, 1, 16, 0, 9] + [0.0] * 16}}, "layers [9] are not MoE layers"),
    "flat huge value": ({"vllm_xargs": {"ttadapt": [1, 1, 16, 0, -1, 1e9] + [0.0] * 15}}, "|bias| must be <= 10000"),
}


def test_unauthorised_requests_are_refused_before_any_ttadapt_work(server: Server, vt: Any) -> None:
    for field in ({"reroute": "default"}, {"state": "nope"}):
        status, obj, _ = server.post("/v1/completions", {"prompt": vt.PROMPTS[0], "ttadapt": field}, key="wrong")
        assert status == 401, obj  # not 400: no schema feedback or state names before the API-key check


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_payload_is_400_and_the_server_keeps_serving(server: Server, vt: Any, name: str) -> None:
    extra, message = BAD[name]
    status, obj, _ = server.post("/v1/completions", {"prompt": vt.PROMPTS[0], "max_tokens": 2, **extra})
    assert status == 400, obj
    assert message in obj["error"]["message"]
    assert obj["error"]["code"] == 400
    assert len(_ids(server.complete(vt.PROMPTS[0], max_tokens=2, ignore_eos=True))) == 2


def test_openai_sdk_extra_body(server: Server, vt: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=300)
    text = "def fibonacci(n):"
    out = client.completions.create(model=server.model, prompt=text, max_tokens=8, temperature=0,
                                    extra_body={"ttadapt": {"state": "rand"}})
    assert out.choices[0].text == server.complete(text, max_tokens=8, ttadapt={"state": "rand"})["choices"][0]["text"]
    assert out.model_extra["ttadapt"]["state"] == "rand"
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0,
        extra_body={"ttadapt": {"reroute": dict(REROUTE, interval=4)}})
    assert chat.model_extra["ttadapt"]["mode"] == "chunked" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 10
    with pytest.raises(openai.BadRequestError, match="unknown state"):
        client.completions.create(model=server.model, prompt=text, max_tokens=2, extra_body={"ttadapt": {"state": "x"}})
