"""Gradient-free adaptation inside vLLM (``ttadapt.vllm.search_adapt`` and ``generate(trainer="search")``)
on the trained tiny OLMoE. One in-process engine for the module.

The context is the first 96 tokens of the shipped KJV snippet (shifted domain: the model was trained on
code and technical prose), where rerouting has something to find.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ttadapt  # noqa: E402
from ttadapt.vllm import context_nll, decode, encode_state, generate, model_layout, sampling_params  # noqa: E402
from ttadapt.vllm.payload import payload_salt  # noqa: E402
from ttadapt.vllm.search import SearchConfig, search_adapt, search_many, zero_state  # noqa: E402
from ttadapt.vllm.trainers import SearchTrainer  # noqa: E402

pytestmark = pytest.mark.vllm

CFG = SearchConfig(candidates=8, rounds=4, sigma=0.5, seed=0)


@pytest.fixture(scope="module")
def llm(vt: Any) -> Any:
    engine = vt.engine(max_num_seqs=16)
    yield engine
    vt.shutdown(engine)


@pytest.fixture(scope="module")
def handle(hf_model: Any) -> Any:
    h = ttadapt.get_handle(hf_model) or ttadapt.patch(hf_model)
    yield h
    h.unpatch()


@pytest.fixture(scope="module")
def context(vt: Any) -> list[int]:
    from transformers import AutoTokenizer

    from ttadapt.demo import demo_snippets

    tok = AutoTokenizer.from_pretrained(vt.model_path())
    text = next(s["text"] for s in demo_snippets() if s["id"] == "kjv-genesis-1")
    return ([0] + list(tok(text)["input_ids"]))[:96]


@torch.no_grad()
def _hf_nll(model: Any, handle: Any, ids: list[int], state: Any) -> np.ndarray:
    with handle.use_state(state if state is not None else handle.new_state()):
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double().numpy()


def test_scores_equal_hf_token_nll(llm: Any, vt: Any, hf_model: Any, handle: Any, context: list[int]) -> None:
    """What the search minimises: vLLM's batched prompt log-probs under each payload = HF + ttadapt NLL."""
    state = vt.random_state(handle, seed=5, scale=1.0)
    zero, edited = context_nll(llm, [context, context], [None, encode_state(state)])
    assert zero.shape == edited.shape == (len(context) - 1,)
    np.testing.assert_allclose(zero, _hf_nll(hf_model, handle, context, None), atol=1e-4)
    np.testing.assert_allclose(edited, _hf_nll(hf_model, handle, context, state), atol=1e-4)
    assert abs(zero.mean() - edited.mean()) > 1e-3, "the vector changed nothing: test is vacuous"


def test_search_never_worse_than_no_change(llm: Any, context: list[int]) -> None:
    state, tr = search_adapt(llm, context, config=CFG, return_trace=True)
    assert tr.skipped is None and len(tr.rounds) == CFG.rounds
    assert tr.targets == 95 and tr.fit_targets == 95 - 24
    for r in tr.rounds:
        assert len(r.fit) == CFG.candidates and r.fit[r.chosen] <= r.fit[0]
    for prev, nxt in zip(tr.rounds, tr.rounds[1:]):  # candidate 0 ("no change") = the current best
        assert nxt.fit[0] == pytest.approx(prev.fit[prev.chosen], abs=1e-5)
    assert tr.final_fit <= tr.base_fit and tr.final_val <= tr.base_val
    assert tr.kept > 0 and tr.final_val < tr.base_val, "the search kept nothing: test is vacuous"
    # Scored again on its own, the returned state is what the trace says, and better than no change.
    base, new = context_nll(llm, [context, context], [None, encode_state(state)])
    n = tr.fit_targets
    assert new[:n].mean() == pytest.approx(tr.final_fit, abs=1e-5)
    assert base[:n].mean() == pytest.approx(tr.base_fit, abs=1e-5)
    assert new[:n].mean() < base[:n].mean() and new[n:].mean() < base[n:].mean()
    # A valid state for the served model, inside the trust region, steering untouched.
    layout = model_layout(llm)
    assert state.layer_ids == layout.layer_ids and tuple(state.delta.shape) == (len(layout.layer_ids), 16)
    assert 0 < float(state.delta.abs().max()) <= CFG.max_abs
    assert not state.steer.any() and not state.force.any()
    decode(encode_state(state), layout)


def test_candidates_are_one_batched_call_per_round(
    llm: Any, context: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[Any], list[Any]]] = []
    real = llm.generate

    def counting(prompts: Any, params: Any = None, **kw: Any) -> Any:
        calls.append((list(prompts), list(params)))
        return real(prompts, params, **kw)

    monkeypatch.setattr(llm, "generate", counting)
    cfg = CFG.replace(candidates=6, rounds=3)
    search_adapt(llm, context, config=cfg)
    assert len(calls) == 3
    for prompts, params in calls:
        assert len(prompts) == len(params) == 6
        assert all(p["prompt_token_ids"] == context for p in prompts)
        assert all(sp.max_tokens == 1 and sp.prompt_logprobs == 0 for sp in params)
        # Each candidate has its own vector, hence its own prefix-cache salt (None = the zero vector).
        assert len({payload_salt(sp.extra_args["ttadapt"]) for sp in params}) == 6
    # Two contexts searched together still cost one call per round (2 x 6 requests).
    calls.clear()
    zero = zero_state(llm)
    search_many(llm, [context, context[:64]], [zero, zero], cfg)
    assert [len(p) for p, _ in calls] == [12, 12, 12]


def test_fixed_seed_is_deterministic(llm: Any, context: list[int]) -> None:
    a, ta = search_adapt(llm, context, config=CFG, seed=3, rounds=2, return_trace=True)
    b, tb = search_adapt(llm, context, config=CFG, seed=3, rounds=2, return_trace=True)
    c, tc = search_adapt(llm, context, config=CFG, seed=4, rounds=2, return_trace=True)
    assert a.content_hash() == b.content_hash()
    assert [r.fit for r in ta.rounds] == [r.fit for r in tb.rounds]
    assert ta.rounds[0].fit[1:] != tc.rounds[0].fit[1:]


def test_generate_with_search_trainer_uses_its_states(llm: Any, vt: Any, hf_model: Any, context: list[int]) -> None:
    """generate(trainer="search"): each chunk is decoded under the state the search returned for it
    (= HF greedy under that state), the search re-runs on the grown context, warm-started."""
    ctx = context[:64]
    cfg = CFG.replace(rounds=2)
    trainer = SearchTrainer(llm, cfg)
    reroute = ttadapt.RerouteConfig.preset("default", interval=4)
    res = generate(llm, [ctx], trainer=trainer, reroute=reroute, max_tokens=10, sampling={"temperature": 0.0})
    (r,) = res
    assert r.chunks == len(r.states) == 3 and len(r.token_ids) == 10
    assert sorted(trainer.traces) == [(0, 0), (0, 1), (0, 2)]
    assert [trainer.traces[(0, c)].targets for c in range(3)] == [63, 67, 71]
    assert any(s.delta.any() for s in r.states), "the search kept nothing: test is vacuous"
    # The first state is search_many's on the prompt with the trainer's seed (seed, seq 0, chunk 0).
    (first, _), = search_many(llm, [ctx], [zero_state(llm)], cfg, seeds=[(cfg.seed, 0, 0)])
    assert r.states[0].content_hash() == first.content_hash()
    # Chunk by chunk, the tokens are HF + ttadapt greedy under that chunk's state.
    want: list[int] = []
    for c, state in enumerate(r.states):
        want += vt.hf_greedy(hf_model, ctx + want, min(4, 10 - 4 * c), state)
    assert r.token_ids == want
    # The string form builds the same trainer (same seeds, same tokens) without any HF model.
    again = generate(llm, [ctx], trainer="search", search=cfg, reroute=reroute, max_tokens=10,
                     sampling={"temperature": 0.0})
    assert again[0].token_ids == r.token_ids


def test_generate_trainer_arguments(llm: Any, hf_model: Any, context: list[int]) -> None:
    with pytest.raises(ValueError, match="trainer='hf' needs hf_model="):
        generate(llm, [context], max_tokens=2)
    with pytest.raises(ValueError, match="trainer='search' does not use hf_model="):
        generate(llm, [context], trainer="search", hf_model=hf_model, max_tokens=2)
    with pytest.raises(ValueError, match="search= configures trainer='search'"):
        generate(llm, [context], hf_model=hf_model, search=CFG, max_tokens=2)
    with pytest.raises(ValueError, match="trainer must be 'hf', 'search'"):
        generate(llm, [context], trainer="adam", max_tokens=2)  # type: ignore[arg-type]
    # rounds=0: no adaptation, one chunk, the plain model's greedy tokens.
    res = generate(llm, [context[:20]], trainer="search", search=CFG.replace(rounds=0), max_tokens=6,
                   sampling={"temperature": 0.0})
    plain = llm.generate([{"prompt_token_ids": context[:20]}], sampling_params(max_tokens=6, temperature=0.0),
                         use_tqdm=False)
    assert res[0].chunks == 1 and not res[0].states[0].delta.any()
    assert res[0].token_ids == list(plain[0].outputs[0].token_ids)


def test_generate_n_samples_share_the_prefill_search(llm: Any, context: list[int]) -> None:
    """n=2: one search on the prompt (its state shared by both samples), then one search per sample."""
    trainer = SearchTrainer(llm, CFG.replace(candidates=4, rounds=1))
    reroute = ttadapt.RerouteConfig.preset("default", interval=4)
    res = generate(llm, [context[:40]], trainer=trainer, reroute=reroute, n=2, max_tokens=8,
                   sampling={"temperature": 1.0, "seed": 11, "ignore_eos": True})
    assert [(r.prompt_index, r.sample_index, r.chunks) for r in res] == [(0, 0, 2), (0, 1, 2)]
    assert res[0].states[0] is res[1].states[0]
    assert sorted(trainer.traces) == [(0, 0), (0, 1), (1, 1)]  # (seq, chunk): seq 1 only searched for chunk 1
    assert res[0].token_ids[:4] != res[1].token_ids[:4], "the two samples are identical: test is vacuous"
    assert trainer.traces[(0, 1)].targets == trainer.traces[(1, 1)].targets == 39 + 4
