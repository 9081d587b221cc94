"""Zaya: the router is an MLP (down-projection + ``router_mlp``) with E+1 classes, the last a "skip"
expert that does no compute; softmax over the E+1, top-1 of softmax + balancing biases. The state has
E+1 columns (``num_classes_attr="num_router_classes"``): column E biases the skip class. The router
reports a chosen skip as index 0 with weight 0; the recorder restores it as index E.
Generic interception (the first (E+1)-wide matmul is the router MLP's output projection).
"""

from .base import FamilySpec, skip_class_reader

SPECS = (
    FamilySpec(
        model_type="zaya",
        router_attr="mlp.gate",
        num_classes_attr="num_router_classes",
        reader=skip_class_reader,
        force_margin=30.0,
        notes="router MLP, E+1 classes incl. a skip expert, top-1; generic interception",
    ),
)
