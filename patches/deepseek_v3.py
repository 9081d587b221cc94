"""DeepSeek-V3 family: sigmoid + e_score_correction_bias, grouped top-k, weights from the sigmoid.

A logit-space bias changes selection *and* weights (sigmoid(z + b)) and has a gradient;
``bias_affects="selection"`` instead moves only the choice, like the correction bias (no gradient).
"""

from .base import FamilySpec

_COMMON = dict(
    router_attr="mlp.gate",
    style="sigmoid_group",
    scoring="sigmoid",
    selection_options=("selection+weights", "selection"),
    force_margin=30.0,
)

SPECS = (
    FamilySpec(model_type="deepseek_v3", notes="sigmoid+corr grouped top-k", **_COMMON),
)
