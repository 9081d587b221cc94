"""Qwen2-MoE (Qwen1.5-MoE): OLMoE-style router; the shared expert's sigmoid gate is not a router."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="qwen2_moe",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k (+ shared expert, untouched); dense mlp_only_layers skipped",
    ),
)
