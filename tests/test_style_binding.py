"""Hand-written router styles are bound only after they reproduce the installed router (patches/verify.py).

A transformers release can change a router under a style written for an earlier one (GraniteMoE and Aria
changed their output order after 5.19). Proven here: a router whose maths changed falls back to the generic
interception, stays exact and steerable, and refuses ``bias_affects="selection"`` leaving the model unpatched;
the first matching option set of a spec is chosen; families newer than the installed transformers get a
clear error; the index-first reader reads both output orders.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch

import ttadapt
import ttadapt.patches as patches_pkg
from ttadapt.patches.base import index_first_reader


@contextlib.contextmanager
def _spec(model_type: str, **changes: object) -> Iterator[None]:
    registry = patches_pkg._REGISTRY
    original = registry[model_type]
    registry[model_type] = dataclasses.replace(original, **changes)
    try:
        yield
    finally:
        registry[model_type] = original


@contextlib.contextmanager
def _changed_routers(model: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
    """Give every router of ``model`` a forward whose weights are doubled: maths no style reproduces."""
    routers = [s.module for s in ttadapt.inspect_model(model).sites]
    cls = type(routers[0])

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, weights, index = cls.forward(self, hidden_states)
        return logits, weights * 2, index

    Changed = type(cls.__name__, (cls,), {"forward": forward})  # same name: still found as the router
    for r in routers:
        r.__class__ = Changed
    try:
        yield routers
    finally:
        for r in routers:
            r.__class__ = cls


def _ids() -> torch.Tensor:
    return torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_changed_router_falls_back_to_the_generic_interception(tiny_model) -> None:
    model = tiny_model("olmoe")
    ids = _ids()
    with _changed_routers(model):
        base = _logits(model, ids)
        with pytest.warns(RuntimeWarning, match="does not reproduce"), ttadapt.patch(model) as h:
            assert h.uses_generic and "generic" in repr(h)
            state = h.new_state()
            state.delta.zero_()
            state.mark_active()  # zero vectors through the edit path
            h.load_state(state)
            assert torch.equal(_logits(model, ids), base)
            h.steer(promote=[3], layers="all", bias=1e4)
            with h.record() as rec:
                _logits(model, ids)
            assert all(bool(m[:, 3].all()) for m in rec.selection_sets())
        assert torch.equal(_logits(model, ids), base)


def test_selection_only_needs_a_verified_style_and_leaves_the_model_unpatched(tiny_model) -> None:
    model = tiny_model("olmoe")
    ids = _ids()
    with _changed_routers(model) as routers:
        base = _logits(model, ids)
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="bias_affects='selection\\+weights'"):
            ttadapt.patch(model, bias_affects="selection")
        assert ttadapt.get_handle(model) is None
        assert all("forward" not in r.__dict__ for r in routers)
        assert torch.equal(_logits(model, ids), base)


def test_verified_style_is_bound_without_warning(tiny_model, recwarn) -> None:
    model = tiny_model("olmoe")
    with ttadapt.patch(model) as h:
        assert not h.uses_generic
        assert [b.name for b in h.bindings.values()] == ["softmax_topk"]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_first_matching_option_set_is_used(tiny_model) -> None:
    model = tiny_model("granitemoe")
    ids = _ids()
    base = _logits(model, ids)
    with ttadapt.patch(model) as h:
        (right,) = [b.options for b in h.bindings.values()]
    wrong = {**right, "index_first": not right.get("index_first", False)}
    with _spec("granitemoe", style_options=wrong, style_variants=(right,)), ttadapt.patch(model) as h:
        (binding,) = h.bindings.values()
        assert binding.style is not None and binding.options == right
        state = h.new_state()
        state.mark_active()
        h.load_state(state)
        assert torch.equal(_logits(model, ids), base)


def test_patch_for_a_newer_transformers_gives_a_clear_error(tiny_model) -> None:
    model = tiny_model("olmoe")
    with _spec("olmoe", min_transformers="999.0"):
        with pytest.raises(ttadapt.UnsupportedModelError, match=r"transformers >= 999.0.*pip install -U"):
            ttadapt.patch(model)
    assert ttadapt.get_handle(model) is None


def test_index_first_reader_reads_both_output_orders() -> None:
    logits = torch.randn(4, 8)
    weights, index = torch.topk(logits.softmax(-1), 2, dim=-1)
    for out in ((index, weights, logits), (logits, weights, index)):
        got_logits, got_index = index_first_reader(out, 2)
        assert torch.equal(got_logits, logits) and torch.equal(got_index, index)
