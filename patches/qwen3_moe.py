"""Qwen3-MoE: softmax top-k, renormalised over the selected experts in real checkpoints."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="qwen3_moe",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k, renorm iff norm_topk_prob; dense mlp_only_layers skipped",
    ),
)
