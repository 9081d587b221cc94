"""JetMoE: ``mlp.router`` (``JetMoeTopKGating``, inner ``layer`` Linear): top-k on fp32 logits, softmax over
the k; returns a sorted 5-tuple, so the recorder re-runs its top-k on the returned logits. The
mixture-of-attention router (``self_attention.experts.router``) is not patched. Generic interception.
"""

from .base import FamilySpec, logits_topk_reader

SPECS = (
    FamilySpec(
        model_type="jetmoe",
        router_attr="mlp.router",
        reader=logits_topk_reader,
        notes="top-k on logits then softmax over the k (MLP router only); generic interception",
    ),
)
