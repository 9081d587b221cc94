"""MiniCPM5-MoE: the DeepSeek-V3 router maths (sigmoid + correction bias, grouped top-k, renorm, scaled)
with fp32 logits under disabled autocast; shared experts untouched. Generic interception, which keeps
the router's autocast handling (the ``sigmoid_group`` style would run its linear under autocast).
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="minicpm5_moe",
        min_transformers="5.25",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid+corr grouped top-k, renorm, scaled (fp32, autocast off); generic interception",
    ),
)
