"""Static-cache decoding across rerouting chunks: one ``StaticCache`` reused by every chunk.

``generate(..., cache_implementation="static")`` is how transformers decodes with a fixed-shape
cache, and what lets it compile the decode step (automatically on CUDA; elsewhere with a
``CompileConfig`` whose ``_compile_all_devices`` is set). A rerouting round rebuilds the context's
cache under the new router state as a ``DynamicCache``; this module copies it into the same static
buffers in place, so the compiled decode step keeps its tensor addresses and is not recompiled.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.cache_utils import Cache, StaticCache, StaticLayer


class StaticDecodeCache:
    """A ``StaticCache`` for ``max_len`` tokens that each chunk's cache is loaded into."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        try:
            cache = StaticCache(config=model.config, max_cache_len=max_len)
        except (KeyError, ValueError, TypeError, NotImplementedError) as exc:  # e.g. DeepSeek-V4's layer kinds
            raise ValueError(
                f"transformers cannot build a static cache for {type(model).__name__} ({type(exc).__name__}: "
                f"{exc}): leave cache_implementation unset (dynamic cache)"
            ) from exc
        odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
        if odd:
            raise ValueError(
                f"cache_implementation='static' with rerouting supports full-attention layers only; this "
                f"model's static cache has {', '.join(odd)} layers (sliding window or other): leave "
                "cache_implementation unset (dynamic cache)"
            )
        self.cache = cache

    def load(self, source: Cache | None) -> StaticCache:
        """The static cache holding ``source``'s keys/values (empty if None: ``generate`` prefills it)."""
        if source is self.cache:
            return self.cache
        self.cache.reset()
        if source is not None:
            layers: list[Any] = getattr(source, "layers", None) or []
            if len(layers) != len(self.cache.layers):
                raise ValueError(f"cache has {len(layers)} layers, the model's static cache {len(self.cache.layers)}")
            for dst, src in zip(self.cache.layers, layers):
                dst.update(src.keys, src.values)
        return self.cache


def wants_static(cache_implementation: Any) -> bool:
    """True for ``"static"``; an error naming the fix for cache kinds chunked rerouting cannot refill."""
    if cache_implementation in (None, "dynamic"):
        return False
    if cache_implementation == "static":
        return True
    raise ValueError(
        f"ttadapt.generate supports cache_implementation None/'dynamic' or 'static', got {cache_implementation!r}: "
        "each rerouting round rebuilds the cache, which other cache kinds cannot take"
    )
