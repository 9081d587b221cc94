"""Aria (text): top-k on the logits, softmax over the selected values; returns (indices, weights, logits)."""

from .base import FamilySpec, index_first_reader

SPECS = (
    FamilySpec(
        model_type="aria_text",
        router_attr="mlp.router",
        style="topk_softmax",
        style_options={"linear_bias": False, "index_first": True},
        reader=index_first_reader,
        selection_options=("selection+weights", "selection"),
        notes="top-k on logits then softmax over the k; shared experts",
    ),
)
