"""Gradient-free router adaptation inside vLLM: a guarded random search scored by batched prompt log-probs.

For users who cannot hold a second (HF) copy of the weights: every round scores ``candidates``
delta vectors as that many requests in ONE ``llm.generate`` call (``max_tokens=1``,
``prompt_logprobs=0``, each request carrying its vector; :mod:`ttadapt.vllm.scoring`) and keeps the one
with the lowest next-token NLL on the head of the context. Candidate 0 of every round is the current
vector itself ("no change"), so a round can never pick something worse on the tokens it scores; the
others are mirrored Gaussian perturbations ``current ± sigma * eps`` (clamped to ``max_abs``), and
``sigma`` shrinks after a round that found nothing better. Like the core's guard, the last
``val_fraction`` of the context is held out: the vector kept at the end is the iterate (the start
included) with the lowest held-out NLL, and the start unless that beats it by ``min_gain``.

Cost per round: ``candidates`` prompt forwards of the context (no backward, no second copy of the
weights, no extra memory beyond those requests' KV). The held-out score rides on the same forwards.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ttadapt.vllm.payload import Layout, PayloadError, encode
from ttadapt.vllm.scoring import context_nll

if TYPE_CHECKING:
    from vllm import LLM

    from ttadapt.state import RouterState

__all__ = ["Scorer", "SearchConfig", "SearchRound", "SearchTrace", "search_adapt", "search_many", "zero_state"]

Scorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[float | int]]], list[np.ndarray]]
"""``scorer(contexts, payloads)`` -> per-target NLL of each context under its payload, in one batch."""


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of :func:`search_adapt` (validated; ``replace(**changes)`` makes variants).

    Args:
        candidates: requests scored per round, "no change" included (>= 2).
        rounds: scoring rounds (0 = never adapt); one batched ``llm.generate`` call each.
        sigma: standard deviation of the perturbations, in router-logit units.
        shrink: ``sigma`` is multiplied by this after a round whose best candidate was "no change".
        layers: ``"all"`` MoE layers, or true layer ids; other layers keep their delta.
        guard: hold out the last ``val_fraction`` of the context's targets; keep the iterate with the
            lowest held-out NLL, and only if it beats "no change" by ``min_gain`` (relative).
        val_fraction: share of the targets held out by the guard (at least one target).
        min_gain: relative held-out improvement needed to keep a change.
        max_abs: trust region: every delta entry is clamped to ``[-max_abs, max_abs]`` (None = off).
        min_tokens: skip (return the start) when fewer fit targets than this.
        seed: seed of the perturbations (same seed, same context, same engine: same result).
    """

    candidates: int = 8
    rounds: int = 4
    sigma: float = 0.5
    shrink: float = 0.5
    layers: Literal["all"] | tuple[int, ...] = "all"
    guard: bool = True
    val_fraction: float = 0.25
    min_gain: float = 0.0
    max_abs: float | None = 1.0
    min_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, int) or self.candidates < 2:
            raise ValueError(
                f"SearchConfig.candidates must be an int >= 2 (no change + one try), got {self.candidates!r}"
            )
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"SearchConfig.rounds must be an int >= 0, got {self.rounds!r}")
        if not (isinstance(self.sigma, (int, float)) and 0 < self.sigma < math.inf):
            raise ValueError(f"SearchConfig.sigma must be a positive finite number, got {self.sigma!r}")
        if not 0 < self.shrink <= 1:
            raise ValueError(f"SearchConfig.shrink must be in (0, 1], got {self.shrink!r}")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"SearchConfig.layers must be 'all' or true layer ids, got {self.layers!r}")
        else:
            ids = tuple(int(i) for i in self.layers)
            if not ids:
                raise ValueError("SearchConfig.layers is empty; give true layer ids or 'all'")
            object.__setattr__(self, "layers", ids)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"SearchConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.min_gain < 0:
            raise ValueError(f"SearchConfig.min_gain must be >= 0, got {self.min_gain!r}")
        if self.max_abs is not None and not self.max_abs > 0:
            raise ValueError(f"SearchConfig.max_abs must be None or > 0, got {self.max_abs!r}")
        if self.min_tokens < 1:
            raise ValueError(f"SearchConfig.min_tokens must be >= 1, got {self.min_tokens!r}")

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SearchRound:
    """One round: every candidate's fit (and held-out) NLL; candidate 0 is the round's start."""

    sigma: float
    fit: tuple[float, ...]
    val: tuple[float, ...] | None
    chosen: int  # index of the round's lowest fit NLL (0: nothing beat the start)


@dataclass
class SearchTrace:
    """What a search did. ``base_*`` are "no change" (the start state); ``final_*`` the returned state."""

    targets: int
    fit_targets: int
    base_fit: float = math.nan
    base_val: float | None = None
    final_fit: float = math.nan
    final_val: float | None = None
    rounds: list[SearchRound] = field(default_factory=list)
    kept: int = 0  # 0: the start was kept; r: the iterate after round r
    skipped: str | None = None
    seconds: float = 0.0  # wall time of the search_many call that ran it (shared by contexts searched together)

    @property
    def requests(self) -> int:
        return sum(len(r.fit) for r in self.rounds)

    def summary(self) -> dict[str, Any]:
        return {
            "targets": self.targets, "fit_targets": self.fit_targets, "skipped": self.skipped,
            "base_fit": self.base_fit, "final_fit": self.final_fit, "base_val": self.base_val,
            "final_val": self.final_val, "kept": self.kept, "rounds": len(self.rounds), "requests": self.requests,
        }


# ------------------------------------------------------------------------------------------- API
def search_adapt(
    llm: LLM,
    prompt_ids: Sequence[int],
    *,
    init: RouterState | None = None,
    config: SearchConfig | None = None,
    return_trace: bool = False,
    **overrides: Any,
) -> RouterState | tuple[RouterState, SearchTrace]:
    """Adapt a router state on ``prompt_ids`` with vLLM forwards only (see the module docstring).

    Args:
        llm: a ttadapt-ready engine (``ttadapt.vllm.make_llm``).
        prompt_ids: the context (token ids).
        init: start state (warm start; its ``steer``/``force`` stay fixed). Default: zeros for the
            served model's layout.
        config: a :class:`SearchConfig`; ``overrides`` replace its fields
            (``search_adapt(llm, ids, candidates=16, rounds=6, sigma=0.3, seed=1)``).
        return_trace: also return the :class:`SearchTrace`.

    Returns the adapted :class:`ttadapt.RouterState` (a new object; ``init`` is not modified).
    """
    cfg = (config or SearchConfig()).replace(**overrides) if overrides else (config or SearchConfig())
    start = init if init is not None else zero_state(llm)
    (state, trace), = search_many(llm, [list(prompt_ids)], [start], cfg, seeds=[(cfg.seed,)])
    return (state, trace) if return_trace else state


def search_many(
    llm: LLM | None,
    contexts: Sequence[Sequence[int]],
    inits: Sequence[RouterState],
    config: SearchConfig,
    *,
    seeds: Sequence[Sequence[int]] | None = None,
    scorer: Scorer | None = None,
) -> list[tuple[RouterState, SearchTrace]]:
    """:func:`search_adapt` for several contexts at once: each round is ONE ``llm.generate`` call with
    ``config.candidates`` requests per context still searching. ``seeds[i]`` (ints) seeds context ``i``
    (default ``(config.seed, i)``). ``scorer`` replaces vLLM's scoring (:func:`context_nll` on ``llm``,
    which may then be None), e.g. to score with an async engine or against another objective."""
    if scorer is None and llm is None:
        raise ValueError("search_many needs llm= or scorer=")
    score: Scorer = scorer if scorer is not None else (lambda c, p: context_nll(llm, c, p))
    if len(contexts) != len(inits):
        raise ValueError(f"got {len(contexts)} contexts but {len(inits)} init states; pass one state per context")
    seeds = [(config.seed, i) for i in range(len(contexts))] if seeds is None else seeds
    start = time.perf_counter()
    runs = [_Search(list(c), s, config, tuple(int(x) for x in sd)) for c, s, sd in zip(contexts, inits, seeds)]
    for _ in range(config.rounds):
        live = [r for r in runs if r.trace.skipped is None]
        if not live:
            break
        batch = [(r, cand) for r in live for cand in r.propose()]
        nll = score([r.context for r, _ in batch], [r.payload(c) for r, c in batch])
        at = 0
        for r in live:
            k = config.candidates
            r.update(nll[at : at + k])
            at += k
    results = [r.finish() for r in runs]
    elapsed = time.perf_counter() - start
    for _, trace in results:
        trace.seconds = elapsed
    return results


def zero_state(llm: LLM) -> RouterState:
    """An all-zero RouterState for the engine's served model (layout from ``model_layout``)."""
    from ttadapt.vllm.sampling import model_layout

    return state_for_layout(model_layout(llm))


def state_for_layout(layout: Layout) -> RouterState:
    import torch

    from ttadapt.state import RouterState

    L, E = len(layout.layer_ids), layout.num_experts
    return RouterState(
        layer_ids=layout.layer_ids, num_experts=E, delta=torch.zeros(L, E), steer=torch.zeros(L, E),
        force=torch.zeros(L, E, dtype=torch.int8),
    )


# ------------------------------------------------------------------------------------------- one context
class _Search:
    """The search state of one context: current vector, iterates, rng, trace."""

    def __init__(self, context: list[int], init: RouterState, cfg: SearchConfig, seed: tuple[int, ...]) -> None:
        if init.delta.dim() != 2:
            raise PayloadError("search_adapt takes a shared state (delta [L, E]); pick one row with state.row(i)")
        self.cfg = cfg
        self.context = context
        self.init = init
        self.layer_ids = init.layer_ids
        self.steer = init.steer.detach().to("cpu").numpy().astype(np.float32)
        force = init.force.detach().to("cpu").numpy()
        self.force = force if force.any() else None
        self.slots = self._slots(cfg.layers)
        self.rng = np.random.default_rng(list(seed))
        self.sigma = float(cfg.sigma)
        self.current = init.delta.detach().to("cpu").numpy().astype(np.float32)
        n = max(len(context) - 1, 0)
        n_val = max(1, int(round(n * cfg.val_fraction))) if cfg.guard and n > 0 else 0
        self.n_fit = n - n_val
        self.trace = SearchTrace(targets=n, fit_targets=self.n_fit)
        if self.n_fit < cfg.min_tokens:
            self.trace.skipped = f"{self.n_fit} fit targets < min_tokens={cfg.min_tokens}"
        elif cfg.rounds == 0:
            self.trace.skipped = "rounds=0"
        self.iterates: list[tuple[np.ndarray, float, float | None]] = []  # (delta, fit, val); [0] = start
        self._cands: list[np.ndarray] = []

    def _slots(self, layers: Literal["all"] | tuple[int, ...]) -> list[int]:
        if layers == "all":
            return list(range(len(self.layer_ids)))
        unknown = [i for i in layers if i not in self.layer_ids]
        if unknown:
            raise PayloadError(
                f"SearchConfig.layers {unknown} are not MoE layers of this model; "
                f"its MoE layers are {list(self.layer_ids)}"
            )
        return [self.layer_ids.index(i) for i in layers]

    def propose(self) -> list[np.ndarray]:
        """This round's candidates: the current vector, then mirrored perturbations of it."""
        k = self.cfg.candidates
        cands = [self.current]
        shape = (len(self.slots), self.current.shape[1])
        while len(cands) < k:
            eps = self.rng.standard_normal(shape) * self.sigma
            for sign in (1.0, -1.0):
                if len(cands) < k:
                    cands.append(self._moved(sign * eps))
        self._cands = cands
        return cands

    def _moved(self, step: np.ndarray) -> np.ndarray:
        out = self.current.copy()
        rows = out[self.slots].astype(np.float64) + step
        if self.cfg.max_abs is not None:
            rows = np.clip(rows, -self.cfg.max_abs, self.cfg.max_abs)
        out[self.slots] = rows.astype(np.float32)
        return out

    def payload(self, delta: np.ndarray) -> list[float | int]:
        bias = delta + self.steer  # float32 + float32: the same sum encode_state makes from a RouterState
        return encode(self.layer_ids, bias, self.force)

    def update(self, nll: Sequence[np.ndarray]) -> None:
        fit = [float(x[: self.n_fit].mean()) for x in nll]
        val = [float(x[self.n_fit :].mean()) for x in nll] if self.n_fit < self.trace.targets else None
        if not self.iterates:  # round 0's candidate 0 is the start itself
            self.iterates.append((self._cands[0], fit[0], None if val is None else val[0]))
        best = int(np.argmin(fit))  # ties go to the lowest index: "no change" wins a tie
        self.trace.rounds.append(
            SearchRound(sigma=self.sigma, fit=tuple(fit), val=None if val is None else tuple(val), chosen=best)
        )
        if best == 0:
            self.sigma *= self.cfg.shrink
            return
        self.current = self._cands[best]
        self.iterates.append((self.current, fit[best], None if val is None else val[best]))

    def finish(self) -> tuple[RouterState, SearchTrace]:
        import torch

        tr = self.trace
        if not self.iterates:  # skipped
            return self.init.clone(), tr
        start_fit, start_val = self.iterates[0][1], self.iterates[0][2]
        tr.base_fit, tr.base_val = start_fit, start_val
        rounds_of = [0] + [i for i, r in enumerate(tr.rounds, start=1) if r.chosen != 0]
        if start_val is not None:
            vals = [v for _, _, v in self.iterates]
            j = int(np.argmin(vals))
            if not vals[j] < start_val * (1 - self.cfg.min_gain):
                j = 0
        else:
            j = len(self.iterates) - 1
        delta, tr.final_fit, tr.final_val = self.iterates[j]
        tr.kept = rounds_of[j]
        state = self.init.clone()
        with torch.no_grad():
            state.delta.copy_(torch.from_numpy(delta).to(state.delta.device))
        state.refresh()
        return state, tr
