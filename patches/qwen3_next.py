"""Qwen3-Next, Qwen3.5-MoE and Qwen4-Exp (text): the Qwen softmax top-k router on hybrid models.

Qwen3-Next and Qwen4-Exp routers are line-for-line Qwen3-MoE's (renorm iff ``norm_topk_prob``);
Qwen3.5-MoE always renormalises. Linear-attention layers keep a recurrent cache, the MoE blocks are
ordinary.
"""

from .base import FamilySpec

_BOTH = ("selection+weights", "selection")

SPECS = (
    FamilySpec(
        model_type="qwen3_next",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=_BOTH,
        notes="softmax top-k (Qwen); hybrid Gated-DeltaNet layers; shared expert not a router",
    ),
    FamilySpec(
        model_type="qwen3_5_moe_text",
        router_attr="mlp.gate",
        style="softmax_topk",
        style_options={"always_renorm": True},
        selection_options=_BOTH,
        notes="softmax top-k, always renorm; hybrid linear-attention layers",
    ),
    FamilySpec(
        model_type="qwen4_exp_text",
        router_attr="mlp.gate",
        style="softmax_topk",
        selection_options=_BOTH,
        notes="softmax top-k (Qwen); hybrid layers with hyper-connections",
    ),
)
