"""Laguna: fp32 logits, optional tanh soft-capping, sigmoid, top-k of sigmoid + correction bias, weights
from the uncorrected sigmoid, renormalised. The bias is added before the soft-cap (to the raw
``F.linear`` output; generic interception), so a +-1e4 bias saturates at +-cap.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="laguna",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="(softcap) sigmoid + corr top-k, renorm; generic interception",
    ),
)
