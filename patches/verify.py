"""Patch-time proof that a hand-written router style reproduces the installed transformers' router.

A style re-implements one release's router maths; a later release may reorder the outputs or change the
maths (GraniteMoE and Aria went from index-first to logits-first outputs in transformers 5.2x). So before a
style is bound it is run on a probe input next to the router's own ``forward``: with no edit the outputs
must be bit-identical, and with a random bias they must equal the generic interception's. The first of
the spec's option sets that passes is used; if none does, the router falls back to the generic
interception (exact wherever the logits are the router's first E-wide linear op) with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._generic import generic_forward
from .base import FamilySpec
from .logit_edit import LogitEdit
from .styles import STYLES

_PROBE_TOKENS = 7


@dataclass(frozen=True)
class Binding:
    """How one router class gets its edit: a verified style with its options, or the generic interception."""

    style: Callable[..., Any] | None
    options: dict[str, Any] = field(default_factory=dict)
    fallback_reason: str = ""

    @property
    def name(self) -> str:
        return "generic" if self.style is None else getattr(self.style, "__name__", "style")


def bind_style(spec: FamilySpec, router: nn.Module, orig: Any, num_classes: int) -> Binding:
    """The first of ``spec``'s option sets whose style matches ``router`` on a probe; else generic."""
    if spec.style == "generic":
        return Binding(None)
    style = STYLES.get(spec.style)
    if style is None:
        raise ValueError(f"{spec.model_type}: unknown router style {spec.style!r}")
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return Binding(style, dict(spec.style_options))  # nothing to run on: trust the declared style
    why = ""
    for options in (spec.style_options, *spec.style_variants):
        why = _mismatch(style, dict(options), router, orig, num_classes)
        if not why:
            return Binding(style, dict(options))
    import transformers

    reason = (f"ttadapt's {spec.style!r} router style for {spec.model_type} does not reproduce "
              f"{type(router).__name__} of transformers {transformers.__version__} ({why})")
    warnings.warn(f"{reason}; using the generic interception (exact, ~50 us per router call)", RuntimeWarning,
                  stacklevel=4)
    return Binding(None, fallback_reason=reason)


def _mismatch(style: Any, options: dict[str, Any], router: nn.Module, orig: Any, num_classes: int) -> str:
    """Why ``style`` with ``options`` differs from the router on a probe ("" when it matches)."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "the router has no 2-D weight"
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(_PROBE_TOKENS, weight.shape[-1], generator=gen).to(weight.device, weight.dtype)
    bias = (2 * torch.randn(num_classes, generator=gen)).to(weight.device)
    try:
        with torch.no_grad():
            if not _same(orig(probe), style(router, probe, lambda z: z, False, **options), exact=True):
                return "outputs differ with no edit"
            edit = LogitEdit(bias=bias)
            if not _same(generic_forward(router, orig, num_classes, edit, (probe,), {}),
                         style(router, probe, edit, False, **options), exact=False):
                return "outputs differ from the generic interception under a bias"
    except Exception as exc:  # a style written for another release can fail outright
        return f"{type(exc).__name__}: {exc}"
    return ""


def _same(a: Any, b: Any, *, exact: bool) -> bool:
    """Equal router outputs: same structure; tensors bit-equal (``exact``) or within float rounding."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if exact or not a.is_floating_point():
            return torch.equal(a, b)
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, exact=exact) for x, y in zip(a, b))
    return a == b
