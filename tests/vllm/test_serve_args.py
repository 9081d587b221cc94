"""``ttadapt serve`` without vLLM: the command line split, the ``ttadapt`` request schema and the state
a request builds (trainer-less runtime). Runs in CI without vLLM; the server itself: test_serve.py."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from ttadapt.config import RerouteConfig
from ttadapt.state import RouterState
from ttadapt.vllm.http_schema import RequestError, RequestSpec, parse_request
from ttadapt.vllm.payload import Layout, Steer, decode
from ttadapt.vllm.runtime import ServeConfig, ServerRuntime
from ttadapt.vllm.search import SearchConfig
from ttadapt.vllm.trainers import AdaptJob
from ttadapt.vllm.serve import parse_args, resolve_vllm_name
from ttadapt.vllm.server import _prefill_only_reason

LAYOUT = Layout(layer_ids=(1, 2, 4), num_experts=8)


def test_importing_the_server_modules_does_not_import_vllm() -> None:
    code = (
        "import sys, ttadapt.cli, ttadapt.vllm.serve, ttadapt.vllm.server, ttadapt.vllm.runtime, "
        "ttadapt.vllm.http_schema; assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------------------ command line
def test_serve_args_split_and_defaults(tmp_path) -> None:
    config, vargs = parse_args([
        "--model", "m", "--port", "9001", "--state", f"code={tmp_path}/a.safetensors", "--trainer", "none",
        "--dtype", "float32", "--max-model-len", "512",
    ])
    assert config == ServeConfig(model="m", trainer="none", states={"code": f"{tmp_path}/a.safetensors"})
    assert vargs == [
        "--model", "m", "--port", "9001", "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
    ]
    assert ServeConfig.from_json(config.to_json()) == config


def test_serve_trainer_choices() -> None:
    assert parse_args(["--model", "m"])[0].trainer == "hf"
    assert parse_args(["--model", "m", "--trainer", "search"])[0].trainer == "search"
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--trainer", "adam"])


def test_serve_respects_an_explicit_eager_choice() -> None:
    _, vargs = parse_args(["--model", "m", "--no-enforce-eager", "--host", "0.0.0.0"])
    assert "--enforce-eager" not in vargs and "--no-enforce-eager" in vargs
    _, vargs = parse_args(["--model", "m", "--enforce_eager"])
    assert vargs.count("--enforce-eager") + vargs.count("--enforce_eager") == 1


@pytest.mark.parametrize("spec, message", [("code", "NAME=FILE"), ("=x", "NAME=FILE"), ("a=", "NAME=FILE")])
def test_serve_rejects_bad_state_specs(spec: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        parse_args(["--model", "m", "--state", spec])
    with pytest.raises(SystemExit, match="given twice"):
        parse_args(["--model", "m", "--state", "a=x", "--state", "a=y"])


def _fake_modules(monkeypatch: pytest.MonkeyPatch, **modules: dict) -> None:
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(mod, k, v)
        monkeypatch.setitem(sys.modules, name, mod)


def test_vllm_server_names_follow_the_first_layout_that_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM 0.33 moved make_arg_parser (launchers.cli_args -> common.cli_args): the newest layout wins,
    # a missing module or a module without the name falls through to the next.
    new, old = "fakevllm_new.cli_args", "fakevllm_old.cli_args"
    _fake_modules(monkeypatch, **{new: {"make_arg_parser": "new"}, old: {"make_arg_parser": "old"}})
    assert resolve_vllm_name("make_arg_parser", (new, old)) == "new"
    assert resolve_vllm_name("make_arg_parser", ("fakevllm_gone.cli_args", old)) == "old"
    _fake_modules(monkeypatch, **{new: {}})
    assert resolve_vllm_name("make_arg_parser", (new, old)) == "old"
    with pytest.raises(ImportError, match=r"make_arg_parser was not found.*fakevllm_new\.cli_args \(no make_arg_parser\)"
                       r".*fakevllm_gone\.cli_args"):
        resolve_vllm_name("make_arg_parser", (new, "fakevllm_gone.cli_args"))


# ------------------------------------------------------------------------------------ request schema
def _parse(field: object, **kw: object) -> RequestSpec:
    kw.setdefault("states", ("code",))
    kw.setdefault("trainers", ("hf", "search"))
    return parse_request({"ttadapt": field}, **kw)  # type: ignore[arg-type]


def test_schema_accepts_the_documented_forms() -> None:
    spec = _parse({"state": "code", "steer": {"promote": [5], "bias": 4.0}, "reroute": {"preset": "fast", "steps": 1}})
    assert spec.state == "code"
    assert spec.steers == (Steer(promote=(5,), bias=4.0),)
    assert spec.reroute == RerouteConfig.preset("fast", steps=1)
    assert _parse({"reroute": "paper"}).reroute == RerouteConfig.preset("paper")
    assert _parse({"reroute": True}).reroute == RerouteConfig.preset("default")
    two = _parse({"steer": [{"promote": 1, "layers": [2]}, {"suppress": [3], "hard": True}]}).steers
    assert two == (Steer(promote=1, layers=(2,)), Steer(suppress=(3,), hard=True))
    assert _parse({"reroute": {"interval": None, "layers": [1, 2], "selection": "explicit"}}).reroute.layers == (1, 2)


def test_schema_picks_the_trainer_and_its_search_knobs() -> None:
    hf = _parse({"reroute": "fast"})
    assert (hf.trainer, hf.search) == ("hf", None)  # the server's default trainer, no search knobs
    spec = _parse({"reroute": {"trainer": "search", "interval": 4, "search": {"rounds": 2, "layers": [1, 4]}}})
    assert spec.trainer == "search" and spec.reroute.interval == 4
    assert spec.search == SearchConfig(rounds=2, layers=(1, 4))
    default = _parse({"reroute": "default"}, trainers=("search",))  # a --trainer search server
    assert (default.trainer, default.search) == ("search", SearchConfig())


BAD_FIELDS = {
    "not an object": ("code", "must be an object"),
    "unknown key": ({"stat": "code"}, r"unknown 'ttadapt' keys \['stat'\]"),
    "empty": ({}, "give at least one of"),
    "unknown state": ({"state": "nope"}, r"unknown state 'nope'; this server has states \['code'\]"),
    "state type": ({"state": 1}, "must be the name of a registered state"),
    "steer type": ({"steer": 5}, "must be an object with fields"),
    "steer field": ({"steer": {"promote": [1], "boost": 2}}, r"unknown 'ttadapt.steer' fields \['boost'\]"),
    "expert ids type": ({"steer": {"promote": "five"}}, "must be expert ids"),
    "bias type": ({"steer": {"promote": [1], "bias": "big"}}, "must be a finite number"),
    "hard type": ({"steer": {"promote": [1], "hard": 1}}, "must be true or false"),
    "no experts": ({"steer": {"layers": "all"}}, "needs \"promote\" and/or \"suppress\""),
    "reroute type": ({"reroute": 3}, "must be a preset name"),
    "unknown preset": ({"reroute": "turbo"}, "unknown reroute preset 'turbo'"),
    "reroute field": ({"reroute": {"stepz": 2}}, r"unknown 'ttadapt.reroute' fields \['stepz'\]"),
    "reroute field type": ({"reroute": {"steps": "2"}}, "'ttadapt.reroute.steps' must be an integer"),
    "reroute bool type": ({"reroute": {"guard": "no"}}, "'ttadapt.reroute.guard' must be true/false"),
    "reroute value": ({"reroute": {"selection": "best"}}, "RerouteConfig.selection='best'"),
    "reroute range": ({"reroute": {"lr": -1}}, "lr must be a positive"),
    "too many steps": ({"reroute": {"steps": 100}}, "exceeds this server's limit of 16"),
    "unknown trainer": ({"reroute": {"trainer": "adam"}}, r"reroute.trainer' must be one of \['hf', 'search'\]"),
    "search knobs for hf": ({"reroute": {"search": {"rounds": 1}}}, "configures the search trainer, but this request "
                            "uses 'hf'"),
    "search type": ({"reroute": {"trainer": "search", "search": 2}}, "must be an object of SearchConfig fields"),
    "search field": ({"reroute": {"trainer": "search", "search": {"round": 1}}},
                     r"unknown 'ttadapt.reroute.search' fields \['round'\]"),
    "search field type": ({"reroute": {"trainer": "search", "search": {"rounds": 1.5}}},
                          "'ttadapt.reroute.search.rounds' must be an integer"),
    "search value": ({"reroute": {"trainer": "search", "search": {"candidates": 1}}},
                     "SearchConfig.candidates must be an int >= 2"),
    "too many rounds": ({"reroute": {"trainer": "search", "search": {"rounds": 17}}},
                        "'ttadapt.reroute.search.rounds' = 17 exceeds this server's limit of 16"),
    "too many candidates": ({"reroute": {"trainer": "search", "search": {"candidates": 65}}},
                            "'ttadapt.reroute.search.candidates' = 65 exceeds the limit of 64"),
}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_schema_rejects_with_the_fix(name: str) -> None:
    field, message = BAD_FIELDS[name]
    with pytest.raises(RequestError, match=message) as info:
        _parse(field, max_steps=16)
    assert info.value.status == 400
    assert info.value.param.startswith("ttadapt")


def test_schema_reroute_needs_a_trainer_and_one_payload_source() -> None:
    with pytest.raises(RequestError, match="started with --trainer none; restart it with `ttadapt serve --trainer hf`"):
        _parse({"reroute": "default"}, trainers=())
    with pytest.raises(RequestError, match="'hf' needs the server's HF copy of the model, but this server was started "
                       "with --trainer search"):
        _parse({"reroute": {"trainer": "hf"}}, trainers=("search",))
    with pytest.raises(RequestError, match="send one of them"):
        parse_request({"ttadapt": {"state": "code"}, "vllm_xargs": {"ttadapt": [1, 1, 8, 0, -1] + [0.0] * 8}},
                      states=("code",))


def test_logits_processor_on_an_unsupported_vllm_names_the_supported_releases(tmp_path) -> None:
    # vLLM 0.34 removed the V1 logits-processor module: loading ours by name (--logits-processors) must say
    # which vLLM releases are supported, not fail on a missing vLLM module.
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.34.0"\n')
    code = (
        "from ttadapt.vllm.plugin import PluginUnavailableError\n"
        "try:\n    import ttadapt.vllm.logits_processor\n"
        "except PluginUnavailableError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "supports vLLM 0.32-0.33" in proc.stdout and "0.34.0 is installed" in proc.stdout


def test_chunked_chat_stays_prefill_only_under_a_reasoning_parser() -> None:
    # Chunks are completions assembled by ttadapt, so vLLM's chat parsing (reasoning_content) would be
    # skipped: with a reasoning parser on the server, chat falls back to prefill-only; completions do not.
    spec = RequestSpec(reroute=RerouteConfig.preset("paper", interval=4), trainer="hf")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10}
    assert _prefill_only_reason("chat", chat, spec, True) is None
    why = _prefill_only_reason("chat", chat, spec, True, reasoning_parser="qwen3")
    assert why is not None and "qwen3" in why and "/v1/completions" in why
    assert _prefill_only_reason("completions", {"prompt": "hi", "max_tokens": 10}, spec, True, "qwen3") is None


# ------------------------------------------------------------------------------------ request state
def _runtime(trainer: str = "none") -> ServerRuntime:
    g = torch.Generator().manual_seed(0)
    code = RouterState(layer_ids=(1, 2, 4), num_experts=8, delta=torch.randn(3, 8, generator=g),
                       steer=torch.zeros(3, 8), force=torch.zeros(3, 8, dtype=torch.int8))
    return ServerRuntime(ServeConfig(model="m", trainer=trainer), LAYOUT, {"code": code}, None, None)


def test_runtime_builds_the_payload_of_state_plus_steer() -> None:
    rt = _runtime()
    steers = [{"promote": [5], "layers": [2], "bias": 3.0}, {"suppress": 0, "hard": True}]
    spec = _parse({"state": "code", "steer": steers})
    state = rt.base_state(spec)
    p = decode(rt.payload(state), LAYOUT)
    want = rt.states["code"].delta.clone()
    want[1, 5] += 3.0
    assert torch.equal(torch.from_numpy(p.bias), want)
    assert p.force is not None and (p.force[:, 0] == -1).all() and p.force[:, 1:].sum() == 0
    assert torch.equal(rt.states["code"].steer, torch.zeros(3, 8)), "the registered state was modified"


def test_runtime_folds_a_named_delta_into_steer_for_reroute() -> None:
    rt = _runtime()
    static = rt.base_state(_parse({"state": "code"}))
    folded = rt.base_state(_parse({"state": "code", "reroute": "default"}))
    assert not folded.delta.any() and torch.equal(folded.steer, rt.states["code"].delta)
    assert rt.payload(static) == rt.payload(folded)  # the same vector reaches vLLM


@pytest.mark.parametrize("steer, message", [
    ({"promote": [5], "layers": [3]}, "layer 3 is not a MoE layer; MoE layers are"),
    ({"promote": [8]}, r"expert ids \[8\] out of range: experts are 0..7"),
    ({"promote": [1], "suppress": [1]}, "both promoted and suppressed"),
    ({"promote": [1], "bias": 1e9}, r"\|bias\| must be <= 10000"),
])
def test_runtime_rejects_steering_the_model_cannot_take(steer: dict, message: str) -> None:
    rt = _runtime()
    with pytest.raises(RequestError, match=message):
        rt.payload(rt.base_state(_parse({"steer": steer})))
    with pytest.raises(RequestError, match="restart with `ttadapt serve --trainer hf` or `--trainer search`"):
        spec = RequestSpec(reroute=RerouteConfig.preset("default"), trainer="hf")
        rt.chunk_trainer(spec, rt.base_state(RequestSpec()))


def test_search_runtime_loads_no_hf_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from ttadapt.demo import embedded_model_path

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("--trainer search loaded the HF weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    rt = ServerRuntime.load(ServeConfig(model=str(embedded_model_path()), trainer="search"))
    assert rt.hf_model is None and rt.trainers == ("search",)
    assert rt.layout == Layout(layer_ids=(0, 1, 2, 3, 4, 5), num_experts=16)


def test_search_runtime_offers_the_search_only_and_starts_it_from_the_request_state() -> None:
    rt = _runtime("search")
    assert rt.trainers == ("search",) and _runtime("none").trainers == ()
    spec = _parse({"state": "code", "steer": {"promote": [5], "bias": 3.0}, "reroute": "default"}, trainers=rt.trainers)
    base = rt.base_state(spec)
    scored: list[list[float | int]] = []

    def scorer(contexts: list[list[int]], payloads: list[list[float | int]]) -> list[np.ndarray]:
        scored.extend(payloads)
        return [np.zeros(len(c) - 1) for c in contexts]  # flat: "no change" wins every round

    trainer = rt.chunk_trainer(spec, base, scorer)
    (state,) = trainer.adapt([AdaptJob(seq=0, context=list(range(40)), prompt_len=40, chunk=0)])
    assert len(scored) == SearchConfig().candidates * SearchConfig().rounds
    assert scored[0] == rt.payload(base)  # candidate 0 of round 0: the named state + steering, unchanged
    assert state.content_hash() == base.content_hash()
    record = rt.record(trainer, (0, 0), state)
    assert record["kept_round"] == 0 and record["requests"] == len(scored) and record["position"] == 40
    bad = _parse({"reroute": {"search": {"layers": [3]}}}, trainers=rt.trainers)
    with pytest.raises(RequestError, match=r"search.layers' \[3\] are not MoE layers of this model"):
        rt.chunk_trainer(bad, rt.base_state(bad), scorer)
