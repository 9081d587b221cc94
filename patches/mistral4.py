"""Mistral4: softmax (model dtype), group-limited top-k (sum of top-2 per group, 0-filled), weights
from the softmax, renorm iff ``norm_topk_prob``, scaled. Generic interception; hard forcing is
best-effort (group vote). Not in ``AutoModelForCausalLM``'s mapping: build ``Mistral4ForCausalLM``.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="mistral4",
        router_attr="mlp.gate",
        notes="softmax group-limited top-k; generic interception",
    ),
)
