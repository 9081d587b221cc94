"""DBRX: ``transformer.blocks[i].ffn.router`` returns the logits only; the FFN block applies softmax,
top-k and a p-norm. The bias is added to the router's logits (generic interception), and the recorder
re-runs the block's softmax top-k to report the selection. Jitter only in training mode.
"""

from .base import FamilySpec, block_softmax_topk_reader

SPECS = (
    FamilySpec(
        model_type="dbrx",
        router_attr="ffn.router",
        layers_path="transformer.blocks",
        reader=block_softmax_topk_reader,
        top_k_attr="ffn_config.moe_top_k",
        notes="logits-only router, block does softmax top-k; generic interception",
    ),
)
