"""FlexOlmo: line-for-line the OLMoE router (softmax top-k, renorm iff ``norm_topk_prob``)."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="flex_olmo",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k (OLMoE router)",
    ),
)
