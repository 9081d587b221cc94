"""Compiled mode (``enforce_eager=False``: torch.compile on CPU): the hook is traced by Dynamo, so it
always gathers/adds/forces (no Python fast path). Outputs must still be per-request and equal HF."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")

import ttadapt  # noqa: E402
from ttadapt.vllm import sampling_params  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm(vt: Any) -> Any:
    engine = vt.engine(enforce_eager=False)
    yield engine
    vt.shutdown(engine)


def _sp(state: Any = None) -> Any:
    return sampling_params(state, max_tokens=12, temperature=0.0, ignore_eos=True)


def test_compiled_batched_vectors_equal_hf(llm: Any, vt: Any, hf_model: Any) -> None:
    handle = ttadapt.get_handle(hf_model) or ttadapt.patch(hf_model)
    states = [vt.random_state(handle, seed=70 + i) for i in range(len(vt.PROMPTS) - 1)]
    steered = handle.new_state()
    steered.steer[1, 3] = 3.0
    steered.force[4, 7], steered.force[2, 0] = 1, -1
    steered.refresh()
    states.append(steered)
    got = vt.greedy_ids(llm, vt.PROMPTS, [_sp(s) for s in states])
    vanilla = vt.greedy_ids(llm, vt.PROMPTS, _sp())
    for p, s, g, v in zip(vt.PROMPTS, states, got, vanilla):
        assert g == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS, s)
        assert v == vt.hf_greedy(hf_model, p, vt.NEW_TOKENS)
    assert any(g != v for g, v in zip(got, vanilla))
    # Zero payloads in compiled mode (the table is always read) still give the vanilla output.
    assert vt.greedy_ids(llm, vt.PROMPTS, _sp(handle.new_state())) == vanilla
