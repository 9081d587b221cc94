"""RerouteConfig: every knob of online rerouting, validated, with named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Selection = Literal["top_C", "bottom_C", "all", "last_n", "explicit"]
Weighting = Literal["hard", "soft"]
Optimizer = Literal["adam", "sgd"]
LossMask = Literal["all", "prompt", "generated"]
KVPolicy = Literal["partial", "full", "stale"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "selection": ("top_C", "bottom_C", "all", "last_n", "explicit"),
    "weighting": ("hard", "soft"),
    "optimizer": ("adam", "sgd"),
    "loss_mask": ("all", "prompt", "generated"),
    "kv_policy": ("partial", "full", "stale"),
}


@dataclass(frozen=True)
class RerouteConfig:
    """How ``delta`` is adapted online (paper: arXiv 2510.14853; open choices are explicit options).

    Args:
        lr: step size (paper: 0.05).
        steps: gradient steps per adaptation round (paper: 5). 0 disables adaptation.
        interval: re-adapt every ``interval`` generated tokens (paper: 128); None = prefill only.
        selection: which MoE layers are adapted each round. ``top_C``: highest
            ``C_l = -(1/k) sum_topk log p`` (the paper's formula as written, i.e. the least confident
            routing); ``bottom_C``: lowest C (most confident, the paper's prose); ``all``; ``last_n``
            (the last ``ratio`` of MoE layers); ``explicit`` (``layers``).
        ratio: fraction of MoE layers selected by ``top_C``/``bottom_C``/``last_n`` (at least one).
        layers: true layer ids for ``selection="explicit"``.
        weighting: ``hard`` (selected layers, equal weight) or ``soft`` (each selected layer's
            gradient scaled by its normalised confidence score).
        optimizer: ``adam`` or ``sgd``; optimizer state is reset every round.
        warm_start: start each round from the previous round's delta (else from zero).
        reset_per_prompt: start every ``generate``/``adapt`` call from zero (else persist in the Rerouter).
        loss_mask: which context tokens the next-token loss covers.
        kv_policy: after an update, ``partial`` recomputes the cache only for layers >= the lowest
            adapted layer (exact; where a model's cache cannot be spliced per layer, as probed once
            per model, it re-prefills), ``full`` re-prefills everything (exact), ``stale`` keeps the
            old cache (new routing applies to new tokens only; approximate).
        max_context: the loss covers at most the last ``max_context`` context tokens (None = all).
            Compute still covers the whole context; ``window`` bounds it.
        window: adaptation forwards and backwards run over only the last ``window`` context tokens
            (None = all). Earlier tokens are read through their keys/values under the round's starting
            state, held fixed during the steps (truncated back-propagation: their routing is not
            re-optimised), and the loss covers at most the window (as ``max_context``). The refreshed
            cache still covers the whole context under the new state, so decoding stays exact under
            ``partial``/``full`` (under ``stale`` the prefix is read from the stale decode cache).
            Makes a round's cost grow with the window, not the context.
        early_stop: stop a round when the fit loss improves by less than this fraction in a step.
        guard: hold out the last ``val_fraction`` of the context, fit on the rest, and keep the
            candidate (including "no change") with the lowest held-out loss: adaptation can then
            never make the held-out context worse. Off in the paper preset.
        val_fraction: share of the adaptation targets held out by the guard.
        min_gain: relative held-out improvement a candidate needs over "no change" to be kept.
        refit: after the guard has chosen how many steps help (per row), re-fit ``delta`` from the
            round's start for that many steps on every target, the held-out tail included (the text
            nearest to what comes next). Costs up to ``steps`` more forward+backward passes. Only with
            ``guard=True`` (without the guard every step is kept and fitted on the whole context anyway).
        max_abs: trust region: clamp every delta entry to ``[-max_abs, max_abs]`` (None = off).
        min_tokens: skip a round whose context gives fewer fit targets than this (in a batch with one
            state per row, such rows keep their state while the others adapt).
        straight_through: during adaptation passes only, give the routing weights the gradient of
            the dense router softmax (straight-through: forward values unchanged), so experts outside
            the top-k receive gradient also in renormalising routers (Mixtral, Qwen3, GPT-OSS, ...).
            Routers without renormalisation (OLMoE, Qwen2-MoE) already pass that gradient. Only
            hand-written router styles can (``ttadapt patches``); with generic interception it is
            ignored, and each round's trace says so.
        checkpoint_min_tokens: long-context memory mode from this many context tokens on (None =
            never): gradient checkpointing in the adapted layers, and the next-token loss computed
            in chunks of tokens so the ``[tokens, vocab]`` logits never exist at once (exact up to
            float rounding; costs a recomputation of each layer and of the LM head in the backward).
            With ``window``, the layers are checkpointed only where the window itself is this long
            (activations scale with the tokens that carry gradient; the chunked loss still applies).
        share_first_forward: the confidence pass runs with grad and doubles as the first step's
            forward (one forward fewer per round; exact). With ``top_C``/``bottom_C`` or soft weighting
            the layers are chosen after that forward, so its backward reaches every MoE layer (the
            gradient mask keeps the selected ones); off while checkpointing.
        prefix_reuse: replay the layers below the lowest adapted layer from the confidence pass
            instead of recomputing them every step (exact: probed once per model and layer, and
            skipped for models whose layers pass more than their output on; off only to benchmark
            the plain loop).
    """

    lr: float = 0.05
    steps: int = 5
    interval: int | None = 128
    selection: Selection = "top_C"
    ratio: float = 0.5
    layers: tuple[int, ...] | None = None
    weighting: Weighting = "hard"
    optimizer: Optimizer = "adam"
    warm_start: bool = True
    reset_per_prompt: bool = True
    loss_mask: LossMask = "all"
    kv_policy: KVPolicy = "partial"
    max_context: int | None = None
    window: int | None = None
    early_stop: float | None = None
    guard: bool = True
    val_fraction: float = 0.25
    min_gain: float = 0.0
    refit: bool = False
    max_abs: float | None = None
    min_tokens: int = 8
    straight_through: bool = False
    checkpoint_min_tokens: int | None = None
    share_first_forward: bool = True
    prefix_reuse: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"RerouteConfig.{key}={getattr(self, key)!r}; choose one of {choices}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"RerouteConfig.lr must be a positive finite number, got {self.lr!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"RerouteConfig.steps must be an int >= 0, got {self.steps!r}")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"RerouteConfig.interval must be None or an int >= 1, got {self.interval!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"RerouteConfig.ratio must be in (0, 1], got {self.ratio!r}")
        if self.selection == "explicit" and not self.layers:
            raise ValueError("selection='explicit' needs layers=(layer ids...)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"RerouteConfig.max_context must be None or >= 2, got {self.max_context!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 2):
            raise ValueError(f"RerouteConfig.window must be None or an int >= 2, got {self.window!r}")
        if self.early_stop is not None and not 0 <= self.early_stop < 1:
            raise ValueError(f"RerouteConfig.early_stop must be None or in [0, 1), got {self.early_stop!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"RerouteConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.min_gain < 0:
            raise ValueError(f"RerouteConfig.min_gain must be >= 0, got {self.min_gain!r}")
        if self.max_abs is not None and not self.max_abs > 0:
            raise ValueError(f"RerouteConfig.max_abs must be None or > 0, got {self.max_abs!r}")
        if self.checkpoint_min_tokens is not None and self.checkpoint_min_tokens < 1:
            raise ValueError(f"RerouteConfig.checkpoint_min_tokens must be None or >= 1, got {self.checkpoint_min_tokens!r}")
        if self.min_tokens < 1:
            raise ValueError(f"RerouteConfig.min_tokens must be >= 1, got {self.min_tokens!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RerouteConfig:
        """A named preset (``default``, ``paper``, ``fast``), optionally with fields overridden."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}") from None
        return dataclasses.replace(base, **overrides) if overrides else base

    def replace(self, **changes: Any) -> RerouteConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RerouteConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RerouteConfig fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS: dict[str, RerouteConfig] = {
    # The paper's known values; every unknown made explicit. No guard: the paper has none.
    "paper": RerouteConfig(
        lr=0.05, steps=5, interval=128, selection="top_C", ratio=0.5, weighting="hard",
        optimizer="adam", warm_start=True, reset_per_prompt=True, loss_mask="all",
        kv_policy="partial", guard=False, checkpoint_min_tokens=2048, name="paper",
    ),
    # Cheapest useful setting: the default's guard with 2 larger SGD steps, rarer rounds, partial cache refresh.
    "fast": RerouteConfig(
        lr=10.0, steps=2, interval=256, selection="all", ratio=0.5, optimizer="sgd", kv_policy="partial",
        early_stop=None, guard=True, val_fraction=0.25, min_gain=0.002, max_abs=1.0, checkpoint_min_tokens=2048,
        name="fast",
    ),
    # What ttadapt ships: guarded (never worse on held-out context), refit on the whole context for the
    # guard's step count, trust region, partial refresh. lr/steps/selection/min_gain/refit chosen on
    # tiny-olmoe's held-out snippets (tune split): eval/HELDOUT.md.
    "default": RerouteConfig(
        lr=5.0, steps=4, interval=128, selection="all", ratio=0.5, optimizer="sgd", kv_policy="partial",
        guard=True, val_fraction=0.25, min_gain=0.002, refit=True, max_abs=1.0, checkpoint_min_tokens=2048,
        name="default",
    ),
}
