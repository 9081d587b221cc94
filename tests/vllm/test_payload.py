"""The ttadapt vLLM wire format, without vLLM: encode/decode, validation messages, salts, helpers."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttadapt.state import RouterState
from ttadapt.vllm import payload as pl
from ttadapt.vllm.payload import Layout, PayloadError, Steer, decode, encode, encode_state, payload_salt, steer_payload

LAYOUT = Layout(layer_ids=(1, 2, 4), num_experts=8)


def _state(seed: int = 0, rows: int | None = None) -> RouterState:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 8) if rows is None else (3, rows, 8)
    return RouterState(
        layer_ids=(1, 2, 4), num_experts=8, delta=torch.randn(shape, generator=g),
        steer=torch.zeros(3, 8), force=torch.zeros(3, 8, dtype=torch.int8),
    )


def test_importing_does_not_import_vllm() -> None:
    code = (
        "import sys, ttadapt, ttadapt.vllm, ttadapt.vllm.payload, ttadapt.vllm.sampling, ttadapt.vllm.plugin; "
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_state_round_trip_is_exact() -> None:
    s = _state()
    s.steer[0, 3] = 2.5
    s.force[2, 1], s.force[2, 6] = 1, -1
    values = encode_state(s)
    assert values[:4] == [1, 3, 8, 1] and values[4:7] == [1, 2, 4]
    assert all(type(v) in (int, float) for v in values)
    p = decode(values, LAYOUT)
    assert np.array_equal(p.bias, (s.delta + s.steer).numpy())
    assert np.array_equal(p.force, s.force.numpy())
    assert p.to_list() == values


def test_no_force_means_shorter_payload() -> None:
    values = encode_state(_state())
    assert values[3] == 0 and len(values) == 4 + 3 + 24


def test_per_row_state_needs_a_row() -> None:
    s = _state(rows=2)
    with pytest.raises(PayloadError, match="row=i"):
        encode_state(s)
    assert decode(encode_state(s, row=1)).bias.tolist() == s.delta[:, 1].tolist()


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ("1,2,3", "flat list of numbers"),
        ([1, 1], "too short"),
        ([2, 1, 8, 0, 1] + [0.0] * 8, "unsupported payload version"),
        ([1, 0, 8, 0], "layer count"),
        ([1, 1, 0, 0, 1], "expert count"),
        ([1, 1, 8, 2, 1] + [0.0] * 8, "has_force"),
        ([1, 1, 8, 0, 1] + [0.0] * 7, "needs 13"),
        ([1, 2, 8, 0, 1, 1] + [0.0] * 16, "repeated layer ids"),
        ([1, 2, 8, 0, -1, 1] + [0.0] * 16, "must be the only layer id"),
        ([1, 1, 8, 0, -3] + [0.0] * 8, "negative layer ids"),
        ([1, 1, 8, 0, 1.5] + [0.0] * 8, "layer id must be an integer"),
        ([1, 1, 8, 0, 1] + [math.nan] + [0.0] * 7, "NaN or inf"),
        ([1, 1, 8, 0, 1] + [-math.inf] + [0.0] * 7, "NaN or inf"),
        ([1, 1, 8, 0, 1] + [2e4] + [0.0] * 7, "bias"),
        ([1, 1, 8, 0, 1] + ["0.5"] * 8, "only numbers"),
        ([1, 1, 8, 0, 1] + [True] * 8, "only numbers"),
        ([1, 1, 8, 1, 1] + [0.0] * 8 + [0.5] * 8, "force values"),
        ([1, 1, 8, 0] + [0.0] * 3_000_000, "too large"),
        ([True, 1, 8, 0, 1] + [0.0] * 8, "version must be an integer"),
    ],
)
def test_malformed_payloads(values: object, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as info:
        decode(values)
    assert "extra_args['ttadapt']" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_layout_checks() -> None:
    with pytest.raises(PayloadError, match=r"layers \[3\] are not MoE layers.*\[1, 2, 4\]"):
        decode(encode([3], np.zeros((1, 8))), LAYOUT)
    with pytest.raises(PayloadError, match="for 4 experts but the served model has 8"):
        decode(encode([1], np.zeros((1, 4))), LAYOUT)
    assert decode(encode([-1], np.ones(8)), LAYOUT).all_layers


def test_steer_payload_matches_handle_semantics() -> None:
    soft = decode(steer_payload(promote=[5], suppress=2, num_experts=8, bias=3.0))
    assert soft.layer_ids == (-1,) and soft.force is None
    assert soft.bias[0, 5] == 3.0 and soft.bias[0, 2] == -3.0 and soft.bias.sum() == 0.0
    hard = decode(steer_payload(Steer(promote=[1], suppress=[0], layers=[2, 4], hard=True, num_experts=8)))
    assert hard.layer_ids == (2, 4) and hard.force.tolist() == [[-1, 1, 0, 0, 0, 0, 0, 0]] * 2
    with pytest.raises(PayloadError, match="num_experts"):
        steer_payload(promote=[1])
    with pytest.raises(PayloadError, match="out of range"):
        steer_payload(promote=[9], num_experts=8)
    with pytest.raises(PayloadError, match="both promoted and suppressed"):
        steer_payload(promote=[1], suppress=[1], num_experts=8)
    with pytest.raises(PayloadError, match="finite"):
        steer_payload(promote=[1], num_experts=8, bias=math.nan)


def test_merge_steer_into_state() -> None:
    s = _state()
    merged = pl.merge_steer(s, Steer(promote=[5], layers=[2], bias=1.5))
    assert torch.equal(merged.steer[1], torch.eye(8)[5] * 1.5) and not s.steer.any()
    with pytest.raises(PayloadError, match="not a MoE layer"):
        pl.merge_steer(s, Steer(promote=[5], layers=[3]))


def test_salts() -> None:
    a, b = encode_state(_state(1)), encode_state(_state(2))
    assert payload_salt(a) == payload_salt(list(a)) != payload_salt(b)
    assert payload_salt(encode([1], np.zeros((1, 8)))) is None  # zero: shares the vanilla cache
    assert payload_salt(encode([1], np.zeros((1, 8)), np.eye(8)[:1])) is not None  # forcing alone counts


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=5, unique=True),
    st.integers(1, 12),
    st.data(),
)
def test_encode_decode_property(layer_ids: list[int], E: int, data: st.DataObject) -> None:
    floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    bias = np.array(data.draw(st.lists(floats, min_size=len(layer_ids) * E, max_size=len(layer_ids) * E)),
                    dtype=np.float32).reshape(len(layer_ids), E)
    force = np.array(data.draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=bias.size, max_size=bias.size)))
    p = decode(encode(layer_ids, bias, force.reshape(bias.shape)), Layout(tuple(range(41)), E))
    assert p.layer_ids == tuple(layer_ids)
    assert np.array_equal(p.bias, bias)
    assert (p.force is None and not force.any()) or np.array_equal(p.force, force.reshape(bias.shape))


def test_sampling_helpers_without_vllm() -> None:
    from ttadapt.vllm.sampling import payload_for, prompt

    s = _state()
    assert payload_for() is None
    assert payload_for(s) == encode_state(s)
    both = decode(payload_for(s, {"promote": [0], "layers": [4], "hard": True}))
    assert both.force[2, 0] == 1
    p = prompt([0, 5, 6], s)
    assert p["prompt_token_ids"] == [0, 5, 6] and p["cache_salt"] == "ttadapt:" + s.content_hash()
    assert prompt("hi", s, cache_salt="tenant")["cache_salt"].startswith("tenant|ttadapt:")
    zero = RouterState(layer_ids=(1, 2, 4), num_experts=8, delta=torch.zeros(3, 8), steer=torch.zeros(3, 8),
                       force=torch.zeros(3, 8, dtype=torch.int8))
    assert "cache_salt" not in prompt("hi", zero)
    assert prompt("hi", zero, steer=Steer(promote=[1], bias=1.0))["cache_salt"].startswith("ttadapt:")
