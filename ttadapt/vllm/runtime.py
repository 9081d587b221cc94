"""What ``ttadapt serve`` holds in its API process: the served model's MoE layout, the registered router
states and the trainers that adapt router states on request prompts (``reroute``).

vLLM cannot compute gradients, so the ``hf`` trainer adapts with an HF copy of the model in the API
process (:class:`ttadapt.vllm.trainers.HFTrainer`); its rounds run on one worker thread, since the HF
model carries one patch whose current state is global. The ``search`` trainer
(:class:`ttadapt.vllm.trainers.SearchTrainer`) needs no copy: it scores its candidates with the
server's own async engine (:class:`EngineScorer`), from worker threads that wait on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ttadapt.vllm.http_schema import FIELD, RequestError, RequestSpec
from ttadapt.vllm.payload import Layout, PayloadError, decode, encode_state, merge_steer
from ttadapt.vllm.scoring import _target_nll, scoring_request
from ttadapt.vllm.search import state_for_layout
from ttadapt.vllm.trainers import AdaptJob, ChunkTrainer, HFTrainer, SearchTrainer

if TYPE_CHECKING:
    from torch import nn

    from ttadapt.handle import PatchHandle
    from ttadapt.state import RouterState
    from ttadapt.trace import RoundTrace
    from ttadapt.vllm.search import Scorer, SearchTrace

__all__ = ["CONFIG_ENV", "EngineScorer", "ServeConfig", "ServerRuntime", "current_runtime", "install_runtime"]

logger = logging.getLogger("vllm.ttadapt")

CONFIG_ENV = "TTADAPT_SERVE_CONFIG"
"""Environment variable holding :class:`ServeConfig` as JSON (read by API processes that did not load it)."""

Trainer = Literal["hf", "search", "none"]
_SEARCH_THREADS = 8  # searches wait on the engine, not the CPU: several run at once and share its batches


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


class ServerRuntime:
    """Layout, registered states and trainers of one served model; builds each request's router state."""

    def __init__(
        self,
        config: ServeConfig,
        layout: Layout,
        states: Mapping[str, RouterState],
        hf_model: nn.Module | None,
        handle: PatchHandle | None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.states = dict(states)
        self.hf_model = hf_model
        self.handle = handle
        self._hf_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttadapt-trainer")
        self._search_pool = ThreadPoolExecutor(max_workers=_SEARCH_THREADS, thread_name_prefix="ttadapt-search")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, config: ServeConfig) -> ServerRuntime:
        """Load the HF copy (``trainer="hf"`` only) and the states, each checked against the served model."""
        from ttadapt.state import RouterState

        hf_model = handle = None
        if config.trainer == "hf":
            hf_model, handle = _load_hf_model(config)
            layout = Layout(layer_ids=tuple(handle.moe_layers), num_experts=handle.num_experts)
            info: Any = handle.info
        elif config.trainer in ("search", "none"):
            info = _meta_info(config)
            layout = Layout(layer_ids=info.layer_ids, num_experts=info.num_experts)
        else:
            raise ValueError(f"--trainer must be 'hf', 'search' or 'none', got {config.trainer!r}")
        states: dict[str, RouterState] = {}
        for name, path in config.states.items():
            state = RouterState.load(path)
            try:
                # With the HF copy, the router-weight digest is checked too; without it, the structure only.
                state.check_compatible(info, strict_weights=hf_model is not None)
            except ValueError as exc:
                raise ValueError(f"--state {name}={path}: {exc}") from None
            if state.batch_size is not None:
                raise ValueError(
                    f"--state {name}={path} holds {state.batch_size} per-row vectors; a request carries one: "
                    "save one row (state.row(i).save(...))"
                )
            states[name] = state.to("cpu")
        trainer = {
            "hf": f"hf ({config.trainer_dtype} on {config.trainer_device}; search on request)",
            "search": "search (the engine itself, no HF copy)",
        }.get(config.trainer, "none")
        logger.info(
            "ttadapt serve: MoE layers %s, %d experts, trainer %s, states %s",
            list(layout.layer_ids), layout.num_experts, trainer, sorted(states),
        )
        return cls(config, layout, states, hf_model, handle)

    @property
    def trainers(self) -> tuple[str, ...]:
        """The trainers ``reroute`` may use, the default first (the search needs only the engine)."""
        if self.hf_model is not None:
            return ("hf", "search")
        return ("search",) if self.config.trainer == "search" else ()

    # ------------------------------------------------------------------ states
    def base_state(self, spec: RequestSpec) -> RouterState:
        """The request's fixed state: the named state (or zeros) with its steering specs merged in.

        With ``reroute``, the named state's ``delta`` is folded into ``steer`` (same payload: vLLM gets
        their sum), so adaptation learns a fresh ``delta`` on top of the whole named vector instead of
        dropping it (both trainers keep the start's steering and learn ``delta`` from zero).
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
        return self.handle.new_state().to("cpu") if self.handle is not None else state_for_layout(self.layout)

    # ------------------------------------------------------------------ adaptation
    def chunk_trainer(self, spec: RequestSpec, base: RouterState, scorer: Scorer | None = None) -> ChunkTrainer:
        """The trainer of one request (``spec.trainer``), starting from ``base`` and keeping its steering;
        the search scores with ``scorer`` (an :class:`EngineScorer`)."""
        if spec.reroute is None or spec.trainer not in self.trainers:
            raise RequestError(
                f"rerouting with {spec.trainer!r} is not available on this server (trainers: {list(self.trainers)}); "
                "restart with `ttadapt serve --trainer hf` or `--trainer search`"
            )
        if spec.trainer == "hf":
            assert self.hf_model is not None
            return HFTrainer(self.hf_model, spec.reroute, base=base)
        assert spec.search is not None and scorer is not None
        if spec.search.layers != "all":
            unknown = sorted(set(spec.search.layers) - set(self.layout.layer_ids))
            if unknown:
                raise RequestError(
                    f"'{FIELD}.reroute.search.layers' {unknown} are not MoE layers of this model; its MoE layers are "
                    f"{list(self.layout.layer_ids)}",
                    f"{FIELD}.reroute.search.layers",
                )
        return SearchTrainer(None, spec.search, base=base, scorer=scorer)

    async def adapt(self, trainer: ChunkTrainer, jobs: Sequence[AdaptJob]) -> list[RouterState]:
        """One round of ``trainer`` off the event loop (HF rounds one at a time: one patched model)."""
        pool = self._hf_pool if isinstance(trainer, HFTrainer) else self._search_pool
        return await asyncio.get_running_loop().run_in_executor(pool, trainer.adapt, list(jobs))

    @staticmethod
    def record(trainer: ChunkTrainer, key: tuple[int, int], state: RouterState) -> dict[str, Any]:
        """A compact record of round ``key = (seq, chunk)`` of ``trainer`` (which returned ``state``)."""
        if isinstance(trainer, HFTrainer):
            return _round_record(trainer.traces[key], state)
        assert isinstance(trainer, SearchTrainer)
        return _search_record(trainer.traces[key], state)

    def close(self) -> None:
        self._hf_pool.shutdown(wait=False, cancel_futures=True)
        self._search_pool.shutdown(wait=False, cancel_futures=True)


class EngineScorer:
    """A search ``scorer`` over the server's async engine, for trainer threads: each call scores its
    contexts as concurrent ``prompt_logprobs`` requests on the event loop (the engine batches them)."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    def __call__(
        self, contexts: Sequence[Sequence[int]], payloads: Sequence[Sequence[float | int]]
    ) -> list[np.ndarray]:
        return asyncio.run_coroutine_threadsafe(self.score(contexts, payloads), self.loop).result()

    async def score(
        self, contexts: Sequence[Sequence[int]], payloads: Sequence[Sequence[float | int]]
    ) -> list[np.ndarray]:
        return list(await asyncio.gather(*(self._one(c, p) for c, p in zip(contexts, payloads, strict=True))))

    async def _one(self, context: Sequence[int], payload: Sequence[float | int]) -> np.ndarray:
        prompt, params = scoring_request(context, payload)
        final = None
        async for out in self.engine.generate(prompt, params, f"ttadapt-score-{uuid.uuid4().hex}"):
            final = out
        return _target_nll(context, final)


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


def _search_record(t: SearchTrace, state: RouterState) -> dict[str, Any]:
    return {
        "position": t.targets + 1,
        "state_hash": state.content_hash(),
        "skipped": t.skipped,
        "kept_round": t.kept,
        "fit_nll": _pair(t.base_fit, t.final_fit),
        "val_nll": _pair(t.base_val, t.final_val),
        "requests": t.requests,
        "delta_mean_abs": round(float(state.delta.abs().mean()), 6),
        "adapt_ms": round(1000 * t.seconds, 1),
    }


def _pair(base: float | None, final: float | None) -> list[float] | None:
    """[start, kept] of a search score; None when not scored (skipped search, no held-out part)."""
    if base is None or final is None or math.isnan(base):
        return None
    return [round(base, 5), round(final, 5)]


# ---------------------------------------------------------------------------------- loading helpers
def _load_hf_model(config: ServeConfig) -> tuple[nn.Module, PatchHandle]:
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

