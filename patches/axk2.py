"""AXK2: DeepSeek-V3-like sigmoid + correction bias, but groups are optional (``n_group=None`` on light
checkpoints) and masked groups are filled with 0 instead of -inf, so it is not the V3 style: generic
interception. Hard forcing is best-effort when groups are on.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="axk2",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid+corr, optional grouped top-k (0-filled); generic interception",
    ),
)
