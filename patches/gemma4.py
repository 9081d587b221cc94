"""Gemma4 (text): ``model.layers[i].router`` = RMSNorm, scale, ``proj`` Linear -> softmax -> top-k ->
renorm x per-expert scale. It returns the *probabilities* first, so the recorder stores their log
(softmax-equivalent to the edited logits). Generic interception. The multimodal ``gemma4``
(``Gemma4ForConditionalGeneration``) is not registered: load the text model (``Gemma4ForCausalLM``).
"""

from .base import FamilySpec, probs_first_reader

SPECS = (
    FamilySpec(
        model_type="gemma4_text",
        router_attr="router",
        reader=probs_first_reader,
        top_k_attr="top_k_experts",
        notes="norm + proj + softmax top-k, renorm x per-expert scale; generic interception",
    ),
)
