"""Names that differ between transformers releases: the KV-cache argument and output field.

transformers renamed ``past_key_values`` to ``cache`` (in forwards, ``generate`` and model outputs) after 5.19;
the old name still works there but warns, and goes away in 5.40. ttadapt uses whichever the installed release
declares.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

#: The keyword of a model's forward / ``generate`` that takes a KV cache.
CACHE_KW = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a transformers model output (or ``generate`` output) carries, or None."""
    return getattr(out, CACHE_KW, None)
