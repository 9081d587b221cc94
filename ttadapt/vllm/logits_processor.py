"""Logits processor that keeps ttadapt's router table in sync with vLLM's requests (both runners).

It never changes sampling logits. One class implements both of vLLM's logits-processor interfaces,
so the same qualified name works whichever model runner the engine picks:

* V1 (``vllm.v1.sample.logits_processor``): ``update_state`` receives the persistent batch's
  removed / added (with ``SamplingParams``) / moved rows before every forward, and each request's
  ``extra_args["ttadapt"]`` is copied into its row. ``apply`` is the identity.
* V2 (``vllm.v1.worker.gpu.sample.logits_processor``): ``add_request(slot, params)`` fills the
  request's state-slot row when it enters the batch and returns False, so the sampler never calls
  ``apply`` for it. V2 has no removal callback: a freed slot is re-initialised on reuse.

``validate_params`` rejects malformed payloads at admission (both runners).

Load it with ``LLM(..., logits_processors=[TTAdaptLogitsProcessor])`` (``ttadapt.vllm.make_llm``
does) or ``vllm serve ... --logits-processors ttadapt.vllm.logits_processor:TTAdaptLogitsProcessor``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ttadapt.vllm import plugin
from ttadapt.vllm.payload import PAYLOAD_KEY

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # e.g. vLLM 0.34 dropped this (V1) interface: name the supported releases instead
    plugin.check_version()
    raise

try:  # vLLM 0.32+: Model Runner V2's interface (import-light; no worker modules)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2
except ImportError:  # pragma: no cover - a vLLM without Model Runner V2

    class LogitsProcessorV2:  # type: ignore[no-redef]
        """Stand-in base when vLLM has no Model Runner V2."""


if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

# A child of vLLM's "vllm" logger, so messages go through vLLM's handlers and format.
logger = logging.getLogger("vllm.ttadapt")

FQCN = "ttadapt.vllm.logits_processor:TTAdaptLogitsProcessor"


class TTAdaptLogitsProcessor(LogitsProcessor, LogitsProcessorV2):
    """Fills the router-table rows from ``extra_args["ttadapt"]``; leaves sampling untouched."""

    def __init__(self, vllm_config: VllmConfig, *_runner_args: Any) -> None:
        # V1 passes (device, is_pin_memory), V2 passes (req_states); neither is needed.
        self.vllm_config = vllm_config
        self._warned = False

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        plugin.validate_request_payload(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return logits

    # ------------------------------------------------------------------------------- V1
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        table = self._table(p for _, p, _, _ in batch_update.added)
        if table is None:
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

    # ------------------------------------------------------------------------------- V2
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        table = self._table([sampling_params])
        if table is not None:
            table.set_from_params(req_idx, sampling_params)
        return False  # never modifies sampling logits

    def apply_staged_writes(self) -> None:
        return None

    # -------------------------------------------------------------------------------
    def _table(self, params: Any) -> plugin.RouterTable | None:
        table = plugin.table_for(self.vllm_config)
        if table is None and not self._warned and any(
            PAYLOAD_KEY in (getattr(p, "extra_args", None) or {}) for p in params
        ):
            self._warned = True
            logger.error(
                "ttadapt: a request carries a router payload but no router table exists in this "
                "worker (plugin not registered before the model loaded, or the model has no "
                "GateLinear); the payload is ignored"
            )
        return table

    def __repr__(self) -> str:
        return "TTAdaptLogitsProcessor()"
