"""Which MoE layers a round adapts, and with what gradient weight."""

from __future__ import annotations

import math

import torch

from ttadapt.config import RerouteConfig


def select_layers(
    cfg: RerouteConfig, layer_ids: tuple[int, ...], confidence: torch.Tensor | None
) -> tuple[list[int], torch.Tensor]:
    """Return (selected slots, per-slot gradient weights ``[L]``) for one round.

    ``confidence`` is the per-layer ``C_l`` (needed by ``top_C``/``bottom_C`` and soft weighting).
    """
    L = len(layer_ids)
    n = max(1, math.ceil(cfg.ratio * L))
    if cfg.selection == "all":
        slots = list(range(L))
    elif cfg.selection == "last_n":
        slots = list(range(L - n, L))
    elif cfg.selection == "explicit":
        assert cfg.layers is not None
        unknown = [x for x in cfg.layers if x not in layer_ids]
        if unknown:
            raise ValueError(f"RerouteConfig.layers {unknown} are not MoE layers; MoE layers are {list(layer_ids)}")
        slots = sorted(layer_ids.index(x) for x in cfg.layers)
    else:
        if confidence is None:
            raise ValueError(f"selection={cfg.selection!r} needs a confidence pass")
        order = torch.argsort(confidence, descending=cfg.selection == "top_C", stable=True)
        slots = sorted(int(i) for i in order[:n])
    weights = torch.zeros(L)
    if cfg.weighting == "soft" and confidence is not None:
        c = confidence.detach().float().cpu()
        score = c if cfg.selection != "bottom_C" else 1.0 / c.clamp_min(1e-6)
        sel = score[slots]
        weights[slots] = sel / sel.max().clamp_min(1e-12)
    else:
        weights[slots] = 1.0
    return slots, weights


def needs_confidence(cfg: RerouteConfig) -> bool:
    """Whether a round must run the confidence pass before it knows its layers."""
    return cfg.selection in ("top_C", "bottom_C") or cfg.weighting == "soft"
