"""V1 logits processor that keeps ttadapt's router table in sync with vLLM's persistent batch.

It never changes sampling logits (``apply`` is the identity, ``is_argmax_invariant`` is True). Its
job is ``update_state``: vLLM calls it before every forward with the rows that were removed, added
(with their ``SamplingParams``) and moved, and it copies each request's ``extra_args["ttadapt"]``
into that request's table row. ``validate_params`` rejects malformed payloads at admission.

Load it with ``LLM(..., logits_processors=[TTAdaptLogitsProcessor])`` (``ttadapt.vllm.make_llm``
does) or ``vllm serve ... --logits-processors ttadapt.vllm.logits_processor:TTAdaptLogitsProcessor``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ttadapt.vllm import plugin
from ttadapt.vllm.payload import PAYLOAD_KEY

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

# A child of vLLM's "vllm" logger, so messages go through vLLM's handlers and format.
logger = logging.getLogger("vllm.ttadapt")

FQCN = "ttadapt.vllm.logits_processor:TTAdaptLogitsProcessor"


class TTAdaptLogitsProcessor(LogitsProcessor):
    """Fills the router-table rows from ``extra_args["ttadapt"]``; leaves sampling untouched."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.vllm_config = vllm_config
        self._warned = False

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        plugin.validate_request_payload(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        table = plugin.table_for(self.vllm_config)
        if table is None:
            if not self._warned and any(
                PAYLOAD_KEY in (getattr(p, "extra_args", None) or {}) for _, p, _, _ in batch_update.added
            ):
                self._warned = True
                logger.error(
                    "ttadapt: a request carries a router payload but no router table exists in this "
                    "worker (plugin not registered before the model loaded, or the model has no "
                    "GateLinear); the payload is ignored"
                )
            return
        # vLLM's contract: apply removed, then added, then moved.
        for row in batch_update.removed:
            table.clear(row)
        for row, params, _prompt, _output in batch_update.added:
            table.set_from_params(row, params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                table.swap(a, b)
            else:
                table.move(a, b)

    def __repr__(self) -> str:
        return "TTAdaptLogitsProcessor()"
