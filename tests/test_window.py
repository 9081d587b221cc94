"""Windowed adaptation (RerouteConfig.window): steps cover only the last tokens, the cache stays exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import ttadapt
from ttadapt.adapt import RoundRunner
from ttadapt.hf_compat import CACHE_KW, output_cache
from ttadapt.window import Window, covers, open_window, prefix_view

from .test_rerouting import _ids, _olmoe, left_padded

SGD = ttadapt.RerouteConfig(lr=2.0, steps=1, interval=None, selection="all", optimizer="sgd", guard=False)


def _truncated_step(model: torch.nn.Module, ids: torch.Tensor, window: int, lr: float) -> torch.Tensor:
    """Reference: one SGD step on the loss over the last ``window`` inputs' targets, the earlier tokens'
    keys/values computed without grad (truncated back-propagation)."""
    x, y = ids[:, :-1], ids[:, 1:]
    start = x.shape[1] - window
    with ttadapt.patch(model) as handle:
        handle.load_state(handle.new_state())
        with torch.no_grad():
            past = output_cache(model(input_ids=x[:, :start], use_cache=True))
        with handle.trainable() as delta:
            logits = model(input_ids=x[:, start:], **{CACHE_KW: past}, use_cache=True).logits
            F.cross_entropy(logits[0], y[0, start:]).backward()
            return -lr * delta.grad.detach().clone()


def test_window_step_is_the_truncated_gradient_on_the_window() -> None:
    model = _olmoe(1)
    ids = _ids(2, 30)
    state, trace = ttadapt.Rerouter(model, SGD.replace(window=9)).adapt(ids, return_trace=True)
    assert trace.rounds[0].window_start == 29 - 9
    assert trace.rounds[0].routing_changed is not None
    torch.testing.assert_close(state.delta, _truncated_step(model, ids, 9, SGD.lr), rtol=1e-5, atol=1e-7)
    full = ttadapt.Rerouter(model, SGD).adapt(ids)
    assert not torch.allclose(full.delta, state.delta, atol=1e-4)  # the window really changes what is fitted


@settings(max_examples=5, deadline=None)
@given(extra=st.integers(0, 6))
def test_window_covering_the_context_changes_nothing(extra: int) -> None:
    model = _olmoe(3)
    ids = _ids(4, 16)
    cfg = SGD.replace(steps=2, interval=4, guard=True, refit=True, val_fraction=0.3)
    a = ttadapt.Rerouter(model, cfg).adapt(ids)
    b = ttadapt.Rerouter(model, cfg.replace(window=ids.shape[1] - 1 + extra)).adapt(ids)
    assert torch.equal(a.delta, b.delta)
    outs = [ttadapt.generate(model, ids, reroute=c, max_new_tokens=9, do_sample=False)
            for c in (cfg, cfg.replace(window=40 + extra))]
    assert torch.equal(outs[0], outs[1])


def test_forwards_with_grad_cover_only_the_window() -> None:
    model = _olmoe(5)
    ids = _ids(6, 40)
    seen: list[tuple[int, bool]] = []
    layer = model.model.layers[1]
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.append(((a[0] if a else k["hidden_states"]).shape[1], torch.is_grad_enabled())), with_kwargs=True)
    try:
        trace = ttadapt.Rerouter(model, SGD.replace(steps=3, window=10, optimizer="adam", lr=0.1)).adapt(ids, return_trace=True)[1]
    finally:
        hook.remove()
    assert trace.rounds[0].skipped is None
    grad_lengths = {n for n, g in seen if g}
    assert grad_lengths == {10}
    assert sum(1 for _, g in seen if g) == 3  # the shared confidence forward + 2 more steps


@pytest.mark.parametrize("policy", ["partial", "full"])
@pytest.mark.parametrize(("guard", "refit", "min_gain"), [(False, False, 0.0), (True, False, 0.0), (True, True, 0.0), (True, True, 0.9)])
def test_cache_after_a_windowed_round_is_exact_and_memory_mode_changes_nothing(
    policy: str, guard: bool, refit: bool, min_gain: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _olmoe(7)
    ids = _ids(8, 8).repeat(1, 4)
    cfg = SGD.replace(steps=3, lr=20.0, kv_policy=policy, guard=guard, refit=refit, min_gain=min_gain, window=14, val_fraction=0.3)
    checkpointed: list[bool] = []
    real = ttadapt.adapt.checkpoint_from
    monkeypatch.setattr(ttadapt.adapt, "checkpoint_from", lambda *a, **k: checkpointed.append(a[2]) or real(*a, **k))
    results = []
    # memory mode with checkpointed layers reading the prefix (window >= 4), and with the chunked loss
    # only (context 31 >= 20 > window 14: the window's activations are not checkpointed)
    for c in (cfg, cfg.replace(checkpoint_min_tokens=4), cfg.replace(checkpoint_min_tokens=20)):
        checkpointed.clear()
        with ttadapt.patch(model) as handle:
            handle.load_state(handle.new_state())
            res = RoundRunner(model, handle, c).run(ids, torch.ones_like(ids), ids.shape[1], want_cache=True)
            assert res.trace.window_start == ids.shape[1] - 1 - 14
            with torch.no_grad():
                step = model(input_ids=ids[:, -1:], **{CACHE_KW: res.cache}, use_cache=True).logits[:, -1]
                fresh = model(input_ids=ids).logits[:, -1]
            torch.testing.assert_close(step, fresh, rtol=1e-5, atol=1e-5)
            results.append((handle.state.delta.detach().clone(), res.trace.chosen, res.trace.fit_loss))
        assert set(checkpointed) == {c.checkpoint_min_tokens == 4}
        if min_gain > 0:
            assert res.trace.chosen == 0
    if not guard:
        assert float(results[0][0].abs().sum()) > 0
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=1e-5, atol=1e-6)
        assert other[1] == results[0][1]
        assert other[2] == pytest.approx(results[0][2], rel=1e-5)


@pytest.mark.parametrize("min_gain", [0.0, 0.9])
def test_prior_cache_gives_the_same_round_and_is_kept_on_no_change(min_gain: float) -> None:
    model = _olmoe(9)
    ids = _ids(10, 6).repeat(1, 5)
    cfg = SGD.replace(steps=2, lr=20.0, guard=True, refit=True, min_gain=min_gain, window=14, val_fraction=0.3)
    deltas, caches = [], []
    for use_prior in (False, True):
        with ttadapt.patch(model) as handle:
            handle.load_state(handle.new_state())
            with torch.no_grad():
                prior = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
            kept = [layer.keys.clone() for layer in prior.layers]
            res = RoundRunner(model, handle, cfg).run(
                ids, torch.ones_like(ids), ids.shape[1], want_cache=True, prior=[prior] if use_prior else None
            )
            assert all(torch.equal(k, layer.keys) for k, layer in zip(kept, prior.layers))  # the prior is not modified
            deltas.append(handle.state.delta.clone())
            caches.append((res.cache, prior))
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-5, atol=1e-6)
    if min_gain > 0:
        cache, prior = caches[1]
        assert float(deltas[1].abs().sum()) == 0 and cache is prior


@pytest.mark.parametrize("selection", ["all", "top_C"])  # top_C: per-row layers picked on the window's confidence
@pytest.mark.parametrize("policy", ["partial", "full", "stale"])
def test_generate_with_a_window_batches_and_reads_the_decode_cache(
    policy: str, selection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched windowed generation equals each row alone, and later rounds take their prefix from the decode cache."""
    model = _olmoe(11)
    ids = _ids(12, 24, batch=2)
    cfg = SGD.replace(steps=2, lr=0.5, interval=4, window=10, kv_policy=policy, optimizer="adam", selection=selection)
    reused: list[bool] = []

    def spy(window, x, prior, prefill):
        reused.append(covers(prior, x))
        return open_window(window, x, prior, prefill)

    monkeypatch.setattr(ttadapt.adapt, "open_window", spy)
    both, trace = ttadapt.generate(model, ids, reroute=cfg, max_new_tokens=11, do_sample=False, return_trace=True)
    assert [r.window_start for r in trace.rounds] == [23 - 10 + 4 * i for i in range(3)]
    assert reused == [False, True, True]
    for b in range(2):
        alone = ttadapt.generate(model, ids[b : b + 1], reroute=cfg, max_new_tokens=11, do_sample=False)
        assert torch.equal(both[b : b + 1], alone)


@pytest.mark.parametrize("policy", ["partial", "stale"])
def test_left_padded_rows_shorter_than_the_window_equal_each_row_alone(policy: str) -> None:
    """The window is the last W columns of the padded batch: a short row's pads fall in its masked prefix."""
    model = _olmoe(13)
    a, b = _ids(14, 22)[0], _ids(15, 7)[0]
    batch, mask = left_padded([a, b])
    cfg = SGD.replace(steps=2, lr=0.5, interval=4, window=9, kv_policy=policy, optimizer="adam", guard=True, val_fraction=0.3,
                      min_tokens=2)
    out, trace = ttadapt.generate(model, batch, attention_mask=mask, reroute=cfg, max_new_tokens=9, do_sample=False, return_trace=True)
    assert trace.rounds[0].window_start == 21 - 9 and any(r.delta_mean_abs > 0 for r in trace.rounds)
    assert torch.equal(out[0, 22:], ttadapt.generate(model, a[None], reroute=cfg, max_new_tokens=9, do_sample=False)[0, 22:])
    assert torch.equal(out[1, 22:], ttadapt.generate(model, b[None], reroute=cfg, max_new_tokens=9, do_sample=False)[0, 7:])


def test_prefix_view_leaves_the_source_intact_and_restore_trims_appends() -> None:
    model = _olmoe(13)
    ids = _ids(14, 12)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        view = prefix_view(cache, 5, rows=1)
        assert view is not None and all(layer.keys.shape[-2] == 5 for layer in view.layers)
        win = Window(5, view)
        model(input_ids=ids[:, 5:8], **{CACHE_KW: view}, use_cache=True, position_ids=torch.arange(5, 8)[None])
        assert all(layer.keys.shape[-2] == 8 for layer in view.layers)
        win.restore()
    assert all(layer.keys.shape[-2] == 5 for layer in view.layers)
    assert all(layer.keys.shape[-2] == 12 for layer in cache.layers)
    assert prefix_view(cache, 5, rows=2) is None and prefix_view(DynamicCache(), 5, rows=1) is None


def test_window_validation() -> None:
    with pytest.raises(ValueError, match="window"):
        ttadapt.RerouteConfig(window=1)
    with pytest.raises(ValueError, match="window"):
        ttadapt.RerouteConfig(window=2.5)  # type: ignore[arg-type]
