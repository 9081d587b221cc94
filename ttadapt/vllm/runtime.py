"""What ``ttadapt serve`` holds in its API process: the served model's MoE layout, the registered router
states and (``--trainer hf``) an HF copy of the model that adapts router states on request prompts.

vLLM cannot compute gradients, so rerouting a request means adapting with transformers in the API
process (``ttadapt.Rerouter(hf_model, cfg).adapt(prompt_ids)``) and sending the resulting vector to
the engine as the request's payload. Adaptation runs on one worker thread: the HF model carries one
patch whose current state is global, so rounds never overlap.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ttadapt.vllm.http_schema import FIELD, RequestError, RequestSpec
from ttadapt.vllm.payload import Layout, PayloadError, decode, encode_state, merge_steer

if TYPE_CHECKING:
    from torch import nn

    from ttadapt.config import RerouteConfig
    from ttadapt.generation import Rerouter
    from ttadapt.handle import PatchHandle
    from ttadapt.state import RouterState
    from ttadapt.trace import RoundTrace

__all__ = ["CONFIG_ENV", "Adapted", "ServeConfig", "ServerRuntime", "current_runtime", "install_runtime"]

logger = logging.getLogger("vllm.ttadapt")

CONFIG_ENV = "TTADAPT_SERVE_CONFIG"
"""Environment variable holding :class:`ServeConfig` as JSON (read by API processes that did not load it)."""

Trainer = Literal["hf", "none"]


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``ttadapt serve`` that concern ttadapt (vLLM's own options are passed to vLLM)."""

    model: str
    trainer: Trainer = "hf"
    trainer_device: str = "cpu"
    trainer_dtype: str = "float32"
    states: dict[str, str] = field(default_factory=dict)  # name -> RouterState file
    max_reroute_steps: int = 16
    trust_remote_code: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))


@dataclass
class Adapted:
    """One adaptation round's result: the state sent to vLLM and a compact record for the response."""

    state: RouterState
    record: dict[str, Any]


class ServerRuntime:
    """Layout, registered states and trainer of one served model; builds each request's router state."""

    def __init__(
        self,
        config: ServeConfig,
        layout: Layout,
        states: Mapping[str, RouterState],
        trainer: nn.Module | None,
        handle: PatchHandle | None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.states = dict(states)
        self.trainer = trainer
        self.handle = handle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttadapt-trainer")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, config: ServeConfig) -> ServerRuntime:
        """Load the trainer (``trainer="hf"``) and the states, each checked against the served model."""
        from ttadapt.state import RouterState

        trainer = handle = None
        if config.trainer == "hf":
            trainer, handle = _load_trainer(config)
            layout = Layout(layer_ids=tuple(handle.moe_layers), num_experts=handle.num_experts)
            info: Any = handle.info
        elif config.trainer == "none":
            info = _meta_info(config)
            layout = Layout(layer_ids=info.layer_ids, num_experts=info.num_experts)
        else:
            raise ValueError(f"--trainer must be 'hf' or 'none', got {config.trainer!r}")
        states: dict[str, RouterState] = {}
        for name, path in config.states.items():
            state = RouterState.load(path)
            try:
                # With the trainer, the router-weight digest is checked too; without it, the structure only.
                state.check_compatible(info, strict_weights=trainer is not None)
            except ValueError as exc:
                raise ValueError(f"--state {name}={path}: {exc}") from None
            if state.batch_size is not None:
                raise ValueError(
                    f"--state {name}={path} holds {state.batch_size} per-row vectors; a request carries one: "
                    "save one row (state.row(i).save(...))"
                )
            states[name] = state.to("cpu")
        logger.info(
            "ttadapt serve: MoE layers %s, %d experts, trainer %s, states %s",
            list(layout.layer_ids), layout.num_experts,
            "none" if trainer is None else f"hf ({config.trainer_dtype} on {config.trainer_device})", sorted(states),
        )
        return cls(config, layout, states, trainer, handle)

    # ------------------------------------------------------------------ states
    def base_state(self, spec: RequestSpec) -> RouterState:
        """The request's fixed state: the named state (or zeros) with its steering specs merged in.

        With ``reroute``, the named state's ``delta`` is folded into ``steer`` (same payload: vLLM gets
        their sum), so adaptation learns a fresh ``delta`` on top of the whole named vector instead of
        dropping it (``Rerouter`` keeps the loaded steering and starts ``delta`` from zero).
        """
        state = self.states[spec.state].clone() if spec.state is not None else self._zeros()
        if spec.reroute is not None and spec.state is not None:
            with torch.no_grad():
                state.steer.add_(state.delta)
                state.delta.zero_()
            state.refresh()
        for i, steer in enumerate(spec.steers):
            try:
                state = merge_steer(state, steer)
            except (PayloadError, ValueError) as exc:
                param = f"{FIELD}.steer" + (f"[{i}]" if len(spec.steers) > 1 else "")
                raise RequestError(f"bad '{param}': {exc}", param) from None
        return state

    def payload(self, state: RouterState) -> list[float | int]:
        """The flat ``vllm_xargs['ttadapt']`` list of ``state``, checked against the served layout."""
        try:
            values = encode_state(state)
            decode(values, self.layout)
        except PayloadError as exc:
            raise RequestError(f"the requested router state is invalid: {exc}") from None
        return values

    def _zeros(self) -> RouterState:
        from ttadapt.state import RouterState

        if self.handle is not None:
            return self.handle.new_state().to("cpu")
        L, E = len(self.layout.layer_ids), self.layout.num_experts
        return RouterState(
            layer_ids=self.layout.layer_ids, num_experts=E, delta=torch.zeros(L, E),
            steer=torch.zeros(L, E), force=torch.zeros(L, E, dtype=torch.int8),
        )

    # ------------------------------------------------------------------ adaptation
    def rerouter(self, cfg: RerouteConfig) -> Rerouter:
        """A Rerouter for one sequence; it warm-starts later rounds from earlier ones."""
        from ttadapt.generation import Rerouter

        if self.trainer is None:
            raise RequestError("rerouting needs the HF trainer; restart with `ttadapt serve --trainer hf`")
        return Rerouter(self.trainer, cfg.replace(reset_per_prompt=False))

    async def adapt(
        self, rerouter: Rerouter, base: RouterState, ids: list[int], prompt_len: int
    ) -> Adapted:
        """Adapt on ``ids`` (prompt + generated so far) on the trainer thread; steering of ``base`` kept."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._adapt_sync, rerouter, base, ids, prompt_len)

    def _adapt_sync(self, rerouter: Rerouter, base: RouterState, ids: list[int], prompt_len: int) -> Adapted:
        assert self.handle is not None
        device = self.handle.info.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        with self.handle.use_state(base.to(device)):
            state, trace = rerouter.adapt(x, prompt_len=prompt_len, return_trace=True)
        state = state.to("cpu")
        return Adapted(state=state, record=_round_record(trace.rounds[-1], state))

    @staticmethod
    def fork(rerouter: Rerouter) -> Rerouter:
        """A copy of a sequence's Rerouter for one of its samples (shares the warm start, not later rounds)."""
        return copy.copy(rerouter)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _round_record(r: RoundTrace, state: RouterState) -> dict[str, Any]:
    return {
        "position": r.position,
        "state_hash": state.content_hash(),
        "skipped": r.skipped,
        "kept_step": r.chosen,
        "fit_loss": [round(r.fit_loss[0], 5), round(r.fit_loss[-1], 5)] if r.fit_loss else None,
        "delta_mean_abs": round(float(r.delta_mean_abs), 6),
        "adapt_ms": round(1000 * sum(r.times.values()), 1),
    }


# ---------------------------------------------------------------------------------- loading helpers
def _load_trainer(config: ServeConfig) -> tuple[nn.Module, PatchHandle]:
    from transformers import AutoModelForCausalLM

    import ttadapt

    dtype = getattr(torch, config.trainer_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--trainer-dtype {config.trainer_dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    model = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=dtype, trust_remote_code=config.trust_remote_code
    ).to(config.trainer_device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ttadapt.patch(model)


def _meta_info(config: ServeConfig) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ttadapt.model_info import inspect_model

    hf_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.trust_remote_code)
    return inspect_model(model)


# ---------------------------------------------------------------------------------- process registry
_runtime: ServerRuntime | None = None
_runtime_lock = threading.Lock()


def install_runtime(runtime: ServerRuntime) -> None:
    """Make ``runtime`` the one the middleware of this process uses (``ttadapt serve`` does this)."""
    global _runtime
    _runtime = runtime
    os.environ[CONFIG_ENV] = runtime.config.to_json()


def current_runtime(model: str | None = None) -> ServerRuntime:
    """The installed runtime; else one loaded from :data:`CONFIG_ENV`; else a trainer-less one for
    ``model`` (plain ``vllm serve --middleware ttadapt.vllm.server.TTAdaptMiddleware``). Blocking."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            raw = os.environ.get(CONFIG_ENV)
            if raw:
                config = ServeConfig.from_json(raw)
            elif model:
                config = ServeConfig(model=model, trainer="none")
            else:
                raise RuntimeError(
                    "ttadapt middleware: no served model known; start the server with `ttadapt serve` "
                    f"or set {CONFIG_ENV}"
                )
            _runtime = ServerRuntime.load(config)
        return _runtime

