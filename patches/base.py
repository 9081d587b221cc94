"""What a family patch declares: where its routers live, their size, and what an added bias affects."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

#: What a logit-space bias changes in a family's router.
BiasAffects = Literal["selection+weights", "selection"]
#: How the router turns logits into per-expert probabilities (used by the recorder and confidence).
Scoring = Literal["softmax", "sigmoid"]

ROUTER_CLASS_RE = re.compile(r"(TopK|Topk|Top1|Top2)?Router$|TopKGating$|Gate$|TokenChoiceRouter$")

#: An edit function maps raw router logits to edited logits (bias add, forcing, per-row expansion).
EditFn = Callable[[torch.Tensor], torch.Tensor]
#: A style computes the router output from (router module, hidden states, edit, selection_only).
StyleFn = Callable[[nn.Module, torch.Tensor, EditFn, bool], Any]
#: Reads (logits [T, E], selected indices [T, k] or None) from a router's output; called as
#: ``reader(out, top_k)``. Returning None indices makes the recorder take the top-k of its probabilities.
OutputReader = Callable[[Any, int], tuple[torch.Tensor, torch.Tensor | None]]


def default_reader(out: Any, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Most v5 routers return (logits, weights, indices)."""
    if isinstance(out, torch.Tensor):
        return out, None
    logits = out[0]
    for o in out[1:]:
        if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dtype != torch.bool:
            return logits, o
    return logits, None


def index_first_reader(out: Any, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GraniteMoE (+Shared, +Hybrid) and Aria return (indices, weights, logits) up to transformers 5.19,
    (logits, weights, indices) in later releases; the indices are the integer tensor."""
    if out[0].is_floating_point():
        return default_reader(out)
    return out[2], out[0]


def logits_topk_reader(out: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routers that select ``topk(logits, k, dim=1)`` but do not return [T, k] indices.

    Llama4 returns (dense scores, logits); JetMoE a 5-tuple ending in the (float) logits. Re-running the
    router's own ``topk`` on its own returned logits reproduces its selection exactly.
    """
    logits = out[1] if len(out) == 2 else out[-1]
    return logits, torch.topk(logits, top_k, dim=1).indices


def block_softmax_topk_reader(out: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DBRX: the router returns logits only; its block selects ``topk(softmax(logits, dim=1))``."""
    probs = torch.nn.functional.softmax(out, dim=1, dtype=out.dtype)
    return out, torch.topk(probs, top_k, dim=-1).indices


def probs_first_reader(out: Any, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gemma4 returns (softmax probabilities, weights, indices): record log-probabilities as logits.

    They differ from the edited logits by a per-token constant, so the recorder's softmax is unchanged.
    """
    return out[0].log(), out[2]


def skip_class_reader(out: Any, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zaya: E+1 classes; a selected skip class comes back as index 0 with weight 0. Restore it as E."""
    logits, weights, indices = out[0], out[1], out[2]
    skip = logits.shape[-1] - 1
    return logits, torch.where(weights == 0, torch.full_like(indices, skip), indices)


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one transformers MoE family's routers.

    Args:
        model_type: ``config.model_type`` this spec applies to.
        router_attr: attribute path from a decoder layer to its router module (e.g. ``"mlp.gate"``).
        style: name of the hand-written router style in ``ttadapt.patches.styles`` or ``"generic"``
            (the TorchFunctionMode interception, exact for any router whose first E-wide linear op
            produces the logits).
        scoring: how probabilities follow from logits (for recording and layer confidence).
        bias_affects: default semantics of the added bias; ``selection_options`` lists those the
            style can honour (``"selection"`` = bias moves the choice only, weights use raw scores).
        layers_path: attribute path from the top model to the list of decoder layers.
        force_margin: logit margin used by hard forcing (SteerMoE semantics: max+margin / min-margin).
        reader: extracts (logits, indices) from the router output for the recorder, called as
            ``reader(out, top_k)``.
        style_options: keyword options passed to the style (e.g. Mixtral's unconditional renorm).
        style_variants: further option sets for other transformers releases; at patch time the first
            set (``style_options``, then these) whose style reproduces the installed router is used
            (:mod:`ttadapt.patches.verify`), else the generic interception.
        num_classes_attr: router attribute holding the width of the logits when it is not the
            number of experts (Zaya's extra skip class, LongcatFlash's zero experts, Inkling's
            shared-expert gates); the state then has that many columns.
        router_class: regex the router's class name must match (default ``ROUTER_CLASS_RE``); used
            for plain ``nn.Linear`` routers (Jamba) and to skip routers a bias cannot steer
            (DeepSeek-V4 hash layers).
        top_k_attr: dotted path from ``model.config`` to top-k when neither the router nor the usual
            config names hold it (DBRX ``ffn_config.moe_top_k``, Gemma4 ``top_k_experts``).
        min_transformers: the oldest transformers release whose router layout this spec matches
            ("" = every release ttadapt supports); older releases get a clear error at patch time.
        notes: one line for ``ttadapt patches``.
    """

    model_type: str
    router_attr: str
    style: str = "generic"
    scoring: Scoring = "softmax"
    bias_affects: BiasAffects = "selection+weights"
    selection_options: tuple[BiasAffects, ...] = ("selection+weights",)
    layers_path: str = "model.layers"
    force_margin: float = 0.01
    reader: OutputReader = default_reader
    style_options: dict[str, Any] = field(default_factory=dict)
    style_variants: tuple[dict[str, Any], ...] = ()
    num_classes_attr: str | None = None
    router_class: str | None = None
    top_k_attr: str | None = None
    min_transformers: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.bias_affects not in self.selection_options:
            raise ValueError(
                f"{self.model_type}: default bias_affects={self.bias_affects!r} is not in "
                f"selection_options={self.selection_options}"
            )
        if self.force_margin <= 0:
            raise ValueError(f"{self.model_type}: force_margin must be > 0")


@dataclass(frozen=True)
class RouterSite:
    """One MoE router bound in a model: its true decoder-layer index and module."""

    layer_id: int
    path: str
    module: nn.Module
    num_experts: int
    top_k: int


def _num_experts(router: nn.Module, spec: FamilySpec) -> int:
    if spec.num_classes_attr and isinstance(getattr(router, spec.num_classes_attr, None), int):
        return int(getattr(router, spec.num_classes_attr))
    for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
        v = getattr(router, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    w = getattr(router, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    for sub in router.modules():
        if isinstance(sub, nn.Linear):
            return int(sub.out_features)
    raise ValueError(f"cannot read the number of experts of router {type(router).__name__}")


def _top_k(router: nn.Module, config: Any, spec: FamilySpec | None = None) -> int:
    if spec is not None and spec.top_k_attr:
        v: Any = config
        for part in spec.top_k_attr.split("."):
            v = getattr(v, part, None)
        if isinstance(v, int) and v > 0:
            return v
        raise ValueError(f"{spec.model_type}: config.{spec.top_k_attr} is not a positive int ({v!r})")
    for attr in ("top_k", "num_experts_per_tok", "k"):
        v = getattr(router, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    for attr in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
            return int(v[0])
    raise ValueError(f"cannot read top-k of router {type(router).__name__}")


def find_sites(model: nn.Module, spec: FamilySpec) -> list[RouterSite]:
    """Locate every MoE router of ``model`` following ``spec``; dense layers are skipped."""
    try:
        layers = model.get_submodule(spec.layers_path)
    except AttributeError as exc:
        raise ValueError(
            f"{spec.model_type}: the model has no {spec.layers_path!r}; is this a causal LM "
            f"(e.g. AutoModelForCausalLM) of that family?"
        ) from exc
    config = getattr(model, "config", None)
    class_re = re.compile(spec.router_class) if spec.router_class else ROUTER_CLASS_RE
    sites = []
    for i, layer in enumerate(layers):
        try:
            router = layer.get_submodule(spec.router_attr)
        except AttributeError:
            continue  # dense layer (first_k_dense_replace, mlp_only_layers, hybrid blocks)
        if not class_re.search(type(router).__name__):
            continue
        sites.append(
            RouterSite(
                layer_id=i,
                path=f"{spec.layers_path}.{i}.{spec.router_attr}",
                module=router,
                num_experts=_num_experts(router, spec),
                top_k=_top_k(router, config, spec),
            )
        )
    return sites
