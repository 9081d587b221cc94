"""DeepSeek-V3 family: sigmoid + e_score_correction_bias, grouped top-k, weights from the sigmoid.

A logit-space bias changes selection *and* weights (sigmoid(z + b)) and has a gradient;
``bias_affects="selection"`` instead moves only the choice, like the correction bias (no gradient).

Every model_type below has a router whose ``forward`` is line-for-line DeepSeek-V3's
(``DeepseekV3TopkRouter.forward``: fp32 ``F.linear``, sigmoid, + correction buffer, sum of the top-2
per group, ``topk_group`` groups masked to -inf, top-k, gather the uncorrected sigmoid, renorm iff
``norm_topk_prob`` (+1e-20), x ``routed_scaling_factor``), so they share the hand-written style.
Hard forcing is best-effort here: a forced-in expert whose group loses the group vote can still be
masked out, because the group score is computed after the edit from the top-2 of each group.
"""

from .base import FamilySpec

_COMMON = dict(
    router_attr="mlp.gate",
    style="sigmoid_group",
    scoring="sigmoid",
    selection_options=("selection+weights", "selection"),
    force_margin=30.0,
)

SPECS = tuple(
    FamilySpec(model_type=mt, notes=f"sigmoid+corr grouped top-k (DeepSeek-V3 router){extra}", **_COMMON)
    for mt, extra in (
        ("deepseek_v3", ""),
        ("deepseek_v32", ""),
        ("glm4_moe", ""),
        ("glm4_moe_lite", ""),
        ("glm_moe_dsa", ""),
        ("dots1", ""),
        ("kimi_linear", "; hybrid linear-attention layers"),
        ("solar_open", ""),
        ("exaone_moe", ""),
        ("mimo_v2_flash", ""),
        ("axk1", ""),
        ("hy_v4", ""),
    )
) + tuple(
    FamilySpec(model_type=mt, min_transformers=since, notes=f"sigmoid+corr grouped top-k (DeepSeek-V3 router){extra}", **_COMMON)
    for mt, since, extra in (
        ("bailing_hybrid", "5.20", "; hybrid linear-attention layers"),
        ("dots3_note_text", "5.23", ""),
    )
) + (
    FamilySpec(
        model_type="nemotron_h",
        notes="sigmoid+corr grouped top-k (DeepSeek-V3 router) in the 'moe' blocks of a hybrid Mamba model",
        **{**_COMMON, "router_attr": "mixer.gate"},
    ),
)
