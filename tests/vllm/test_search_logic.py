"""The gradient-free search's rules on a known objective (no vLLM: runs everywhere).

``search_many(..., scorer=...)`` takes any batched scorer; here a quadratic "NLL" whose fit part is
``mean((bias - A)^2)`` and whose held-out part is ``mean((bias - C)^2)``, so the right answers are
known. The same search scored by vLLM is tested on the trained tiny OLMoE in ``test_search.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from ttadapt.vllm.payload import Layout, decode
from ttadapt.vllm.search import SearchConfig, search_many, state_for_layout

LAYOUT = Layout(layer_ids=(1, 3, 4), num_experts=4)
CONTEXT = list(range(41))  # 40 targets: 30 fit + 10 held out (val_fraction 0.25)
N_FIT = 30


class Quadratic:
    """A batched scorer: fit targets score ``mean((b - A)^2)``, held-out ones ``mean((b - C)^2)``."""

    def __init__(self, a: np.ndarray, c: np.ndarray) -> None:
        self.a, self.c = a, c
        self.calls: list[list[list[float | int]]] = []

    def __call__(
        self, contexts: Sequence[Sequence[int]], payloads: Sequence[Sequence[float | int]]
    ) -> list[np.ndarray]:
        self.calls.append([list(p) for p in payloads])
        out = []
        for ctx, payload in zip(contexts, payloads):
            p = decode(payload, LAYOUT)
            assert p.layer_ids == LAYOUT.layer_ids
            n = len(ctx) - 1
            nll = np.empty(n)
            nll[:N_FIT] = float(((p.bias - self.a) ** 2).mean())
            nll[N_FIT:] = float(((p.bias - self.c) ** 2).mean())
            out.append(nll)
        return out


def _target(value: float) -> np.ndarray:
    return np.full((3, 4), value, dtype=np.float64)


def _run(cfg: SearchConfig, scorer: Quadratic, init: object = None, seed: tuple[int, ...] = (0,)) -> tuple:
    start = init if init is not None else state_for_layout(LAYOUT)
    (state, trace), = search_many(None, [CONTEXT], [start], cfg, seeds=[seed], scorer=scorer)
    return state, trace


def test_every_round_keeps_the_best_and_never_worsens() -> None:
    scorer = Quadratic(_target(0.6), _target(0.6))
    cfg = SearchConfig(candidates=6, rounds=5, sigma=0.3, max_abs=None)
    state, tr = _run(cfg, scorer)
    assert len(tr.rounds) == 5 and all(len(r.fit) == 6 for r in tr.rounds)
    for r in tr.rounds:
        assert r.fit[r.chosen] == min(r.fit) <= r.fit[0]
    for prev, nxt in zip(tr.rounds, tr.rounds[1:]):  # candidate 0 of a round is the previous round's pick
        assert nxt.fit[0] == prev.fit[prev.chosen]
    assert tr.base_fit == pytest.approx(0.36)
    assert tr.final_fit < tr.base_fit and tr.final_val < tr.base_val and tr.kept > 0
    got = float(((state.delta.numpy() - 0.6) ** 2).mean())
    assert got == pytest.approx(tr.final_fit, rel=1e-6)
    assert len(scorer.calls) == 5 and all(len(c) == 6 for c in scorer.calls)  # one batched call per round


def test_sigma_shrinks_after_a_round_without_improvement() -> None:
    scorer = Quadratic(_target(0.0), _target(0.0))  # the start (zeros) is already optimal
    state, tr = _run(SearchConfig(candidates=4, rounds=3, sigma=0.4, shrink=0.5), scorer)
    assert [r.chosen for r in tr.rounds] == [0, 0, 0]
    assert [r.sigma for r in tr.rounds] == pytest.approx([0.4, 0.2, 0.1])
    assert tr.kept == 0 and not state.delta.any()


def test_guard_keeps_the_start_when_the_held_out_part_gets_worse() -> None:
    scorer = Quadratic(_target(0.8), _target(-0.8))  # moving towards A moves away from C
    state, tr = _run(SearchConfig(candidates=8, rounds=4, sigma=0.3), scorer)
    assert any(r.chosen != 0 for r in tr.rounds), "the fit part never improved: test is vacuous"
    assert tr.kept == 0 and not state.delta.any()
    assert tr.final_fit == tr.base_fit and tr.final_val == tr.base_val
    # Without the guard the best fit is kept, and the held-out part is worse for it.
    state, tr = _run(SearchConfig(candidates=8, rounds=4, sigma=0.3, guard=False), scorer)
    assert tr.base_val is None and tr.final_fit < tr.base_fit and state.delta.any()


def test_guard_picks_the_iterate_with_the_best_held_out_score() -> None:
    scorer = Quadratic(_target(1.0), _target(0.25))  # held-out optimum lies part of the way
    _, tr = _run(SearchConfig(candidates=8, rounds=6, sigma=0.3, max_abs=None), scorer)
    iterates = [(0, tr.base_val)] + [
        (i, r.val[r.chosen]) for i, r in enumerate(tr.rounds, start=1) if r.chosen != 0 and r.val is not None
    ]
    best_round, best_val = min(iterates, key=lambda x: x[1])
    assert tr.kept == best_round and tr.final_val == best_val
    assert tr.final_fit > min(r.fit[r.chosen] for r in tr.rounds), "guard chose the best fit anyway: vacuous"


def test_trust_region_and_layer_subset() -> None:
    scorer = Quadratic(_target(5.0), _target(5.0))
    state, _ = _run(SearchConfig(candidates=8, rounds=4, sigma=2.0, max_abs=1.0, layers=(3,)), scorer)
    d = state.delta.numpy()
    assert np.abs(d).max() <= 1.0 and d[1].any()
    assert not d[0].any() and not d[2].any()  # only layer 3 (slot 1) was searched
    with pytest.raises(ValueError, match=r"layers \[2\] are not MoE layers.*\[1, 3, 4\]"):
        _run(SearchConfig(layers=(2,)), scorer)


def test_warm_start_keeps_steering_and_forcing() -> None:
    import torch

    init = state_for_layout(LAYOUT)
    with torch.no_grad():
        init.delta[0, 1] = 0.5
        init.steer[2, 3] = 2.0
        init.force[1, 0] = 1
    init.refresh()
    scorer = Quadratic(_target(0.0), _target(0.0))
    state, tr = _run(SearchConfig(candidates=4, rounds=1), scorer, init=init)
    first = decode(scorer.calls[0][0], LAYOUT)  # candidate 0 = the start: delta + steer, and the forcing
    np.testing.assert_array_equal(first.bias, (init.delta + init.steer).numpy())
    np.testing.assert_array_equal(first.force, init.force.numpy())
    assert torch.equal(state.steer, init.steer) and torch.equal(state.force, init.force)
    assert state is not init and init.delta[0, 1] == 0.5


def test_same_seed_same_search_other_seed_other_candidates() -> None:
    cfg = SearchConfig(candidates=6, rounds=3, sigma=0.3)
    a, ta = _run(cfg, Quadratic(_target(0.5), _target(0.5)), seed=(7,))
    b, tb = _run(cfg, Quadratic(_target(0.5), _target(0.5)), seed=(7,))
    c, tc = _run(cfg, Quadratic(_target(0.5), _target(0.5)), seed=(8,))
    assert a.content_hash() == b.content_hash() and ta.rounds == tb.rounds
    assert ta.rounds[0].fit[1:] != tc.rounds[0].fit[1:]


def test_short_context_is_skipped_without_scoring() -> None:
    scorer = Quadratic(_target(1.0), _target(1.0))
    init = state_for_layout(LAYOUT)
    cfg = SearchConfig(min_tokens=8)
    (state, tr), = search_many(None, [list(range(9))], [init], cfg, scorer=scorer)
    assert tr.skipped is not None and "min_tokens" in tr.skipped and not tr.rounds
    assert scorer.calls == [] and not state.delta.any()


def test_importing_the_search_does_not_import_vllm() -> None:
    code = (
        "import sys, ttadapt.vllm.search, ttadapt.vllm.scoring, ttadapt.vllm.trainers, ttadapt.vllm.bench_trainers; "
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("candidates", 1, "candidates must be an int >= 2"),
        ("rounds", -1, "rounds must be an int >= 0"),
        ("sigma", 0.0, "sigma must be a positive finite"),
        ("shrink", 1.5, r"shrink must be in \(0, 1\]"),
        ("layers", "some", "layers must be 'all' or true layer ids"),
        ("layers", (), "layers is empty"),
        ("val_fraction", 1.0, r"val_fraction must be in \(0, 1\)"),
        ("max_abs", 0.0, "max_abs must be None or > 0"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchConfig(**{field: value})
