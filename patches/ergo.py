"""Ergo: a linear with fp32 output scores the experts; sigmoid, top-k of sigmoid + correction bias,
weights from the uncorrected sigmoid, renormalised and scaled; shared experts untouched.
Generic interception (the router's linear is the first E-wide op).
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="ergo",
        min_transformers="5.25",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid + corr top-k, renorm, scaled; generic interception",
    ),
)
