"""Who adapts the router state between the chunks of ``ttadapt.vllm.generate`` and ``ttadapt serve``.

* :class:`HFTrainer` (``trainer="hf"``, the default): gradient steps with an HF copy of the model
  (``ttadapt.Rerouter``), the sequences of a round in one batch.
* :class:`SearchTrainer` (``trainer="search"``): the gradient-free search of
  :mod:`ttadapt.vllm.search`, run by the serving engine itself (no second copy of the weights); the
  candidates of every sequence that adapts in a round share one batched ``llm.generate`` call.

Both keep one warm-start slot per sequence (``seq``): a sequence's next round starts from its last
state, and :meth:`fork` gives a new sample the state of the sequence it was sampled from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn
    from vllm import LLM

    from ttadapt.config import RerouteConfig
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
    """Gradient adaptation with an HF copy of the model (``ttadapt.Rerouter.adapt``).

    The jobs of a round are adapted together, as one left-padded batch with one ``delta`` per row (each
    row's loss is its own mean, so rows share no gradient), warm-started from each sequence's last state;
    with ``loss_mask`` other than ``"all"``, or a context too short to adapt, a job runs alone. Batched
    rows equal rows alone up to float rounding (padding changes the order of sums).
    ``base`` (the server's request state: named state + steering) is loaded for every round, so the
    adaptation keeps its steering fixed and learns ``delta`` on top; it needs a patched ``hf_model``.
    Without it, rounds start from the model's own current state (``Rerouter`` keeps its steering).
    ``traces`` keeps each job's :class:`~ttadapt.trace.RoundTrace`, keyed ``(seq, chunk)``: a batched
    round's trace with the job's own context length, layers and mean ``|delta|`` (its losses are the
    batch's means).
    """

    def __init__(self, hf_model: nn.Module, cfg: RerouteConfig, *, base: RouterState | None = None) -> None:
        from ttadapt.generation import Rerouter
        from ttadapt.handle import get_handle

        self.hf_model = hf_model
        self.cfg = cfg
        self._rerouter = Rerouter(hf_model, dataclasses.replace(cfg, reset_per_prompt=True))
        self._last: dict[int, RouterState] = {}  # each sequence's warm start
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
        together = [i for i, j in enumerate(jobs) if self._batchable(j)] if self.cfg.loss_mask == "all" else []
        if len(together) < 2:
            together = []
        states: dict[int, RouterState] = dict(zip(together, self._round([jobs[i] for i in together]))) if together else {}
        for i, job in enumerate(jobs):
            if i not in states:
                (states[i],) = self._round([job])
        return [states[i] for i in range(len(jobs))]

    def fork(self, src: int, dst: int) -> None:
        if src in self._last:
            self._last[dst] = self._last[src]

    def _batchable(self, job: AdaptJob) -> bool:
        """Whether the job's context has enough fit tokens to adapt (else it runs alone: its trace says it was skipped)."""
        from ttadapt.adapt import target_masks

        n = len(job.context)
        fit, _ = target_masks(self.cfg, torch.ones(1, n, dtype=torch.long), job.prompt_len)
        return int(fit.sum()) >= self.cfg.min_tokens

    def _round(self, jobs: Sequence[AdaptJob]) -> list[RouterState]:
        """One round over ``jobs`` (left-padded into one batch when several); one one-row state per job."""
        width = max(len(j.context) for j in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for r, job in enumerate(jobs):
            ids[r, width - len(job.context):] = torch.tensor(job.context)
            mask[r, width - len(job.context):] = 1
        prompt_len = jobs[0].prompt_len if len(jobs) == 1 else None  # loss_mask "all" when batched
        with self._handle.use_state(self._base) if self._handle is not None else contextlib.nullcontext():
            state, trace = self._rerouter.adapt(
                ids.to(self._device), mask.to(self._device), prompt_len=prompt_len,
                start=[self._last.get(j.seq) for j in jobs], return_trace=True,
            )
        (tr,) = trace.rounds
        out = []
        for r, job in enumerate(jobs):
            row = state if len(jobs) == 1 else state.row(r)
            self._last[job.seq] = row
            self.traces[(job.seq, job.chunk)] = tr if len(jobs) == 1 else dataclasses.replace(
                tr, position=len(job.context), rows_selected=[],
                selected_layers=tr.rows_selected[r] if tr.rows_selected else tr.selected_layers,
                delta_mean_abs=float(row.delta.detach().abs().mean()),
            )
            out.append(row)
        return out


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
