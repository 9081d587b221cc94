"""Beam: sigmoid + correction bias, grouped top-k (sorted), weights from the uncorrected sigmoid,
renorm; the routed scaling factor is applied by the MoE block after the experts, so the router is not
the DeepSeek-V3 style line for line. Generic interception.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="beam",
        min_transformers="5.21",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid+corr grouped top-k, renorm (block scales); generic interception",
    ),
)
