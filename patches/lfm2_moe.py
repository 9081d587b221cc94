"""LFM2-MoE: sigmoid; top-k of sigmoid + ``expert_bias`` (passed in) when ``use_expert_bias``, else of the
sigmoid; renorm iff ``norm_topk_prob`` (+1e-6), x ``routed_scaling_factor``. Dense first layers and
short-conv layers. Generic interception.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="lfm2_moe",
        router_attr="feed_forward.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid (+ expert_bias) top-k, renorm, scaled; generic interception",
    ),
)
