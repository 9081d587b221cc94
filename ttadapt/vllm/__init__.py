"""ttadapt's vLLM integration (extra ``ttadapt[vllm]``; vLLM 0.32-0.33, V1 and V2 model runners).

``import ttadapt`` never imports this package, and importing it does not import vLLM: the wire
format (:mod:`ttadapt.vllm.payload`) is pure Python. The plugin, logits processor and helpers that
need vLLM are loaded on first use.

Quick start::

    from ttadapt.vllm import make_llm, sampling_params, prompt
    llm = make_llm("path/to/olmoe")                      # plugin + logits processor, enforce_eager
    sp = sampling_params(state, max_tokens=64, temperature=0)
    out = llm.generate([prompt("The capital of France is", state)], sp)

Adapting without an HF copy of the weights: ``search_adapt(llm, prompt_ids)`` (gradient-free, scored by
the engine), or ``generate(llm, prompts, trainer="search")`` for chunked online rerouting.

See ``docs/vllm.md`` for the request schema (offline and HTTP) and the limits.
"""

from __future__ import annotations

from typing import Any

from ttadapt.vllm.payload import (
    ALL_LAYERS,
    PAYLOAD_KEY,
    Layout,
    Payload,
    PayloadError,
    Steer,
    decode,
    encode,
    encode_state,
    payload_salt,
    steer_payload,
)

_LAZY = {
    "make_llm": "ttadapt.vllm.sampling",
    "model_layout": "ttadapt.vllm.sampling",
    "payload_for": "ttadapt.vllm.sampling",
    "prompt": "ttadapt.vllm.sampling",
    "sampling_params": "ttadapt.vllm.sampling",
    "generate": "ttadapt.vllm.generation",
    "context_nll": "ttadapt.vllm.scoring",
    "search_adapt": "ttadapt.vllm.search",
    "SearchConfig": "ttadapt.vllm.search",
    "SearchTrace": "ttadapt.vllm.search",
    "register": "ttadapt.vllm.plugin",
    "TTAdaptLogitsProcessor": "ttadapt.vllm.logits_processor",
}

__all__ = [
    "ALL_LAYERS",
    "PAYLOAD_KEY",
    "Layout",
    "Payload",
    "PayloadError",
    "SearchConfig",
    "SearchTrace",
    "Steer",
    "TTAdaptLogitsProcessor",
    "context_nll",
    "decode",
    "encode",
    "encode_state",
    "generate",
    "make_llm",
    "model_layout",
    "payload_for",
    "payload_salt",
    "prompt",
    "register",
    "sampling_params",
    "search_adapt",
    "steer_payload",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ttadapt.vllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
