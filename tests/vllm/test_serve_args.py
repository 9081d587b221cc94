"""``ttadapt serve`` without vLLM: the command line split, the ``ttadapt`` request schema and the state
a request builds (trainer-less runtime). Runs in CI without vLLM; the server itself: test_serve.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ttadapt.config import RerouteConfig
from ttadapt.state import RouterState
from ttadapt.vllm.http_schema import RequestError, RequestSpec, parse_request
from ttadapt.vllm.payload import Layout, Steer, decode
from ttadapt.vllm.runtime import ServeConfig, ServerRuntime
from ttadapt.vllm.serve import parse_args

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


# ------------------------------------------------------------------------------------ request schema
def _parse(field: object, **kw: object) -> RequestSpec:
    kw.setdefault("states", ("code",))
    kw.setdefault("trainer", True)
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
}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_schema_rejects_with_the_fix(name: str) -> None:
    field, message = BAD_FIELDS[name]
    with pytest.raises(RequestError, match=message) as info:
        _parse(field, max_steps=16)
    assert info.value.status == 400
    assert info.value.param.startswith("ttadapt")


def test_schema_reroute_needs_the_trainer_and_one_payload_source() -> None:
    with pytest.raises(RequestError, match="started with --trainer none; restart it with `ttadapt serve --trainer hf`"):
        _parse({"reroute": "default"}, trainer=False)
    with pytest.raises(RequestError, match="send one of them"):
        parse_request({"ttadapt": {"state": "code"}, "vllm_xargs": {"ttadapt": [1, 1, 8, 0, -1] + [0.0] * 8}},
                      states=("code",))


# ------------------------------------------------------------------------------------ request state
def _runtime() -> ServerRuntime:
    g = torch.Generator().manual_seed(0)
    code = RouterState(layer_ids=(1, 2, 4), num_experts=8, delta=torch.randn(3, 8, generator=g),
                       steer=torch.zeros(3, 8), force=torch.zeros(3, 8, dtype=torch.int8))
    return ServerRuntime(ServeConfig(model="m", trainer="none"), LAYOUT, {"code": code}, None, None)


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
    with pytest.raises(RequestError, match="restart with `ttadapt serve --trainer hf`"):
        rt.rerouter(RerouteConfig.preset("default"))
