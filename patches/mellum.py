"""Mellum: line-for-line the Qwen/OLMoE router (softmax top-k, renorm iff ``norm_topk_prob``)."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="mellum",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k (Qwen router)",
    ),
)
