"""Tencent Hunyuan MoE routers (generic interception).

- ``hunyuan_v1_moe``: ``gate.wg`` Linear (fp32), softmax, top-k, renorm.
- ``hy_v3``: fp32 logits, sigmoid, top-k of sigmoid + correction bias (passed in by the block),
  weights from the uncorrected sigmoid, renorm, x ``router_scaling_factor``.
(HY-v4's router is DeepSeek-V3's and is registered in ``deepseek_v3``.)
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="hunyuan_v1_moe",
        router_attr="mlp.gate",
        notes="softmax top-k, renorm (inner wg Linear); generic interception",
    ),
    FamilySpec(
        model_type="hy_v3",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid + corr top-k, renorm, scaled; generic interception",
    ),
)
