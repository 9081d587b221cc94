"""Prefix caching must not share KV between requests with different router vectors.

vLLM's block hashes cover token ids (+ cache_salt, LoRA, multimodal inputs), not the router vector,
so without a per-vector salt a request silently reuses KV computed under another vector. ttadapt
salts twice: ``ttadapt.vllm.prompt(..., state)`` sets ``cache_salt`` on the client, and the plugin
salts every request whose payload changes routing (opt-out: ``extra_args["ttadapt_auto_salt"] = 0``).
One in-process engine, prefix caching on, block size 32 (the CPU attention minimum).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")

import ttadapt  # noqa: E402
from ttadapt.vllm import prompt, sampling_params  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(vt: Any) -> Any:
    engine = vt.engine(enable_prefix_caching=True, block_size=32)
    yield engine
    vt.shutdown(engine)


@pytest.fixture(scope="module")
def handle(hf_model: Any) -> Any:
    h = ttadapt.patch(hf_model)
    yield h
    h.unpatch()


@pytest.fixture(scope="module")
def long_prompt(vt: Any) -> list[int]:
    # The 4 documents back to back, twice: 86 tokens = 2 full cacheable blocks of 32 + a partial one.
    return [t for p in vt.PROMPTS for t in p] * 2


def _run(llm: Any, p: Any, sp: Any) -> tuple[list[int], int]:
    out = llm.generate([p if isinstance(p, dict) else {"prompt_token_ids": p}], sp, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)


def _sp(state: Any = None, **kw: Any) -> Any:
    return sampling_params(state, max_tokens=12, temperature=0.0, ignore_eos=True, **kw)


def test_different_vectors_never_share_kv(
    llm: Any, vt: Any, hf_model: Any, handle: Any, long_prompt: list[int]
) -> None:
    llm.reset_prefix_cache()
    s1, s2 = vt.random_state(handle, seed=21), vt.random_state(handle, seed=22)
    a, cached_a = _run(llm, long_prompt, _sp(s1))
    b, cached_b = _run(llm, long_prompt, _sp(s2))  # same tokens, another vector: must recompute
    assert cached_b == 0
    assert b == vt.hf_greedy(hf_model, long_prompt, 12, s2)
    assert a == vt.hf_greedy(hf_model, long_prompt, 12, s1)
    assert a != b
    again, cached_again = _run(llm, long_prompt, _sp(s1))  # same vector: the salt is stable, KV reused
    assert cached_again >= 32
    assert again == a


def test_client_salt_alone_isolates(llm: Any, vt: Any, hf_model: Any, handle: Any, long_prompt: list[int]) -> None:
    llm.reset_prefix_cache()
    s1, s2 = vt.random_state(handle, seed=31), vt.random_state(handle, seed=32)
    off = {"ttadapt_auto_salt": 0}
    _run(llm, prompt(long_prompt, s1), _sp(s1, extra_args=off))
    b, cached_b = _run(llm, prompt(long_prompt, s2), _sp(s2, extra_args=off))
    assert cached_b == 0
    assert b == vt.hf_greedy(hf_model, long_prompt, 12, s2)


def test_unsalted_reuse_is_the_bug(llm: Any, vt: Any, hf_model: Any, handle: Any, long_prompt: list[int]) -> None:
    """Non-vacuity: with every salt off, the second vector reuses the first one's KV."""
    llm.reset_prefix_cache()
    s1, s2 = vt.random_state(handle, seed=41), vt.random_state(handle, seed=42)
    off = {"ttadapt_auto_salt": 0}
    _run(llm, long_prompt, _sp(s1, extra_args=off))
    b, cached_b = _run(llm, long_prompt, _sp(s2, extra_args=off))
    assert cached_b >= 32  # KV computed under s1 was reused for s2
    assert b != vt.hf_greedy(hf_model, long_prompt, 12, s2)


def test_zero_state_shares_vanilla_cache(llm: Any, vt: Any, handle: Any, long_prompt: list[int]) -> None:
    llm.reset_prefix_cache()
    vanilla, _ = _run(llm, long_prompt, _sp())
    zero = handle.new_state()
    assert "cache_salt" not in prompt(long_prompt, zero)
    z, cached = _run(llm, prompt(long_prompt, zero), _sp(zero))
    assert cached >= 32
    assert z == vanilla
