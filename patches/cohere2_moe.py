"""Cohere2-MoE: top-k on the logits, then softmax (default) or sigmoid (+renorm) over the selected.

``expert_selection_fn="sigmoid"`` checkpoints rank experts identically; the recorder's probabilities
use the softmax over all experts either way. Generic interception.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="cohere2_moe",
        router_attr="mlp.gate",
        notes="top-k on logits then softmax/sigmoid over the k; generic interception",
    ),
)
