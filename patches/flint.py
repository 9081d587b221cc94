"""Flint: fp32 logits (autocast off), top-k of the sigmoid scores (no correction bias), optional renorm;
dense ``mlp_only_layers`` skipped. Generic interception (keeps the router's autocast handling).
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="flint",
        min_transformers="5.21",
        router_attr="mlp.gate",
        scoring="sigmoid",
        notes="sigmoid top-k, renorm; generic interception",
    ),
)
