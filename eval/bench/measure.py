"""Interleaved timing (A B A B ...) with warm-up, and peak-memory measurement."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Wall times of one method across repetitions, plus per-phase seconds from its traces."""

    seconds: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> tuple[float, float]:
        return min(self.seconds), max(self.seconds)

    def phase_medians(self) -> dict[str, float]:
        keys = sorted({k for p in self.phases for k in p})
        return {k: statistics.median(p.get(k, 0.0) for p in self.phases) for k in keys}


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleave(
    methods: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: str
) -> dict[str, Timing]:
    """Run every method ``warmup`` times, then ``repeats`` rounds of all methods in turn (A B C A B C ...)."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    out = {name: Timing() for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            res = fn()
            sync(device)
            out[name].seconds.append(time.perf_counter() - t0)
            if device.startswith("cuda"):
                out[name].peak_bytes.append(torch.cuda.max_memory_allocated())
            trace = res[1] if isinstance(res, tuple) else None
            if isinstance(trace, dict):  # phases measured by the runner itself (vLLM methods)
                out[name].phases.append(dict(trace))
            elif trace is not None:
                ph: dict[str, float] = {"decode": trace.decode_time}
                for r in trace.rounds:
                    for k, v in r.times.items():
                        ph[k] = ph.get(k, 0.0) + v
                out[name].phases.append(ph)
    return out


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median of per-repetition ratios a/b (robust to drifts that hit both runs of a repetition)."""
    return statistics.median(x / y for x, y in zip(a.seconds, b.seconds))
