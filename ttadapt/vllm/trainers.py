"""Who adapts the router state between the chunks of ``ttadapt.vllm.generate`` and ``ttadapt serve``.

* :class:`HFTrainer` (``trainer="hf"``, the default): gradient steps with an HF copy of the model
  (``ttadapt.Rerouter``), one sequence at a time.
* :class:`SearchTrainer` (``trainer="search"``): the gradient-free search of
  :mod:`ttadapt.vllm.search`, run by the serving engine itself (no second copy of the weights); the
  candidates of every sequence that adapts in a round share one batched ``llm.generate`` call.

Both keep one warm-start slot per sequence (``seq``): a sequence's next round starts from its last
state, and :meth:`fork` gives a new sample the state of the sequence it was sampled from.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn
    from vllm import LLM

    from ttadapt.config import RerouteConfig
    from ttadapt.generation import Rerouter
    from ttadapt.state import RouterState
    from ttadapt.trace import RoundTrace
    from ttadapt.vllm.search import Scorer, SearchConfig, SearchTrace

__all__ = ["AdaptJob", "ChunkTrainer", "HFTrainer", "SearchTrainer"]


@dataclass(frozen=True)
class AdaptJob:
    """Adapt sequence ``seq`` on ``context`` (its prompt is the first ``prompt_len`` tokens) before chunk ``chunk``."""

    seq: int
    context: list[int]
    prompt_len: int
    chunk: int


class ChunkTrainer(Protocol):
    @property
    def adapts(self) -> bool:
        """False when rounds cannot change the state (then generation runs as one chunk)."""
        ...

    def adapt(self, jobs: Sequence[AdaptJob]) -> list[RouterState]:
        """One state per job, in order; each job's sequence warm-starts from its previous state."""
        ...

    def fork(self, src: int, dst: int) -> None:
        """Sequence ``dst`` continues from the warm-start state of ``src`` (a new sample)."""
        ...


class HFTrainer:
    """Gradient adaptation with an HF copy of the model: ``Rerouter(hf_model, cfg).adapt`` per sequence.

    ``base`` (the server's request state: named state + steering) is loaded for every round, so the
    adaptation keeps its steering fixed and learns ``delta`` on top; it needs a patched ``hf_model``.
    Without it, rounds start from the model's own current state (``Rerouter`` keeps its steering).
    ``traces`` keeps each job's :class:`~ttadapt.trace.RoundTrace`, keyed ``(seq, chunk)``.
    """

    def __init__(self, hf_model: nn.Module, cfg: RerouteConfig, *, base: RouterState | None = None) -> None:
        from ttadapt.handle import get_handle

        self.hf_model = hf_model
        # One Rerouter per sequence; persisting it across rounds gives warm starts.
        self.cfg = dataclasses.replace(cfg, reset_per_prompt=False)
        self._rerouters: dict[int, Rerouter] = {}
        self._device = next((p.device for p in hf_model.parameters()), torch.device("cpu"))
        self._handle = get_handle(hf_model) if base is not None else None
        if base is not None and self._handle is None:
            raise ValueError("HFTrainer(base=...) needs a patched hf_model (ttadapt.patch(hf_model))")
        self._base = base.to(self._device) if base is not None else None
        self.traces: dict[tuple[int, int], RoundTrace] = {}

    @property
    def adapts(self) -> bool:
        return self.cfg.steps > 0

    def adapt(self, jobs: Sequence[AdaptJob]) -> list[RouterState]:
        from ttadapt.generation import Rerouter

        out = []
        for job in jobs:
            rr = self._rerouters.get(job.seq)
            if rr is None:
                rr = self._rerouters[job.seq] = Rerouter(self.hf_model, self.cfg)
            x = torch.tensor([job.context], device=self._device)
            with self._handle.use_state(self._base) if self._handle is not None else contextlib.nullcontext():
                state, trace = rr.adapt(x, prompt_len=job.prompt_len, return_trace=True)
            self.traces[(job.seq, job.chunk)] = trace.rounds[-1]
            out.append(state)
        return out

    def fork(self, src: int, dst: int) -> None:
        self._rerouters[dst] = copy.copy(self._rerouters[src])


class SearchTrainer:
    """Forward-only adaptation by the serving engine (:func:`ttadapt.vllm.search.search_many`).

    Job ``(seq, chunk)`` is seeded ``(config.seed, seq, chunk)``, so a generation is reproducible.
    ``traces`` keeps the :class:`~ttadapt.vllm.search.SearchTrace` of every job, keyed ``(seq, chunk)``.
    ``base`` is every sequence's first start (default: the zero state of ``llm``'s model); its steering
    stays fixed. ``scorer`` replaces scoring with ``llm`` (``ttadapt serve`` scores through its async
    engine), then ``llm`` may be None and ``base`` is required.
    """

    def __init__(
        self, llm: LLM | None, config: SearchConfig, *, base: RouterState | None = None, scorer: Scorer | None = None
    ) -> None:
        from ttadapt.vllm.search import zero_state

        if llm is None and (scorer is None or base is None):
            raise ValueError("SearchTrainer without an llm needs scorer= and base=")
        self.llm = llm
        self.config = config
        self.scorer = scorer
        self._base = base if base is not None else zero_state(llm)
        self._current: dict[int, RouterState] = {}
        self.traces: dict[tuple[int, int], SearchTrace] = {}

    @property
    def adapts(self) -> bool:
        return self.config.rounds > 0

    def adapt(self, jobs: Sequence[AdaptJob]) -> list[RouterState]:
        from ttadapt.vllm.search import search_many

        inits = [self._current.get(j.seq, self._base) for j in jobs]
        seeds = [(self.config.seed, j.seq, j.chunk) for j in jobs]
        contexts = [j.context for j in jobs]
        results = search_many(self.llm, contexts, inits, self.config, seeds=seeds, scorer=self.scorer)
        states = []
        for job, (state, trace) in zip(jobs, results):
            self._current[job.seq] = state
            self.traces[(job.seq, job.chunk)] = trace
            states.append(state)
        return states

    def fork(self, src: int, dst: int) -> None:
        self._current[dst] = self._current[src]  # states are never modified in place
