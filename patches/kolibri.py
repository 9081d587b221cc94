"""Kolibri 1 and 1.1: fp32 logits (a bf16 GEMM with fp32 output on CUDA without grad), top-k of the logits
+ correction bias, weights the sigmoid of the selected logits, optional renorm; dense ``mlp_only_layers``
skipped. Generic interception (covers both the ``F.linear`` and the ``torch.mm`` path).
"""

from .base import FamilySpec

SPECS = tuple(
    FamilySpec(
        model_type=mt,
        router_attr="mlp.gate",
        scoring="sigmoid",
        force_margin=30.0,
        min_transformers=since,
        notes=f"top-k of logits + corr, sigmoid weights; generic interception{extra}",
    )
    for mt, since, extra in (("kolibri1", "5.20", ""), ("kolibri1_1", "5.25", "; indexed sparse attention"))
)
