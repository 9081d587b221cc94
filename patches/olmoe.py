"""OLMoE: softmax over all experts, top-k on probabilities, renorm iff ``norm_topk_prob``."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="olmoe",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k; bias changes selection and weights",
    ),
)
