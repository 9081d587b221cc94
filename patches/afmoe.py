"""AFMoE: ``gate`` Linear, sigmoid, top-k of sigmoid + ``expert_bias`` (passed in by the block), weights
from the uncorrected sigmoid, renormalised, x ``route_scale``. Generic interception; dense first layers.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="afmoe",
        router_attr="mlp.router",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid + expert_bias top-k, renorm, scaled; generic interception",
    ),
)
