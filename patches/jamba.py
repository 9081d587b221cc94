"""Jamba: up to transformers 5.19 the router is a plain ``nn.Linear`` (``feed_forward.router``) and the MoE
block applies softmax and top-k to its output; later releases make it a ``JambaTopKRouter`` doing the same. Adding the bias to that Linear's output is exactly "before top-k" (generic
interception); the recorder reports top-k of the softmax, which is the block's selection.
Mamba layers and dense layers (``expert_layer_period``) are skipped.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="jamba",
        router_attr="feed_forward.router",
        router_class=r"^Linear$|TopKRouter$",
        notes="Linear router, block does softmax top-k (no renorm); generic interception",
    ),
)
