"""``ttadapt.vllm.generate(..., n=k)``: k samples per prompt share the prefill adaptation (one vLLM
request with ``SamplingParams(n=k)``), then each re-adapts on its own context. One in-process engine."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

import ttadapt  # noqa: E402
from ttadapt.generation import Rerouter  # noqa: E402
from ttadapt.vllm import generate, prompt, sampling_params  # noqa: E402

pytestmark = pytest.mark.vllm

K = 4
CFG = ttadapt.RerouteConfig(steps=2, interval=4, lr=0.5, selection="all", guard=False, min_tokens=1)
SAMPLING = {"temperature": 1.0, "seed": 1234, "ignore_eos": True}


def _by_prompt(res: list[Any], n_prompts: int) -> list[list[Any]]:
    assert [(r.prompt_index, r.sample_index) for r in res] == [(i, j) for i in range(n_prompts) for j in range(K)]
    return [res[i * K:(i + 1) * K] for i in range(n_prompts)]


def test_steps0_equals_plain_vllm_n_sampling(llm: Any, vt: Any, hf_model: Any) -> None:
    prompts = vt.PROMPTS[:2]
    res = generate(llm, prompts, hf_model=hf_model, reroute=CFG.replace(steps=0), max_tokens=10, n=K, sampling=SAMPLING)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(n=K, max_tokens=10, **SAMPLING), use_tqdm=False)
    for group, out in zip(_by_prompt(res, len(prompts)), plain):
        want = [list(o.token_ids) for o in sorted(out.outputs, key=lambda o: o.index)]
        assert [r.token_ids for r in group] == want
        assert len({tuple(w) for w in want}) > 1, "the K samples are identical: the seed test is vacuous"
        assert all(r.chunks == 1 for r in group)


def test_samples_share_the_prefill_state_then_adapt_alone(
    llm: Any, vt: Any, hf_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_adapt = Rerouter.adapt

    def counting_adapt(self: Rerouter, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(input_ids.shape[0]))  # rows: a round's sequences are adapted in one batch
        return real_adapt(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Rerouter, "adapt", counting_adapt)
    prompts = [vt.PROMPTS[0], vt.PROMPTS[2]]
    res = generate(llm, prompts, hf_model=hf_model, reroute=CFG, max_tokens=10, n=K, sampling=SAMPLING)
    monkeypatch.undo()
    groups = _by_prompt(res, len(prompts))
    compared = 0
    # The prefill round ran once per prompt (both in one batch); every later row belongs to one sample.
    assert calls[0] == len(prompts)
    assert sum(calls) == len(prompts) + sum(r.chunks - 1 for r in res)
    for p, group in zip(prompts, groups):
        first = group[0].states[0]
        assert first.delta.any(), "the prefill adaptation did nothing: test is vacuous"
        assert all(r.states[0] is first for r in group)  # one state object, shared
        assert all(r.chunks == len(r.states) == ttadapt.rounds_for(len(r.token_ids), 4) for r in group)
        # First chunk = one plain vLLM request with n=K under the prefill state (vLLM seeds sample j with seed + j).
        sp = sampling_params(first, n=K, max_tokens=4, **SAMPLING)
        out = llm.generate([prompt(p, first)], sp, use_tqdm=False)[0]
        heads = [list(o.token_ids) for o in sorted(out.outputs, key=lambda o: o.index)]
        assert [r.token_ids[:4] for r in group] == heads
        # Later rounds adapt on each sample's own context: different contexts give different states.
        for a in group:
            for b in group:
                if a is not b and a.token_ids[:4] != b.token_ids[:4] and a.chunks > 1 and b.chunks > 1:
                    assert a.states[1].content_hash() != b.states[1].content_hash()
                    compared += 1
    assert compared > 0, "no two samples diverged in their first chunk: test is vacuous"


def test_n_argument_checks(llm: Any, vt: Any, hf_model: Any) -> None:
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        generate(llm, [vt.PROMPTS[0]], hf_model=hf_model, reroute=CFG, n=0)
    with pytest.raises(ValueError, match="disagree"):
        generate(llm, [vt.PROMPTS[0]], hf_model=hf_model, reroute=CFG, n=2, sampling={"n": 3})


def test_bench_vllm_runners_time_adaptation_apart_from_decoding(llm: Any, vt: Any, hf_model: Any) -> None:
    """``ttadapt bench``'s vLLM methods: same greedy length as vanilla, adapt time split out, same tokens at 0 steps."""
    from ttadapt.eval.bench.vllm_path import runner

    ids, new = list(vt.PROMPTS[0]), 9
    out, phases = runner(llm, hf_model, "vllm", None, ids, new)()
    vanilla = list(out[0].outputs[0].token_ids)
    assert len(vanilla) == new and set(phases) == {"decode"}
    res, phases = runner(llm, hf_model, "vllm-paper", CFG, ids, new)()
    assert len(res[0].token_ids) == new and res[0].chunks == 3
    assert phases["adapt"] > 0 and phases["decode"] > 0
    res, _ = runner(llm, hf_model, "vllm-paper", CFG.replace(steps=0), ids, new)()
    assert res[0].token_ids == vanilla


def test_stop_string_straddling_a_chunk_boundary_ends_generation(llm: Any, vt: Any, hf_model: Any) -> None:
    tok = llm.get_tokenizer()
    greedy = {"temperature": 0.0}
    full = generate(llm, [vt.PROMPTS[2]], hf_model=hf_model, reroute=CFG, max_tokens=12, sampling=greedy)[0]
    ids = full.token_ids
    head, tail = tok.decode(ids[:4]), tok.decode(ids[:5])  # chunk 1 = tokens 0-3, chunk 2 starts at token 4
    stop = head[-1:] + tail[len(head):len(head) + 1]
    assert len(stop) == 2 and stop not in head and len(ids) == 12
    got = generate(llm, [vt.PROMPTS[2]], hf_model=hf_model, reroute=CFG, max_tokens=12,
                   sampling=dict(greedy, stop=[stop]))[0]
    assert got.token_ids == ids[:5] and got.finish_reason == "stop" and got.chunks == 2
