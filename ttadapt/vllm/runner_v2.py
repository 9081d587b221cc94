"""Model Runner V2 adapter: which router-table row each token of a V2 forward reads.

V2 keeps each request in a persistent state slot (``req_states.req_id_to_index``, recycled through
a free list) and describes a step by ``idx_mapping`` (batch position -> slot) and
``query_start_loc``; unlike V1 it has no per-token request buffer. So after
``GPUModelRunner.prepare_inputs`` builds a step's ``InputBatch``, :func:`fill_rows` writes the slot
of every token into a persistent ``[max_num_tokens]`` buffer that the gate hooks gather from
(padding tokens read the table's zero row). Table rows are slots; the logits processor's V2
``add_request(slot, params)`` fills them.

The V2 runner module is wrapped when it is first imported (:func:`install`), never imported here:
plugins load before vLLM imports the worker class, and on CPU ``vllm.v1.worker.cpu_worker`` patches
torch and vLLM helpers that the V2 modules bind at import time.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger("vllm.ttadapt")

MODULE = "vllm.v1.worker.gpu.model_runner"
"""Defines V2's ``GPUModelRunner``; the CPU V2 runner (``vllm.v1.worker.cpu.model_runner``) subclasses it."""
_MARK = "_ttadapt_wrapped"
_lock = threading.Lock()


def is_v2(runner: Any) -> bool:
    """Whether ``runner`` is a Model Runner V2 (GPU or CPU) instance."""
    return any(c.__module__ == MODULE for c in type(runner).__mro__)


def max_num_reqs(runner: Any) -> int:
    return int(runner.max_num_reqs)


def new_rows(runner: Any, pad_row: int, device: Any) -> Any:
    """The persistent token -> slot buffer of a V2 runner, every entry ``pad_row`` (the zero row)."""
    import torch

    return torch.full((int(runner.max_num_tokens),), pad_row, dtype=torch.int64, device=device)


def token_rows(slots: np.ndarray, query_start_loc: np.ndarray, num_tokens: int, pad_row: int) -> np.ndarray:
    """Slot of each of the ``num_tokens`` (padded) tokens: request ``b`` owns tokens
    ``query_start_loc[b]:query_start_loc[b + 1]``; tokens after the last request get ``pad_row``."""
    qsl = np.asarray(query_start_loc[: len(slots) + 1], dtype=np.int64)
    out = np.full(num_tokens, pad_row, dtype=np.int64)
    n = int(qsl[-1]) if len(slots) else 0
    out[:n] = np.repeat(np.asarray(slots, dtype=np.int64), np.diff(qsl))
    return out


def fill_rows(table: Any, input_batch: Any) -> None:
    """Write this step's token -> slot map into ``table.rows`` and the step's eager fast-path flags."""
    from vllm.utils import torch_utils

    slots = input_batch.idx_mapping_np[: input_batch.num_reqs]
    T = int(input_batch.num_tokens_after_padding)
    rows = token_rows(slots, input_batch.query_start_loc_np, T, table.pad_row)
    # Looked up at call time: the CPU worker swaps in a synchronous version.
    torch_utils.async_tensor_h2d(rows, out=table.rows[:T])
    table.set_step_rows(slots)


def install(wrap_load_model: Callable[[type], None]) -> None:
    """Wrap V2's ``load_model`` (with ``wrap_load_model``) and ``prepare_inputs`` once its module loads."""

    def on_import(module: ModuleType) -> None:
        cls = module.GPUModelRunner
        wrap_load_model(cls)
        _wrap_prepare_inputs(cls)

    with _lock:
        module = sys.modules.get(MODULE)
        if module is None:
            if not any(isinstance(f, _OnImport) for f in sys.meta_path):
                sys.meta_path.insert(0, _OnImport(MODULE, on_import))
            return
    on_import(module)


def _wrap_prepare_inputs(cls: type) -> None:
    orig = cls.__dict__.get("prepare_inputs")
    if orig is None or getattr(orig, _MARK, False):
        return

    def prepare_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        input_batch = orig(self, *args, **kwargs)
        table = getattr(self, "_ttadapt_table", None)
        if table is not None:
            try:
                fill_rows(table, input_batch)
            except Exception:  # never break a step: every token reads the zero row (no edit)
                table.rows.fill_(table.pad_row)
                table.step_flags = (False, False)
                table.unmapped_steps += 1
                if table.unmapped_steps == 1:
                    logger.exception("ttadapt: could not map V2 tokens to router-table rows; payloads "
                                     "are not applied")
        return input_batch

    setattr(prepare_inputs, _MARK, True)
    prepare_inputs.__wrapped__ = orig  # type: ignore[attr-defined]
    cls.prepare_inputs = prepare_inputs  # type: ignore[attr-defined]


class _OnImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after module ``name`` is first executed (one shot)."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def run(module: ModuleType) -> None:
            exec_module(module)
            try:
                callback(module)
            except Exception:  # never break vLLM's import; V2 payloads then find no table
                logger.exception("ttadapt: could not wrap vLLM's V2 model runner")

        spec.loader.exec_module = run  # type: ignore[method-assign]
        return spec
