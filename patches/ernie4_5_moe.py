"""Ernie4.5-MoE: fp32 softmax, selection on probabilities + ``moe_statics`` correction, weights =
gathered probabilities renormalised with a clamp. Generic interception; hard forcing uses a wide
margin so it beats the correction bias.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="ernie4_5_moe",
        router_attr="mlp.gate",
        force_margin=30.0,
        notes="softmax + moe_statics correction top-k, clamped renorm; generic interception",
    ),
)
