"""MiniMax family.

- ``minimax``: line-for-line the Mixtral router (fp32 softmax, top-k, always renorm).
- ``minimax_m2`` / ``minimax_m3_vl_text``: sigmoid + correction bias (M2 passes it in as an argument,
  M3 holds a buffer), top-k without groups, weights from the uncorrected sigmoid, renormalised.
  Generic interception; hard forcing uses a wide margin so it beats the correction bias.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="minimax",
        router_attr="mlp.gate",
        style="softmax_topk",
        style_options={"always_renorm": True, "cast_weights": False, "float_logits": True},
        selection_options=("selection+weights", "selection"),
        notes="softmax top-k, always renorm (Mixtral router)",
    ),
    FamilySpec(
        model_type="minimax_m2",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid + correction bias (argument), top-k, renorm; generic interception",
    ),
    FamilySpec(
        model_type="minimax_m3_vl_text",
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sigmoid + correction bias (buffer), top-k, renorm; generic interception",
    ),
)
