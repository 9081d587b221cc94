"""Lara-mini: fp32 logits, softmax over the experts, top-k, optional renorm, weights cast to the hidden
dtype; hybrid Gated-DeltaNet layers. Generic interception (the fp32 upcast differs from the Qwen style
in half precision).
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="lara_mini",
        min_transformers="5.24",
        router_attr="mlp.gate",
        notes="fp32 softmax top-k, renorm; hybrid Gated-DeltaNet layers; generic interception",
    ),
)
