"""Mixtral: fp32 softmax, top-k, always renormalised (= softmax over the selected logits)."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="mixtral",
        router_attr="mlp.gate",
        style="softmax_topk",
        style_options={"always_renorm": True, "cast_weights": False, "float_logits": True},
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k, always renorm; never-selected experts get zero gradient",
    ),
)
