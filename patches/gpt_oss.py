"""GPT-OSS: top-k on the (biased) logits, softmax over the selected values."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="gpt_oss",
        router_attr="mlp.router",
        style="topk_softmax",
        selection_options=("selection+weights", "selection"),
        notes="top-k on logits then softmax over the k; unselected experts get zero gradient",
    ),
)
