"""Aria (text): top-k on the logits, softmax over the selected values; returns (indices, weights, logits) up to
transformers 5.19 and (logits, weights, indices) later (``style_variants``). Before 5.18 the router was a plain
``nn.Linear`` and the block did the top-k: not supported."""

from .base import FamilySpec, index_first_reader

SPECS = (
    FamilySpec(
        model_type="aria_text",
        router_attr="mlp.router",
        style="topk_softmax",
        style_options={"linear_bias": False, "index_first": True},
        style_variants=({"linear_bias": False},),
        reader=index_first_reader,
        selection_options=("selection+weights", "selection"),
        min_transformers="5.18",
        notes="top-k on logits then softmax over the k; shared experts",
    ),
)
