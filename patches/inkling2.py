"""Inkling 2 (text): fp32 logits, ``scoring_func`` (sigmoid) scores, top-k of scores + correction bias,
weights renormalised and scaled. Its decoder layers also read attention residuals over earlier blocks,
so the rounds recompute the layers below the adapted ones instead of replaying them
(``ttadapt.layer_skip.check_replay``). Generic interception.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="inkling2_text",
        min_transformers="5.23",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid + corr top-k, renorm, scaled; attention residuals; generic interception",
    ),
)
