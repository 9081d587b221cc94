"""Inkling (text): one Linear scores ``n_routed_experts`` routed experts and ``n_shared_experts``
shared-expert gates together. Selection is top-k of sigmoid(routed) + correction bias; the weights and
the shared gates come from one softmax over the log-sigmoids of the selected and shared logits.

The state therefore has ``n_routed + n_shared`` columns (``num_classes_attr="n_total_experts"``): the
last ``n_shared`` bias the always-on shared experts' gates (they cannot be selected or dropped).
Generic interception.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="inkling_text",
        router_attr="mlp.gate",
        scoring="sigmoid",
        num_classes_attr="n_total_experts",
        force_margin=30.0,
        notes="sigmoid + corr top-k; last columns bias the shared-expert gates; generic interception",
    ),
)
