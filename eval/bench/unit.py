"""The cost model behind every ratio: one forward+backward over the context against one decoded token.

A run adapting ``rounds`` times with ``steps`` forward+backward passes each, over contexts of mean length
``T``, costs about ``1 + rounds * steps * (fwd+bwd(T) / decode step) / new_tokens`` times plain
``generate`` (confidence pass, refresh and chunk restarts are left out: they are small next to the steps;
so is memory mode's recomputation, which the presets switch on from 2048 tokens).
Measuring the two unit costs on a device says where a preset's ratio will land there, and why.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .measure import sync


@dataclass(frozen=True)
class UnitCosts:
    """Measured unit costs and the ratio they predict for ``rounds`` × ``steps`` passes over ``new_tokens``."""

    context: int
    new_tokens: int
    rounds: int
    steps: int
    mean_context: int
    fwd_bwd_s: float
    decode_token_s: float

    @property
    def quotient(self) -> float:
        """Forward+backward over the mean round context, in decode steps."""
        return self.fwd_bwd_s / self.decode_token_s

    @property
    def predicted_ratio(self) -> float:
        return 1.0 + self.rounds * self.steps * self.quotient / self.new_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "quotient": self.quotient, "predicted_ratio": self.predicted_ratio}

    def describe(self) -> str:
        return (
            f"Cost model (context {self.context}, {self.new_tokens} new): forward+backward over {self.mean_context} "
            f"tokens (mean round context) {self.fwd_bwd_s * 1e3:.1f} ms, decode {self.decode_token_s * 1e3:.2f} ms/token: "
            f"quotient {self.quotient:.1f}; {self.rounds} round{'s' if self.rounds != 1 else ''} × {self.steps} steps predict "
            f"1 + {self.rounds}·{self.steps}·{self.quotient:.1f}/{self.new_tokens} = {self.predicted_ratio:.2f}× plain."
        )


def round_contexts(context: int, new_tokens: int, interval: int | None) -> list[int]:
    """Context length at each adaptation round: the prompt, then the prompt plus every finished chunk."""
    from ttadapt import rounds_for

    return [context + i * interval for i in range(rounds_for(new_tokens, interval))] if interval else [context]


def measure_unit_costs(
    model: Any, ids: torch.Tensor, new_tokens: int, *, vocab: int, steps: int, interval: int | None,
    decode: dict[str, Any], device: str, repeats: int = 3,
) -> UnitCosts:
    """Time one forward+backward reaching every router's ``delta`` over the mean round context, and one decode
    step of ``model.generate`` (with the bench's decode options) after ``ids``; medians after a warm-up."""
    ctxs = round_contexts(ids.shape[1], new_tokens, interval)
    mean_ctx = round(sum(ctxs) / len(ctxs))
    x = torch.randint(2, vocab, (1, mean_ctx), generator=torch.Generator().manual_seed(1)).to(ids.device)
    with _patched(model) as handle:
        def fwd_bwd() -> None:
            from ttadapt.adapt import token_losses

            with handle.trainable(None):
                logits = model(input_ids=x, use_cache=False).logits
                token_losses(logits[:, :-1], x[:, 1:]).mean().backward()

        fb = _median(fwd_bwd, repeats, device)
    extra = 32  # decode steps timed (the difference of two generate calls), whatever new_tokens is
    short = dict(decode, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    long = dict(short, max_new_tokens=4 + extra, min_new_tokens=4 + extra)
    per_token = statistics.median(
        (_timed(lambda: model.generate(ids, **long), device) - _timed(lambda: model.generate(ids, **short), device)) / extra
        for _ in range(repeats)
    )
    return UnitCosts(
        context=ids.shape[1], new_tokens=new_tokens, rounds=len(ctxs), steps=steps, mean_context=mean_ctx,
        fwd_bwd_s=fb, decode_token_s=max(per_token, 1e-9),  # noise cannot make it zero or negative
    )


@contextlib.contextmanager
def _patched(model: Any) -> Iterator[Any]:
    """The model's ttadapt handle: the existing one (left patched), or a fresh patch removed on exit."""
    import ttadapt

    handle = ttadapt.get_handle(model)
    if handle is not None:
        yield handle
        return
    handle = ttadapt.patch(model)
    try:
        yield handle
    finally:
        handle.unpatch()


def _timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _median(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()  # warm-up
    return statistics.median(_timed(fn, device) for _ in range(repeats))
