"""PhiMoE: ``mlp.router`` (an ``nn.Linear`` subclass) + ``sparsemixer``: top-1 by argmax, then top-2 by
argmax of the rest, each weighted by a softmax over the logits within a relative threshold
2 x ``router_jitter_noise`` of the winner. Generic interception.

Gradient caveat: in eval mode a weight depends on the bias only through experts inside that
threshold, so ``delta`` gets a gradient only from tokens with a near-tie (none when the jitter is 0,
weak at the shipped 0.01). Selection, forcing, exactness and caching work as for any family. In
training mode sparsemixer samples (Gumbel) and uses a custom autograd function.
"""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="phimoe",
        router_attr="mlp.router",
        notes="sparsemixer top-2; gradient only at near-ties (see module doc); generic interception",
    ),
)
