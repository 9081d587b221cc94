"""Static-cache (compilable) decoding across rerouting chunks: same tokens, one compiled graph, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig, MixtralConfig, OlmoeConfig

import ttadapt
from ttadapt.static_decode import StaticDecodeCache, wants_static

FAST = ttadapt.RerouteConfig(lr=0.5, steps=3, interval=5, selection="top_C", ratio=0.5, guard=False)


def _olmoe(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = OlmoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, eos_token_id=None, bos_token_id=None,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("policy", ["partial", "full", "stale"])
def test_static_cache_generates_the_dynamic_cache_tokens(policy: str, window: int | None) -> None:
    model = _olmoe(0)
    ids = _ids(1, 14, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    cfg = FAST.replace(kv_policy=policy, window=window)  # a window recomputes its prefix (not sliced from a static cache)
    kw = dict(reroute=cfg, max_new_tokens=13, do_sample=False, return_trace=True)
    dyn, t_dyn = ttadapt.generate(model, ids, mask, **kw)
    sta, t_sta = ttadapt.generate(model, ids, mask, cache_implementation="static", **kw)
    assert torch.equal(dyn, sta)
    assert t_sta.num_rounds == t_dyn.num_rounds == ttadapt.rounds_for(13, 5)
    assert [r.selected_layers for r in t_sta.rounds] == [r.selected_layers for r in t_dyn.rounds]


def test_static_cache_with_samples_and_a_given_prefill_state() -> None:
    model = _olmoe(2)
    ids = _ids(3, 12)
    state = ttadapt.Rerouter(model, FAST).adapt(ids)
    outs = []
    for impl in (None, "static"):
        torch.manual_seed(0)
        outs.append(ttadapt.generate(
            model, ids, reroute=FAST.replace(interval=4), max_new_tokens=9, do_sample=True, top_k=8,
            num_return_sequences=3, prefill_state=state, cache_implementation=impl,
        ))
    assert outs[0].shape == (3, 21)
    assert torch.equal(outs[0], outs[1])


def test_compiled_decode_keeps_one_graph_across_rounds_and_presets() -> None:
    """With a static cache every router takes the edit path, so rounds that switch layers on do not recompile."""
    from torch._dynamo.utils import counters

    model = _olmoe(4)
    ids = _ids(5, 10)
    cc = CompileConfig(backend="eager")  # dynamo's tracing and guards without inductor's compile time
    cc._compile_all_devices = True
    ttadapt.patch(model)
    try:
        torch._dynamo.reset()
        counters.clear()
        for cfg in (FAST, FAST.replace(selection="all", steps=2, lr=2.0)):
            want = ttadapt.generate(model, ids, reroute=cfg, max_new_tokens=12, do_sample=False)
            got = ttadapt.generate(
                model, ids, reroute=cfg, max_new_tokens=12, do_sample=False, cache_implementation="static",
                compile_config=cc,
            )
            assert torch.equal(want, got)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        ttadapt.unpatch(model)
        torch._dynamo.reset()


def test_unsupported_cache_kinds_fail_with_the_fix() -> None:
    assert not wants_static(None) and not wants_static("dynamic") and wants_static("static")
    with pytest.raises(ValueError, match="cache_implementation"):
        wants_static("offloaded")
    model = _olmoe(6)
    with pytest.raises(ValueError, match="cache_implementation"):
        ttadapt.generate(model, _ids(7, 8), reroute=FAST, max_new_tokens=6, cache_implementation="quantized")
    assert ttadapt.get_handle(model) is None  # nothing left patched
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
    )
    mixtral = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="sliding"):
        StaticDecodeCache(mixtral, 32)
