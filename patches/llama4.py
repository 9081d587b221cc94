"""Llama4 (text): ``feed_forward.router`` (an ``nn.Linear`` subclass): top-k on the logits (k=1 in
released checkpoints), sigmoid of the selected values scattered into a dense [T, E]. Returns
``(scores, logits)``; the recorder re-runs the router's top-k on the returned logits.
Generic interception.
"""

from .base import FamilySpec, logits_topk_reader

SPECS = (
    FamilySpec(
        model_type="llama4_text",
        router_attr="feed_forward.router",
        scoring="sigmoid",
        reader=logits_topk_reader,
        notes="top-k on logits, sigmoid of the selected (dense scores); generic interception",
    ),
)
