"""Model Runner V2 support without an engine: token -> slot rows, step flags, admission limits and
the logits processor's two interfaces. Only the last tests need vLLM; the rest run anywhere."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch

from ttadapt.vllm import plugin
from ttadapt.vllm.payload import Layout, steer_payload
from ttadapt.vllm.plugin import RouterTable, unsupported_engine
from ttadapt.vllm.runner_v2 import token_rows

LAYOUT = Layout(layer_ids=(0, 1), num_experts=4)
R = 6  # max_num_reqs: rows 0..5 are slots, row 6 is the zero row


def _table(dynamic: bool = True) -> RouterTable:
    return RouterTable(
        layout=LAYOUT,
        bias=torch.zeros(R + 1, 2, 4),
        force=torch.zeros(R + 1, 2, 4, dtype=torch.int8),
        rows=torch.full((32,), R, dtype=torch.long),
        margin=0.01,
        dynamic=dynamic,
    )


def _params(values: Any) -> Any:
    return types.SimpleNamespace(extra_args=None if values is None else {"ttadapt": values})


def test_token_rows_follow_query_start_loc_and_pad_with_zero_row() -> None:
    # Batch order is not slot order: batch position b -> slot slots[b], owning qsl[b]:qsl[b+1].
    slots = np.array([5, 2, 0])
    qsl = np.array([0, 3, 4, 9, 9, 9], dtype=np.int32)  # padded past num_reqs, as V2 pads it
    got = token_rows(slots, qsl, 12, pad_row=R)
    assert got.tolist() == [5, 5, 5, 2, 0, 0, 0, 0, 0, R, R, R]
    assert token_rows(np.array([], dtype=np.intp), np.array([0]), 3, pad_row=R).tolist() == [R] * 3


def test_hook_reads_rows_by_slot_and_step_flags_gate_the_fast_path() -> None:
    t = _table()
    t.set_from_params(4, _params(steer_payload(promote=[1], num_experts=4, bias=3.0)))
    t.rows[:3] = torch.tensor([4, 2, R])
    hook = t.make_hook(0)
    logits = torch.zeros(3, 4)
    out = hook(None, None, logits)
    assert out[0].tolist() == [0.0, 3.0, 0.0, 0.0]  # slot 4's token
    assert out[1].abs().sum() == 0 and out[2].abs().sum() == 0  # slot 2 (empty) and the zero row
    # V2: slot 4's request finished (its row is stale, not cleared); a step without it skips all work.
    calls = t.calls
    t.set_step_rows(np.array([2, 3]))
    assert t.row_active.any() and hook(None, None, logits) is None and t.calls == calls
    t.set_step_rows(np.array([3, 4]))
    assert hook(None, None, logits) is not None and t.calls == calls + 1
    # Reuse re-initialises the slot.
    t.set_from_params(4, _params(None))
    assert not t.row_active.any() and t.bias.abs().sum() == 0


ENGINE = dict(use_v2_model_runner=True, speculative_config=None)


def _config(**parallel: Any) -> Any:
    pc = dict(pipeline_parallel_size=1, prefill_context_parallel_size=1, use_sequence_parallel_moe=False,
              use_ubatching=False)
    pc.update(parallel)
    return types.SimpleNamespace(**ENGINE, parallel_config=types.SimpleNamespace(**pc))


def test_v2_engine_limits_named_at_admission() -> None:
    assert unsupported_engine(_config()) is None
    msg = unsupported_engine(_config(pipeline_parallel_size=2))
    assert msg is not None and "pipeline_parallel_size=1" in msg and "VLLM_USE_V2_MODEL_RUNNER=0" in msg
    msg = unsupported_engine(_config(prefill_context_parallel_size=2))
    assert msg is not None and "prefill context parallelism" in msg
    cfg = _config()
    cfg.speculative_config = types.SimpleNamespace(enable_adaptive_verification=True)
    msg = unsupported_engine(cfg)
    assert msg is not None and "adaptive draft verification" in msg
    v1 = _config(pipeline_parallel_size=2)
    v1.use_v2_model_runner = False
    assert unsupported_engine(v1) is None  # V1 runs logits processors on every pipeline stage
    assert "DBO" in (unsupported_engine(_config(use_ubatching=True)) or "")


def test_models_served_by_the_transformers_backend_are_named_at_admission() -> None:
    for runner_v2 in (False, True):
        cfg = _config()
        cfg.use_v2_model_runner = runner_v2
        cfg.model_config = types.SimpleNamespace(architecture="TransformersMoEForCausalLM")
        msg = unsupported_engine(cfg)
        assert msg is not None and "Transformers backend (TransformersMoEForCausalLM)" in msg and "model_impl" in msg
        cfg.model_config = types.SimpleNamespace(architecture="OlmoeForCausalLM")
        assert unsupported_engine(cfg) is None


def test_one_processor_class_serves_both_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from ttadapt.vllm.logits_processor import FQCN, TTAdaptLogitsProcessor

    assert issubclass(TTAdaptLogitsProcessor, V1) and issubclass(TTAdaptLogitsProcessor, V2)
    plugin.register()
    validate = build_custom_logits_processors_params_validator([FQCN])  # V2's front-end loader
    validate(_params(steer_payload(promote=[1], num_experts=4)))
    with pytest.raises(VLLMValidationError, match=r"extra_args\['ttadapt'\]"):
        validate(_params("0.5,0.5"))
    # V2 worker protocol: add_request(slot, params) fills the slot's row and declines logits work.
    cfg = object()
    t = _table()
    monkeypatch.setitem(plugin._runtimes, id(cfg), t)
    proc = TTAdaptLogitsProcessor(cfg, types.SimpleNamespace())
    assert proc.add_request(3, _params(steer_payload(promote=[2], num_experts=4, hard=True))) is False
    assert t.row_active[3] and t.force[3, :, 2].tolist() == [1, 1]
    proc.apply_staged_writes()
    logits = torch.randn(2, 5)
    assert proc.apply(logits, None) is logits


def test_prepare_inputs_wrapper_maps_tokens_or_falls_back_to_no_edit() -> None:
    pytest.importorskip("vllm")  # fill_rows copies through vLLM's host-to-device helper
    from ttadapt.vllm.runner_v2 import _wrap_prepare_inputs

    batch = types.SimpleNamespace(idx_mapping_np=np.array([3, 1]), num_reqs=2, num_tokens_after_padding=6,
                                  query_start_loc_np=np.array([0, 4, 5, 5], dtype=np.int32))

    class Runner:
        def prepare_inputs(self, out: Any) -> Any:
            return out

    _wrap_prepare_inputs(Runner)
    _wrap_prepare_inputs(Runner)  # idempotent
    runner = Runner()
    runner._ttadapt_table = t = _table()  # type: ignore[attr-defined]
    t.set_from_params(1, _params(steer_payload(promote=[0], num_experts=4, hard=True)))
    assert runner.prepare_inputs(batch) is batch
    assert t.rows[:6].tolist() == [3, 3, 3, 3, 1, R] and t.step_flags == (True, True)
    # A batch the adapter cannot read (another vLLM's layout): no edit rather than stale rows.
    runner.prepare_inputs(types.SimpleNamespace())
    assert (t.rows == R).all() and t.step_flags == (False, False) and t.unmapped_steps == 1


def test_import_hook_runs_once_after_the_module_executes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ttadapt.vllm.runner_v2 import _OnImport

    (tmp_path / "ttadapt_fake_runner.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []

    def callback(module: Any) -> None:
        seen.append(module.VALUE)
        module.VALUE += 1

    hook = _OnImport("ttadapt_fake_runner", callback)
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "ttadapt_fake_runner", raising=False)
    import ttadapt_fake_runner  # type: ignore[import-not-found]

    assert seen == [41] and ttadapt_fake_runner.VALUE == 42 and hook not in sys.meta_path
    monkeypatch.delitem(sys.modules, "ttadapt_fake_runner")
