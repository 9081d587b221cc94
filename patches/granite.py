"""GraniteMoE family: top-k on the fp32 logits, softmax over the selected values.

GraniteMoE, -Shared and -Hybrid return ``(indices, weights, logits)`` up to transformers 5.19 and
``(logits, weights, indices)`` later (``style_variants``); -SWA returns ``(logits, weights, indices)``. The routers are otherwise identical, and reproduced by the
``topk_softmax`` style. Never-selected experts get zero gradient; k=1 gets none at all.
"""

from .base import FamilySpec, index_first_reader

_OPTS = {"linear_bias": False, "float_logits": True, "cast_like_hidden": True}
_BOTH = ("selection+weights", "selection")

SPECS = tuple(
    FamilySpec(
        model_type=mt,
        router_attr="block_sparse_moe.router",
        style="topk_softmax",
        style_options={**_OPTS, "index_first": True},
        style_variants=(_OPTS,),
        reader=index_first_reader,
        selection_options=_BOTH,
        notes=f"top-k on logits then softmax over the k{extra}",
    )
    for mt, extra in (
        ("granitemoe", ""),
        ("granitemoeshared", "; shared MLP"),
        ("granitemoehybrid", "; hybrid Mamba2 layers"),
    )
) + (
    FamilySpec(
        model_type="granitemoe_swa",
        router_attr="block_sparse_moe.router",
        style="topk_softmax",
        style_options=_OPTS,
        selection_options=_BOTH,
        notes="top-k on logits then softmax over the k; sliding-window attention",
    ),
)
