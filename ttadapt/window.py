"""Windowed adaptation: a round's forwards and backwards cover only the last ``window`` context tokens.

The earlier tokens enter through a prefix cache (their keys/values under the round's starting state),
held fixed during the steps and restored to the prefix after every forward, so a step costs
``O(window)`` however long the context is. The prefix comes from the decode cache when ``generate``
hands one over that covers the context exactly (later rounds), else from one no-grad forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ttadapt.layer_skip import supports_partial


@dataclass
class Window:
    """The prefix cache over ``x[:, :start]``; forwards run on columns ``start:`` with it as their past."""

    start: int
    past: Any
    _kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._kv = [(layer.keys, layer.values) for layer in self.past.layers]

    def restore(self) -> None:
        """Put the prefix tensors back (a slice of what a forward appended would stay tied to its graph)."""
        for layer, (k, v) in zip(self.past.layers, self._kv):
            layer.keys, layer.values = k, v


def prefix_view(cache: Any, start: int, rows: int) -> Any | None:
    """A cache whose layers view the first ``start`` positions of ``cache`` (which stays untouched), or
    None where ``cache`` is not a plain DynamicCache over ``rows`` rows and at least ``start`` positions."""
    if cache is None or not supports_partial(cache):
        return None
    if any(getattr(layer, "keys", None) is None for layer in cache.layers):
        return None
    if any(layer.keys.shape[0] != rows or layer.keys.shape[-2] < start for layer in cache.layers):
        return None
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        part.keys, part.values = layer.keys[..., :start, :], layer.values[..., :start, :]
        view.layers.append(part)
    return view


def open_window(
    window: int | None, x: torch.Tensor, prior: Any, prefill: Callable[[int], Any]
) -> Window | None:
    """The window for a round on ``x`` ([B, T] forward inputs), or None when it would cover all of ``x``.

    ``prior``: a cache over exactly ``x`` under the round's starting state (reused when it fits);
    ``prefill(start)``: builds the cache over ``x[:, :start]`` otherwise. None also where the model's
    cache is not a plain DynamicCache (the round then runs over the whole context).
    """
    if window is None or x.shape[1] <= window:
        return None
    start = x.shape[1] - window
    past = prefix_view(prior, start, x.shape[0]) if covers(prior, x) else None
    if past is None:
        with torch.no_grad():
            built = prefill(start)
        past = prefix_view(built, start, x.shape[0])
    return Window(start, past) if past is not None else None


def covers(cache: Any, x: torch.Tensor) -> bool:
    """Whether ``cache`` holds keys/values for exactly ``x``'s rows and positions in every layer."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        getattr(layer, "keys", None) is not None and layer.keys.shape[0] == x.shape[0] and layer.keys.shape[-2] == x.shape[1]
        for layer in layers
    )
