"""Hand-written router styles: the model's own router maths with the edit applied to the logits.

Each style reproduces a transformers 5.x router family line for line after ``F.linear`` (checked
bit-for-bit against the unpatched router and against the generic interception in the tests), so a
zero edit is exact and the call costs no interception overhead. ``selection_only`` makes the edit
move the choice of experts while the weights keep the unedited scores (like DeepSeek-V3's
``e_score_correction_bias``); the bias then receives no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EditFn = Callable[[torch.Tensor], torch.Tensor]


def softmax_topk(
    router: nn.Module, hidden: torch.Tensor, edit: EditFn, selection_only: bool, *,
    straight_through: bool = False,
    always_renorm: bool = False, cast_weights: bool = True, float_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral: softmax over E, top-k, optional renorm."""
    hidden = hidden.reshape(-1, router.hidden_dim)
    raw = F.linear(hidden, router.weight)
    logits = edit(raw)
    src = logits.float() if float_logits else logits
    probs = F.softmax(src, dim=-1, dtype=torch.float)
    top_v, top_i = torch.topk(probs, router.top_k, dim=-1)
    if selection_only:
        raw_src = raw.float() if float_logits else raw
        top_v = F.softmax(raw_src, dim=-1, dtype=torch.float).gather(1, top_i)
    if always_renorm or getattr(router, "norm_topk_prob", False):
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    if straight_through and not selection_only:
        top_v = _straight_through(top_v, probs.gather(1, top_i))
    if cast_weights:
        top_v = top_v.to(logits.dtype)
    return logits, top_v, top_i


def topk_softmax(
    router: nn.Module, hidden: torch.Tensor, edit: EditFn, selection_only: bool, *,
    straight_through: bool = False,
    linear_bias: bool = True, float_logits: bool = False, cast_like_hidden: bool = False,
    index_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k on the logits, softmax over the selected values.

    GPT-OSS (defaults: the router's own bias enters ``F.linear``); GraniteMoE (+Shared, +Hybrid, +SWA:
    ``linear_bias=False, float_logits=True, cast_like_hidden=True``, index-first output except SWA);
    Aria (``linear_bias=False, index_first=True``).
    """
    raw = F.linear(hidden, router.weight, router.bias) if linear_bias else F.linear(hidden, router.weight)
    logits = edit(raw)
    if float_logits:
        raw, logits = raw.float(), logits.float()
    top_v, top_i = torch.topk(logits, router.top_k, dim=-1)
    if selection_only:
        top_v = raw.gather(-1, top_i)
    scores = F.softmax(top_v, dim=-1, dtype=top_v.dtype)
    if straight_through and not selection_only:
        scores = _straight_through(scores, F.softmax(logits, dim=-1).gather(-1, top_i))
    if cast_like_hidden:
        scores = scores.type_as(hidden)
    if index_first:
        return top_i, scores, logits
    return logits, scores, top_i


def softmax_group(
    router: nn.Module, hidden: torch.Tensor, edit: EditFn, selection_only: bool, *,
    straight_through: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: fp32 softmax, greedy or group-limited greedy top-k, scaled, no renorm."""
    hidden = hidden.view(-1, router.hidden_dim)
    raw = F.linear(hidden.type(torch.float32), router.weight.type(torch.float32))
    logits = edit(raw)
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, router.num_group, router.num_experts // router.num_group).max(dim=-1).values
        scores = _keep_top_groups(scores, group_scores, router.topk_group, 0.0)
    elif router.topk_method != "greedy":
        raise ValueError(f"unsupported DeepSeek-V2 topk_method {router.topk_method!r}")
    top_v, top_i = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    if selection_only:
        top_v = raw.softmax(dim=-1, dtype=torch.float32).gather(1, top_i)
    return logits, top_v * router.routed_scaling_factor, top_i


def sigmoid_group(
    router: nn.Module, hidden: torch.Tensor, edit: EditFn, selection_only: bool, *,
    straight_through: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM4-MoE / dots1: sigmoid + correction bias, grouped top-k, weights from sigmoid."""
    hidden = hidden.view(-1, router.hidden_dim)
    raw = F.linear(hidden.type(torch.float32), router.weight.type(torch.float32))
    logits = edit(raw)
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias
    n_experts = _attr(router, "num_experts", "n_routed_experts")
    n_group = _attr(router, "num_group", "n_group")
    group_scores = choice.view(-1, n_group, n_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = _keep_top_groups(choice, group_scores, router.topk_group, float("-inf"))
    top_i = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    top_v = (raw.sigmoid() if selection_only else scores).gather(1, top_i)
    if router.norm_topk_prob:
        top_v = top_v / (top_v.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, top_v * router.routed_scaling_factor, top_i


def _keep_top_groups(scores: torch.Tensor, group_scores: torch.Tensor, topk_group: int, fill: float) -> torch.Tensor:
    """Fill the scores of experts outside the ``topk_group`` best groups with ``fill`` (DeepSeek routing)."""
    n_group = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    keep = group_mask.unsqueeze(-1).expand(-1, n_group, scores.shape[-1] // n_group).reshape(scores.shape)
    return scores.masked_fill(~keep.bool(), fill)


def _straight_through(exact: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Forward value of ``exact``, gradient of ``dense`` (the full-softmax weights of the selected experts)."""
    return exact.detach() + (dense - dense.detach()).to(exact.dtype)


def _attr(router: nn.Module, *names: str) -> Any:
    for name in names:
        if hasattr(router, name):
            return getattr(router, name)
    raise AttributeError(f"{type(router).__name__} has none of {names}")


STYLES: dict[str, Any] = {
    "softmax_topk": softmax_topk,
    "topk_softmax": topk_softmax,
    "softmax_group": softmax_group,
    "sigmoid_group": sigmoid_group,
}
