"""Reuse the no-grad prefix: layers below the lowest adapted layer do not depend on ``delta``.

During a round their output is computed once (in the confidence pass) and replayed, so steps and
the cache refresh only run layers >= ``first``; the refreshed cache then takes the old KV of the
skipped layers (exact: those layers saw the same inputs and routing).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class LayerInputs:
    """Captures the hidden-state input of every decoder layer (or of the ``wanted`` ones) during one forward."""

    def __init__(self, layers: nn.ModuleList, wanted: set[int] | None = None) -> None:
        self.layers = layers
        self.wanted = wanted
        self.inputs: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> LayerInputs:
        for i, layer in enumerate(self.layers):
            if self.wanted is not None and i not in self.wanted:
                continue
            self._hooks.append(layer.register_forward_pre_hook(self._make(i), with_kwargs=True))
        return self

    def _make(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor):
                self.inputs[i] = h.detach()

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@contextlib.contextmanager
def skip_below(layers: nn.ModuleList, first: int, hidden: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, decoder layers ``< first`` return ``hidden`` without computing."""
    if first <= 0 or hidden is None:
        yield
        return
    def replay(*args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden

    patched = [layers[i] for i in range(first)]
    try:
        for layer in patched:
            layer.forward = replay
        yield
    finally:
        for layer in patched:
            layer.__dict__.pop("forward", None)


@dataclass(frozen=True)
class ReplayCheck:
    """What a round may reuse below its lowest adapted layer ``first`` on one model."""

    replay: bool  # the steps may replay layers < first from their captured input
    splice: bool  # a partial refresh may take those layers' cache entries from an earlier forward


#: Per model, the ``ReplayCheck`` of every layer probed so far.
_CHECKS: weakref.WeakKeyDictionary[nn.Module, dict[int, ReplayCheck]] = weakref.WeakKeyDictionary()


def check_replay(model: nn.Module, layers: nn.ModuleList, first: int, batch: int) -> ReplayCheck:
    """Whether replaying the layers below ``first`` (``skip_below``), and splicing their cache entries
    (``splice_cache``), reproduce ``model`` exactly.

    They do when each decoder layer's output is the next layer's only input and cache entry ``i`` is
    decoder layer ``i``'s. Some families pass more between layers (tuples, attention residuals over
    earlier layers, keys/values shared across layers) or keep several cache entries per layer, so this
    is probed once per model and layer on a 7-token input of ``batch`` rows (per-row states need their
    batch size): logits with and without the replay, and the next token's logits from a spliced cache
    against a freshly built one. A probe that differs or raises means recomputing those layers.
    """
    if first <= 0:
        return ReplayCheck(True, True)
    known = _CHECKS.setdefault(model, {})
    if first in known:
        return known[first]
    check = _probe(model, layers, first, batch)
    if not model.training:  # dropout would make a training-mode probe fail by chance: ask again later
        known[first] = check
    return check


def _probe(model: nn.Module, layers: nn.ModuleList, first: int, batch: int) -> ReplayCheck:
    from ttadapt.hf_compat import CACHE_KW, output_cache

    try:
        emb = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):  # no token embedding to size a probe by: do not reuse
        return ReplayCheck(False, False)
    ids = ((torch.arange(8, device=emb.device) * 7 + 3) % emb.shape[0]).unsqueeze(0).expand(batch, -1)
    ctx, nxt = ids[:, :-1], ids[:, -1:]
    try:
        full, part = _with_and_without_replay(model, layers, first, ctx, use_cache=True)
    except Exception:  # a layer whose output the next one unpacks (tuples), or a cache that needs every layer
        try:
            full, part = _with_and_without_replay(model, layers, first, ctx, use_cache=False)
        except Exception:
            return ReplayCheck(False, False)
        return ReplayCheck(_same(part.logits, full.logits), False)
    if not _same(part.logits, full.logits):
        return ReplayCheck(False, False)
    try:
        with torch.no_grad():
            old, spliced = output_cache(full), output_cache(part)
            fresh = copy.deepcopy(old)  # splicing shares old's layers with the spliced cache
            if not splice_cache(spliced, old, first):
                return ReplayCheck(True, False)
            ref = model(input_ids=nxt, use_cache=True, **{CACHE_KW: fresh}).logits
            out = model(input_ids=nxt, use_cache=True, **{CACHE_KW: spliced}).logits
        return ReplayCheck(True, _same(out, ref))
    except Exception:  # e.g. cache layers of other kinds than the spliced ones expect
        return ReplayCheck(True, False)


@torch.no_grad()
def _with_and_without_replay(
    model: nn.Module, layers: nn.ModuleList, first: int, ids: torch.Tensor, *, use_cache: bool
) -> tuple[Any, Any]:
    """The model's outputs on ``ids``: a plain forward, then one with the layers below ``first`` replayed."""
    with LayerInputs(layers, {first}) as cap:
        full = model(input_ids=ids, use_cache=use_cache)
    with skip_below(layers, first, cap.inputs[first]):
        return full, model(input_ids=ids, use_cache=use_cache)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return torch.equal(a, b) or float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def splice_cache(new: Any, old: Any, first: int) -> bool:
    """Copy layers ``< first`` of ``old`` into ``new`` (DynamicCache only). Returns False if unsupported."""
    if first <= 0:
        return True
    if not (_is_plain_dynamic(new) and _is_plain_dynamic(old)):
        return False
    for i in range(first):
        new.layers[i] = old.layers[i]
    return True


def truncate_cache(cache: Any, first: int) -> bool:
    """Drop layers ``>= first`` of a DynamicCache (only its lower layers get spliced later); False if unsupported."""
    if not _is_plain_dynamic(cache):
        return False
    del cache.layers[first:]
    return True


def expand_rows(cache: Any, rows: torch.Tensor, batch: int) -> bool:
    """Grow a DynamicCache over ``rows`` of a ``batch`` in place: its rows go to ``rows``, the others get zero
    KV (finished sequences, whose tokens are forced to padding). False (cache untouched) if unsupported."""
    if not _is_plain_dynamic(cache):
        return False
    for layer in cache.layers:
        for name in ("keys", "values"):
            part = getattr(layer, name)
            whole = part.new_zeros((batch, *part.shape[1:]))
            setattr(layer, name, whole.index_copy_(0, rows.to(part.device), part))
            del part
    return True


#: transformers' generic cache layers, whose ``batch_repeat_interleave`` repeats everything they hold.
_REPEATABLE_LAYERS = frozenset({"DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer"})


def repeat_rows(cache: Any, n: int) -> bool:
    """Repeat every row of a DynamicCache ``n`` times in place (self-consistency samples of one prompt).

    False (cache untouched) for other cache kinds: linear-attention and model-specific layers either lack
    the method or leave part of their state unrepeated, and the caller then re-prefills instead.
    """
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers:
        return False
    if any(type(layer).__name__ not in _REPEATABLE_LAYERS for layer in layers):
        return False
    cache.batch_repeat_interleave(n)
    return True


def _is_plain_dynamic(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def supports_partial(cache: Any) -> bool:
    """Whether ``partial`` KV refresh can splice this cache type (plain attention DynamicCache)."""
    return _is_plain_dynamic(cache)


@contextlib.contextmanager
def checkpoint_from(layers: nn.ModuleList, first: int, enabled: bool, keep_cache: bool = False) -> Iterator[None]:
    """Gradient-checkpoint decoder layers ``>= first`` inside the block (only those layers enter
    training mode, so router jitter and dropout elsewhere stay off). ``keep_cache``: the layers keep
    reading ``past_key_values`` (a window's prefix; the caller restores it before every forward, so a
    recomputation in the backward appends to the prefix again)."""
    if not enabled:
        yield
        return
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    touched = []
    try:
        for layer in list(layers)[first:]:
            if not hasattr(type(layer), "gradient_checkpointing"):
                continue
            touched.append((layer, layer.training))
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            if keep_cache:
                layer._can_checkpoint_with_cache = True
            layer.training = True
        yield
    finally:
        for layer, was_training in touched:
            layer.training = was_training
            layer.__dict__.pop("gradient_checkpointing", None)
            layer.__dict__.pop("_gradient_checkpointing_func", None)
            layer.__dict__.pop("_can_checkpoint_with_cache", None)
