"""LongcatFlash: fp32 ``F.linear(h, classifier.weight)`` (bypasses ``classifier.__call__``, so a hook on
it never fires), softmax, top-k of probabilities + correction bias, weights gathered x scaling.
The logits also cover ``zero_expert_num`` "zero" experts (identity experts), so the state has
``n_routed_experts + zero_expert_num`` columns (``num_classes_attr``). Generic interception. Before
transformers 5.19 the router returned no logits (nothing for the routing recorder): not supported.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="longcat_flash",
        router_attr="mlp.router",
        num_classes_attr="n_routed_experts",
        force_margin=30.0,
        min_transformers="5.19",
        notes="softmax + corr top-k incl. zero experts; generic interception",
    ),
)
