"""DeepSeek-V4: learned top-k layers only; the hash-routed layers are skipped.

``DeepseekV4TopKRouter``: scores = ``scoring_func(logits)`` (``sqrtsoftplus`` by default), selection =
top-k of scores + correction bias, weights = gathered scores renormalised, x scaling. Generic
interception. The first ``hash_moe`` layers use ``DeepseekV4HashRouter``, whose selection is the
frozen table ``tid2eid[input_ids]``: a logit bias could only re-weight, never re-route, so those layers
are not patched (like dense layers). The recorder's probabilities use the sigmoid of the logits as a
monotone stand-in for sqrt(softplus) (same per-expert ranking).
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="deepseek_v4",
        router_attr="mlp.gate",
        router_class=r"TopKRouter$",
        scoring="sigmoid",
        force_margin=30.0,
        notes="sqrtsoftplus + corr top-k; hash-routed layers skipped; generic interception",
    ),
)
