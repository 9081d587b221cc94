"""Per-layer expert-usage counts from forward hooks on the routers (for base -> rerouted shift heatmaps).

Routers are found with ``ttadapt.inspect_model`` (true layer ids) when the core supports the model,
else by the common ``*.mlp.gate`` name. Hooks read the router output, so an active ttadapt state's
edited selection is what gets counted.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RouterSite:
    """One router module and its decoder-layer id."""

    layer_id: int
    module: nn.Module
    num_experts: int
    top_k: int


def find_routers(model: nn.Module) -> list[RouterSite]:
    """The model's MoE routers (empty for dense models or unknown layouts)."""
    try:
        import ttadapt

        info = ttadapt.inspect_model(model)
        return [RouterSite(int(s.layer_id), s.module, int(s.num_experts), int(s.top_k)) for s in info.sites]
    except Exception:  # core absent, or a model it does not support: fall back to names
        pass
    cfg = getattr(model, "config", None)
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not (isinstance(n_exp, int) and isinstance(top_k, int)):
        return []
    sites = []
    for name, mod in model.named_modules():
        m = re.search(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(?:gate|router)$", name)
        if m:
            sites.append(RouterSite(int(m.group(1)), mod, n_exp, top_k))
    return sites


def _selected(out: Any, top_k: int, num_experts: int) -> torch.Tensor:
    """Selected expert ids ``[T, k]`` from a router output (indices if returned, else top-k of logits)."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1, out.shape[-1])[:, :num_experts].topk(top_k, dim=-1).indices
    for o in out[1:]:
        if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dtype != torch.bool:
            return o.reshape(-1, o.shape[-1])
    logits = out[0]
    return logits.reshape(-1, logits.shape[-1])[:, :num_experts].topk(top_k, dim=-1).indices


@dataclass
class UsageCounter:
    """Accumulates ``[layers, experts]`` selection counts over every token of the recorded forwards."""

    sites: list[RouterSite]
    counts: dict[int, torch.Tensor] = field(default_factory=dict)

    def table(self) -> list[list[int]]:
        return [self.counts.get(s.layer_id, torch.zeros(s.num_experts, dtype=torch.long)).tolist() for s in self.sites]


@contextlib.contextmanager
def count_usage(model: nn.Module, sites: list[RouterSite] | None = None) -> Iterator[UsageCounter]:
    """Count expert selections per layer for forwards inside the block (hooks removed on exit)."""
    sites = find_routers(model) if sites is None else sites
    counter = UsageCounter(sites)
    handles = []

    def make_hook(site: RouterSite) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            sel = _selected(out, site.top_k, site.num_experts).detach().long().flatten().cpu()
            c = torch.bincount(sel, minlength=site.num_experts)[: site.num_experts]
            prev = counter.counts.get(site.layer_id)
            counter.counts[site.layer_id] = c if prev is None else prev + c

        return hook

    try:
        for s in sites:
            handles.append(s.module.register_forward_hook(make_hook(s)))
        yield counter
    finally:
        for h in handles:
            h.remove()
