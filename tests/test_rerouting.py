"""Online rerouting: rounds, cache exactness, KV policies, batching, guards and failure safety."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen3MoeConfig, StoppingCriteria, StoppingCriteriaList

import ttadapt
from ttadapt.adapt import RoundRunner, position_ids
from ttadapt.hf_compat import CACHE_KW
from ttadapt.layer_skip import check_replay


def _olmoe(seed: int = 0, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = OlmoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
        eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _qwen3(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=None, pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


FAST = ttadapt.RerouteConfig(lr=0.5, steps=3, interval=5, selection="top_C", ratio=0.5, guard=False)


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 128, (batch, length), generator=g)


@settings(max_examples=6, deadline=None)
@given(interval=st.integers(1, 7), new=st.integers(1, 14))
def test_round_count_rule(interval: int, new: int) -> None:
    model = _olmoe()
    cfg = FAST.replace(interval=interval, steps=1)
    out, trace = ttadapt.generate(model, _ids(1, 12), reroute=cfg, max_new_tokens=new, do_sample=False, return_trace=True)
    assert out.shape[1] == 12 + new
    assert trace.generated == new
    assert trace.num_rounds == ttadapt.rounds_for(new, interval) == 1 + (new - 1) // interval


@pytest.mark.parametrize("policy", ["full", "partial"])
@pytest.mark.parametrize("factory", [_olmoe, _qwen3])
def test_cache_after_round_equals_fresh_forward(policy: str, factory) -> None:
    model = factory()
    ids = _ids(2, 20)
    mask = torch.ones_like(ids)
    cfg = FAST.replace(kv_policy=policy, selection="last_n")
    with ttadapt.patch(model) as handle:
        handle.load_state(handle.new_state())
        res = RoundRunner(model, handle, cfg).run(ids, mask, ids.shape[1], want_cache=True)
        assert res.trace.skipped is None and res.trace.delta_mean_abs > 0
        assert min(res.trace.selected_layers) > 0  # partial really skips a prefix here
        with torch.no_grad():
            step = model(input_ids=ids[:, -1:], **{CACHE_KW: res.cache}, use_cache=True).logits[:, -1]
            fresh = model(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(step, fresh, rtol=1e-5, atol=1e-5)


def test_partial_and_full_generate_identically() -> None:
    model = _olmoe(3)
    ids = _ids(4, 16)
    outs = {
        p: ttadapt.generate(model, ids, reroute=FAST.replace(kv_policy=p), max_new_tokens=14, do_sample=False)
        for p in ("partial", "full")
    }
    assert torch.equal(outs["partial"], outs["full"])


def test_stale_keeps_cache_and_differs_only_by_approximation() -> None:
    model = _olmoe(5)
    ids = _ids(6, 16)
    out, trace = ttadapt.generate(
        model, ids, reroute=FAST.replace(kv_policy="stale"), max_new_tokens=12, do_sample=False, return_trace=True
    )
    assert out.shape == (1, 28)
    assert trace.num_rounds == ttadapt.rounds_for(12, FAST.interval)


def test_zero_steps_equals_plain_generate() -> None:
    model = _olmoe(7)
    ids = _ids(8, 10)
    plain = model.generate(ids, max_new_tokens=15, do_sample=False)
    out = ttadapt.generate(model, ids, reroute=FAST.replace(steps=0), max_new_tokens=15, do_sample=False)
    assert torch.equal(out, plain)
    torch.manual_seed(3)
    plain_s = model.generate(ids, max_new_tokens=15, do_sample=True, top_k=0)
    torch.manual_seed(3)
    out_s = ttadapt.generate(model, ids, reroute=FAST.replace(steps=0), max_new_tokens=15, do_sample=True, top_k=0)
    assert torch.equal(out_s, plain_s)


def test_reset_per_prompt_gives_same_output_twice_and_persist_carries_delta() -> None:
    model = _olmoe(9)
    ids = _ids(10, 14)
    r = ttadapt.Rerouter(model, FAST)
    a = r.generate(ids, max_new_tokens=10, do_sample=False)
    b = r.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)
    persist = ttadapt.Rerouter(model, FAST.replace(reset_per_prompt=False))
    s1 = persist.adapt(ids)
    s2 = persist.adapt(ids)
    assert not torch.equal(s1.delta, s2.delta)  # the second call started from the first's delta


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` left-padded with 0 to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def test_batch_rows_equal_each_row_alone() -> None:
    model = _olmoe(11)
    a, b = _ids(12, 14)[0], _ids(13, 9)[0]
    batch, mask = left_padded([a, b])
    cfg = FAST.replace(interval=4)
    out = ttadapt.generate(model, batch, attention_mask=mask, reroute=cfg, max_new_tokens=9, do_sample=False)
    alone_a = ttadapt.generate(model, a[None], reroute=cfg, max_new_tokens=9, do_sample=False)
    alone_b = ttadapt.generate(model, b[None], reroute=cfg, max_new_tokens=9, do_sample=False)
    assert torch.equal(out[0, 14:], alone_a[0, 14:])
    assert torch.equal(out[1, 14:], alone_b[0, 9:])


@pytest.mark.parametrize("cfg", [
    FAST.replace(interval=4),
    FAST.replace(interval=4, warm_start=False),
    ttadapt.RerouteConfig(lr=5.0, steps=3, interval=4, selection="all", optimizer="sgd", guard=True, val_fraction=0.3,
                          min_gain=0.0, refit=True),
], ids=["top_C", "no-warm-start", "guard-refit"])
def test_a_row_too_short_to_adapt_keeps_its_state_and_the_others_adapt(cfg: ttadapt.RerouteConfig) -> None:
    """A row with fewer than min_tokens fit targets does not hold back the batch: every row equals its run alone."""
    model = _olmoe(11)
    a, b = _ids(12, 16)[0], _ids(13, 6)[0]
    batch, mask = left_padded([a, b])
    out, trace = ttadapt.generate(model, batch, attention_mask=mask, reroute=cfg, max_new_tokens=9, do_sample=False,
                                  return_trace=True)
    first = trace.rounds[0]
    assert first.skipped is None and first.rows_selected[1] == [] and first.rows_selected[0]
    assert any("rows [1] have fewer than" in e for e in first.events)
    alone_a, trace_a = ttadapt.generate(model, a[None], reroute=cfg, max_new_tokens=9, do_sample=False, return_trace=True)
    alone_b, trace_b = ttadapt.generate(model, b[None], reroute=cfg, max_new_tokens=9, do_sample=False, return_trace=True)
    assert trace_b.rounds[0].skipped is not None and trace_a.rounds[0].skipped is None
    assert torch.equal(out[0, 16:], alone_a[0, 16:])
    assert torch.equal(out[1, 16:], alone_b[0, 6:])


def _early_eos(out: torch.Tensor, start: int, within: int) -> tuple[int, int]:
    """(row, token): a token that row emits among its first ``within`` new tokens and no row emits elsewhere."""
    new = out[:, start:]
    for r in range(new.shape[0]):
        for p in range(1, within):
            t = int(new[r, p])
            others = torch.cat([new[r, :p], new[:r].flatten(), new[r + 1:].flatten()])
            if not bool((others == t).any()):
                return r, t
    raise AssertionError("no token ends exactly one row early: pick another seed")


def _round_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the batch size of every adaptation round (RoundRunner.run) from now on."""
    sizes: list[int] = []
    run = RoundRunner.run

    def counted(self: RoundRunner, ids: torch.Tensor, *a: object, **k: object) -> object:
        sizes.append(ids.shape[0])
        return run(self, ids, *a, **k)

    monkeypatch.setattr(RoundRunner, "run", counted)
    return sizes


@pytest.mark.parametrize(("regrow", "policy"), [(True, "partial"), (False, "partial"), (True, "full"), (True, "stale")])
def test_finished_rows_stop_adapting_and_live_rows_equal_each_row_alone(
    monkeypatch: pytest.MonkeyPatch, regrow: bool, policy: str
) -> None:
    model = _olmoe(15)
    batch, cfg = _ids(16, 10, batch=3), FAST.replace(interval=3, kv_policy=policy)
    kw = dict(max_new_tokens=9, do_sample=False, pad_token_id=0)
    row, eos = _early_eos(ttadapt.generate(model, batch, reroute=cfg, **kw), 10, 3)
    sizes = _round_sizes(monkeypatch)
    if not regrow:  # a cache kind that cannot take rows back: generate prefills every row instead
        monkeypatch.setattr(ttadapt.generation, "expand_rows", lambda *a: False)
    out, trace = ttadapt.Rerouter(model, cfg).generate(batch, eos_token_id=eos, return_trace=True, **kw)
    live = [r for r in range(3) if r != row]
    assert sizes == [3, 2, 2] and [t.rows for t in trace.rounds] == [None, live, live]
    assert all(len(t.rows_selected) == 2 for t in trace.rounds[1:])
    for r in range(3):
        alone = ttadapt.generate(model, batch[r:r + 1], reroute=cfg, eos_token_id=eos, **kw)[0, 10:]
        got = out[r, 10:]
        assert torch.equal(got[: len(alone)], alone) and bool((got[len(alone):] == 0).all())
    assert eos in out[row, 10:13].tolist()  # the early row ended inside the first chunk


class _StopRow(StoppingCriteria):
    """Stops row ``row`` once it has ``after`` new tokens (a stand-in for a stop string)."""

    def __init__(self, row: int, start: int, after: int) -> None:
        self.row, self.start, self.after = row, start, after

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] - self.start >= self.after
        return done


def test_rows_ended_by_stopping_criteria_stay_padded_and_leave_later_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _olmoe(15)
    batch, cfg = _ids(16, 10, batch=3), FAST.replace(interval=3)
    kw = dict(max_new_tokens=9, do_sample=False, pad_token_id=0)
    free = ttadapt.generate(model, batch, reroute=cfg, **kw)
    sizes = _round_sizes(monkeypatch)
    out = ttadapt.generate(model, batch, reroute=cfg, stopping_criteria=StoppingCriteriaList([_StopRow(1, 10, 2)]), **kw)
    assert sizes == [3, 2, 2]
    assert torch.equal(out[1, 10:12], free[1, 10:12]) and bool((out[1, 12:] == 0).all())  # no token after the stop
    assert torch.equal(out[0::2], free[0::2])  # the other rows as without the stop


def test_adapt_returns_per_row_state_matching_single_rows() -> None:
    model = _olmoe(14)
    ids = _ids(15, 16, batch=2)
    both = ttadapt.Rerouter(model, FAST).adapt(ids)
    assert both.batch_size == 2
    for row in range(2):
        alone = ttadapt.Rerouter(model, FAST).adapt(ids[row : row + 1])
        torch.testing.assert_close(both.delta[:, row], alone.delta, rtol=1e-4, atol=1e-6)


def test_state_apply_reproduces_adapted_forward() -> None:
    model = _olmoe(16)
    ids = _ids(17, 16)
    state = ttadapt.Rerouter(model, FAST).adapt(ids)
    assert ttadapt.get_handle(model) is None  # adapt left the model unpatched
    with torch.no_grad():
        base = model(ids).logits
        with state.apply(model):
            adapted = model(ids).logits
        again = model(ids).logits
    assert not torch.equal(base, adapted)
    assert torch.equal(base, again)


def test_nan_is_reverted_and_reported() -> None:
    model = _olmoe(18)
    ids = _ids(19, 16)

    def poison(module, args, out):
        return out * float("nan") if torch.is_grad_enabled() else out

    hook = model.model.norm.register_forward_hook(poison)
    try:
        state, trace = ttadapt.Rerouter(model, FAST).adapt(ids, return_trace=True)
    finally:
        hook.remove()
    assert any("non-finite" in e for e in trace.events)
    assert torch.isfinite(state.delta).all() and not state.delta.any()


def test_model_left_unpatched_on_exception() -> None:
    model = _olmoe(20)

    def boom(module, args, out):
        if torch.is_grad_enabled():
            raise RuntimeError("injected")
        return out

    hook = model.model.norm.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            ttadapt.generate(model, _ids(21, 16), reroute=FAST, max_new_tokens=4)
    finally:
        hook.remove()
    assert ttadapt.get_handle(model) is None
    router = model.model.layers[0].mlp.gate
    assert "forward" not in router.__dict__


def test_short_context_skips_adaptation() -> None:
    model = _olmoe(22)
    out, trace = ttadapt.generate(model, _ids(23, 3), reroute=FAST, max_new_tokens=2, do_sample=False, return_trace=True)
    assert trace.rounds[0].skipped is not None
    assert torch.equal(out, model.generate(_ids(23, 3), max_new_tokens=2, do_sample=False))


@pytest.mark.parametrize("cache", [None, "static"])
def test_skipped_rounds_continue_from_the_decode_cache(cache: str | None) -> None:
    # Every round has too few fit tokens: the state never changes, so the chunks continue from the
    # decode cache (one prefill in all, as plain generate) instead of re-prefilling the context.
    model = _olmoe(26)
    ids = _ids(27, 6)
    widths: list[int] = []
    forward = model.forward

    def spy(*args, **kwargs):
        widths.append(int(kwargs["input_ids"].shape[1]) if kwargs.get("input_ids") is not None else -1)
        return forward(*args, **kwargs)

    kw = dict(max_new_tokens=11, do_sample=False, cache_implementation=cache)
    want = model.generate(ids, **kw)
    model.forward = spy
    try:
        out, trace = ttadapt.generate(model, ids, reroute=FAST.replace(interval=3, min_tokens=1000),
                                      return_trace=True, **kw)
    finally:
        del model.forward
    assert trace.num_rounds == 4 and all(r.skipped for r in trace.rounds)
    assert [w for w in widths if w != 1] == [6]
    assert torch.equal(out, want)


def test_guard_never_worsens_heldout_context_loss() -> None:
    model = _olmoe(24)
    ids = _ids(25, 40)
    cfg = ttadapt.RerouteConfig(lr=5.0, steps=4, interval=None, selection="all", guard=True, val_fraction=0.3)
    state, trace = ttadapt.Rerouter(model, cfg).adapt(ids, return_trace=True)
    r = trace.rounds[0]
    assert r.val_loss and min(r.val_loss) <= r.val_loss[0]
    kept = r.val_loss[r.chosen] if r.chosen is not None else r.val_loss[0]
    assert kept == min(r.val_loss) or r.chosen == 0


def test_num_return_sequences_share_prefill_state() -> None:
    model = _olmoe(26)
    ids = _ids(27, 12)
    torch.manual_seed(0)
    out, trace = ttadapt.generate(
        model, ids, reroute=FAST.replace(interval=4), max_new_tokens=8, do_sample=True,
        num_return_sequences=3, return_trace=True,
    )
    assert out.shape == (3, 20)
    assert torch.equal(out[:, :12], ids.repeat(3, 1))
    assert trace.num_rounds == ttadapt.rounds_for(8, 4)


def test_streamer_sees_every_token_once() -> None:
    model = _olmoe(28)
    ids = _ids(29, 10)

    class Collect:
        def __init__(self) -> None:
            self.puts: list[torch.Tensor] = []
            self.ended = 0

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.reshape(-1))

        def end(self) -> None:
            self.ended += 1

    s = Collect()
    out = ttadapt.generate(model, ids, reroute=FAST.replace(interval=3), max_new_tokens=8, do_sample=False, streamer=s)
    assert torch.equal(torch.cat(s.puts), out[0])
    assert s.ended == 1


def test_steering_is_kept_during_rerouting() -> None:
    model = _olmoe(30)
    ids = _ids(31, 14)
    with ttadapt.patch(model) as handle:
        handle.steer(promote=3, layers=[1], bias=1e4)
        state = ttadapt.Rerouter(model, FAST).adapt(ids)
        assert state.steer[1, 3] == 1e4
        with handle.record() as rec, torch.no_grad():
            model(ids)
        assert (rec.selected(1) == 3).any(dim=1).all()


def test_config_validation_and_presets() -> None:
    with pytest.raises(ValueError, match="kv_policy"):
        ttadapt.RerouteConfig(kv_policy="bogus")
    with pytest.raises(ValueError, match="explicit"):
        ttadapt.RerouteConfig(selection="explicit")
    with pytest.raises(ValueError, match="presets are"):
        ttadapt.RerouteConfig.preset("nope")
    paper = ttadapt.RerouteConfig.preset("paper")
    assert (paper.lr, paper.steps, paper.interval, paper.guard) == (0.05, 5, 128, False)
    assert ttadapt.RerouteConfig.from_dict(paper.to_dict()) == paper
    assert ttadapt.RerouteConfig.preset("fast").steps < paper.steps


def test_position_ids_match_generate_convention() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_straight_through_reaches_unselected_experts_without_changing_forward() -> None:
    model = _qwen3(32)  # renormalising router: never-selected experts get exactly zero gradient
    ids = _ids(33, 12)
    with ttadapt.patch(model) as handle:
        with handle.record() as rec, torch.no_grad():
            base = model(ids).logits
        never = [~rec.selection_sets()[i].any(dim=0) for i in range(len(handle.moe_layers))]
        assert any(n.any() for n in never)
        grads = {}
        for st_on in (False, True):
            handle.load_state(handle.new_state())
            with handle.trainable() as delta, handle.straight_through(st_on):
                out = model(ids).logits
                assert torch.equal(out, base)  # forward values unchanged
                torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:]).backward()
            grads[st_on] = delta.grad.clone()
        for i, n in enumerate(never):
            if n.any():
                assert grads[False][i][n].abs().max() < 1e-9
                assert grads[True][i][n].abs().max() > 0


def test_prefix_reuse_and_checkpointing_are_exact() -> None:
    model = _olmoe(34)
    ids = _ids(35, 20)
    cfg = FAST.replace(selection="last_n", interval=None)
    ref = ttadapt.Rerouter(model, cfg.replace(prefix_reuse=False)).adapt(ids)
    fast = ttadapt.Rerouter(model, cfg).adapt(ids)
    ckpt = ttadapt.Rerouter(model, cfg.replace(checkpoint_min_tokens=4)).adapt(ids)
    torch.testing.assert_close(fast.delta, ref.delta, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ckpt.delta, ref.delta, rtol=1e-5, atol=1e-7)
    outs = [
        ttadapt.generate(model, ids, reroute=cfg.replace(interval=4, **kw), max_new_tokens=9, do_sample=False)
        for kw in ({"prefix_reuse": False}, {}, {"checkpoint_min_tokens": 4})
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


REFIT = ttadapt.RerouteConfig(
    lr=20.0, steps=4, interval=None, selection="all", guard=True, val_fraction=0.3, min_gain=0.0, refit=True
)


def _kept_refit(model: torch.nn.Module, ids: torch.Tensor) -> tuple[ttadapt.RouterState, int]:
    state, trace = ttadapt.Rerouter(model, REFIT).adapt(ids, return_trace=True)
    k = trace.rounds[0].chosen
    assert k is not None and k > 0, "test needs a round whose guard keeps an adapted delta"
    assert len(trace.rounds[0].refit_loss) == k
    return state, k


def _periodic(seed: int) -> torch.Tensor:
    """A context whose head predicts its tail, so the guard keeps some (not all) steps."""
    return _ids(seed, 8).repeat(1, 5)


def test_refit_equals_k_unguarded_steps_on_the_whole_context() -> None:
    model = _olmoe(42)
    ids = _periodic(43)
    state, k = _kept_refit(model, ids)
    assert k < REFIT.steps
    plain = ttadapt.Rerouter(model, REFIT.replace(refit=False, guard=False, steps=k)).adapt(ids)
    torch.testing.assert_close(state.delta, plain.delta, rtol=0, atol=1e-6)
    assert float(state.delta.abs().sum()) > 0


def test_refit_batch_rows_equal_rows_alone_and_cache_is_exact() -> None:
    model = _olmoe(42)
    ids = torch.cat([_periodic(43), _periodic(44)])
    alone, ks = zip(*(_kept_refit(model, ids[b : b + 1]) for b in range(2)))
    assert ks[0] != ks[1]  # rows refit for different step counts
    both = ttadapt.Rerouter(model, REFIT).adapt(ids)
    for b in range(2):
        torch.testing.assert_close(both.delta[:, b], alone[b].delta, rtol=1e-4, atol=1e-4)  # batched matmuls couple rows at ~1e-6
    with ttadapt.patch(model) as handle:
        handle.load_state(handle.new_state(batch_size=2))
        res = RoundRunner(model, handle, REFIT).run(ids, torch.ones_like(ids), ids.shape[1], want_cache=True)
        with torch.no_grad():
            step = model(input_ids=ids[:, -1:], **{CACHE_KW: res.cache}, use_cache=True).logits[:, -1]
            fresh = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(step, fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["partial", "full"])
@pytest.mark.parametrize(
    ("guard", "refit", "min_gain"), [(False, False, 0.0), (True, False, 0.0), (True, True, 0.0), (True, True, 0.9)]
)
def test_memory_mode_keeps_results_and_cache_exact(policy: str, guard: bool, refit: bool, min_gain: float) -> None:
    """Memory mode drops caches it will not splice and defers the build past the guard; nothing else changes."""
    model = _olmoe(42)
    ids = _periodic(43)
    cfg = REFIT.replace(selection="last_n", kv_policy=policy, guard=guard, refit=refit, min_gain=min_gain)
    results = []
    for c in (cfg, cfg.replace(checkpoint_min_tokens=4)):
        with ttadapt.patch(model) as handle:
            handle.load_state(handle.new_state())
            res = RoundRunner(model, handle, c).run(ids, torch.ones_like(ids), ids.shape[1], want_cache=True)
            with torch.no_grad():
                step = model(input_ids=ids[:, -1:], **{CACHE_KW: res.cache}, use_cache=True).logits[:, -1]
                fresh = model(input_ids=ids).logits[:, -1]
            torch.testing.assert_close(step, fresh, rtol=1e-5, atol=1e-5)
            results.append((handle.state.delta.detach().clone(), res.trace.chosen))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][1] == results[0][1]
    if min_gain > 0:
        assert results[1][1] == 0  # the guard kept "no change": the cache is rebuilt, not the trimmed one reused


def test_refit_is_inert_without_the_guard() -> None:
    model = _olmoe(42)
    ids = _periodic(43)
    unguarded = REFIT.replace(guard=False)
    a = ttadapt.Rerouter(model, unguarded).adapt(ids)
    b = ttadapt.Rerouter(model, unguarded.replace(refit=False)).adapt(ids)
    assert torch.equal(a.delta, b.delta) and float(a.delta.abs().sum()) > 0


@pytest.mark.parametrize(("selection", "weighting"), [("all", "hard"), ("last_n", "hard"), ("top_C", "soft")])
def test_shared_first_forward_is_exact_and_saves_a_forward(selection: str, weighting: str) -> None:
    model = _olmoe(50)
    ids = torch.cat([_periodic(51), _periodic(52)])
    cfg = REFIT.replace(refit=False, selection=selection, weighting=weighting, kv_policy="partial", interval=6)
    for lid in range(len(model.model.layers)):  # the once-per-model replay probes, not counted below
        check_replay(model, model.model.layers, lid, ids.shape[0])
    calls: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        results = {}
        for share in (True, False):
            calls.clear()
            c = cfg.replace(share_first_forward=share)
            state, trace = ttadapt.Rerouter(model, c).adapt(ids, return_trace=True)
            out = ttadapt.generate(model, ids, reroute=c, max_new_tokens=13, do_sample=False)
            results[share] = (state, trace.rounds[0], len(calls), out)
    finally:
        hook.remove()
    (s1, r1, n1, o1), (s0, r0, n0, o0) = results[True], results[False]
    torch.testing.assert_close(s1.delta, s0.delta, rtol=1e-5, atol=1e-6)
    assert r1.fit_loss == pytest.approx(r0.fit_loss, rel=1e-6) and r1.val_loss == pytest.approx(r0.val_loss, rel=1e-6)
    assert n1 < n0  # the adapt call ran one forward fewer (generate adds its own)
    assert torch.equal(o1, o0)


def test_prefill_state_replaces_the_prefill_round_exactly() -> None:
    model = _olmoe(60)
    ids = _ids(61, 16)
    cfg = FAST.replace(interval=5)
    state = ttadapt.Rerouter(model, cfg).adapt(ids)
    ref, t_ref = ttadapt.generate(model, ids, reroute=cfg, max_new_tokens=12, do_sample=False, return_trace=True)
    out, t_out = ttadapt.generate(
        model, ids, reroute=cfg, max_new_tokens=12, do_sample=False, return_trace=True, prefill_state=state
    )
    assert torch.equal(out, ref)
    assert t_out.rounds[0].skipped == "prefill_state given" and t_ref.rounds[0].skipped is None
    assert t_out.num_rounds == t_ref.num_rounds == ttadapt.rounds_for(12, 5)
    assert float(state.delta.abs().sum()) > 0  # the caller's state is not consumed or zeroed
    with pytest.raises(ValueError, match="rows"):
        ttadapt.generate(model, ids, reroute=cfg, max_new_tokens=2, prefill_state=state.per_row(3))


def test_dict_output_holds_every_chunks_scores() -> None:
    model = _olmoe(62)
    ids = _ids(63, 10)
    out = ttadapt.generate(
        model, ids, reroute=FAST.replace(interval=4), max_new_tokens=11, do_sample=False,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )
    assert out.sequences.shape == (1, 21)
    assert len(out.scores) == len(out.logits) == 11
    assert torch.equal(torch.stack(out.scores, 1).argmax(-1), out.sequences[:, 10:])
