"""Adaptation trace: what each round did, for users, evals and benchmarks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundTrace:
    """One adaptation round."""

    position: int  # context length (tokens, incl. padding) the round adapted on
    skipped: str | None = None  # reason when the round did not adapt
    selected_layers: list[int] = field(default_factory=list)  # union over batch rows
    rows_selected: list[list[int]] = field(default_factory=list)  # per row, when batched
    rows: list[int] | None = None  # batch rows adapted when some had finished (None: every row)
    window_start: int | None = None  # first context column the steps covered (RerouteConfig.window; None: all)
    confidence: list[float] = field(default_factory=list)
    fit_loss: list[float] = field(default_factory=list)  # per step, before its update
    val_loss: list[float] = field(default_factory=list)  # held-out loss per candidate (guard)
    chosen: int | None = None  # candidate kept by the guard (0 = no change, s = after step s; None = rows differ)
    refit_loss: list[float] = field(default_factory=list)  # per refit step (RerouteConfig.refit)
    delta_mean_abs: float = 0.0
    routing_changed: float | None = None  # fraction of (token, layer) top-k sets that changed
    events: list[str] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class AdaptationTrace:
    """All rounds of one ``generate``/``adapt`` call plus decode timing."""

    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[RoundTrace] = field(default_factory=list)
    decode_time: float = 0.0
    generated: int = 0

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    @property
    def events(self) -> list[str]:
        return [e for r in self.rounds for e in r.events]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> dict[str, Any]:
        """Compact numbers for logs and eval records."""
        adapted = [r for r in self.rounds if r.skipped is None]
        return {
            "rounds": self.num_rounds,
            "adapted_rounds": len(adapted),
            "kept_rounds": sum(1 for r in adapted if r.chosen not in (None, 0)),
            "first_loss": adapted[0].fit_loss[0] if adapted and adapted[0].fit_loss else None,
            "last_loss": adapted[-1].fit_loss[-1] if adapted and adapted[-1].fit_loss else None,
            "delta_mean_abs": self.rounds[-1].delta_mean_abs if self.rounds else 0.0,
            "routing_changed": adapted[-1].routing_changed if adapted else None,
            "events": self.events,
            "adapt_time": sum(sum(r.times.values()) for r in self.rounds),
            "decode_time": self.decode_time,
        }

    def format(self) -> str:
        """Human-readable, one line per round."""
        lines = []
        for i, r in enumerate(self.rounds):
            if r.skipped:
                lines.append(f"round {i} @ {r.position} tok: skipped ({r.skipped})")
                continue
            loss = f"{r.fit_loss[0]:.4f}->{r.fit_loss[-1]:.4f}" if r.fit_loss else "-"
            val = f" val {r.val_loss[0]:.4f}->{min(r.val_loss):.4f} kept={r.chosen}" if r.val_loss else ""
            rc = f" routing changed {100 * r.routing_changed:.1f}%" if r.routing_changed is not None else ""
            t = sum(r.times.values())
            lines.append(
                f"round {i} @ {r.position} tok: layers {r.selected_layers} loss {loss}{val} "
                f"|delta| {r.delta_mean_abs:.4f}{rc} ({t * 1000:.0f} ms)"
                + (f" events: {'; '.join(r.events)}" if r.events else "")
            )
        lines.append(f"decode {self.decode_time:.2f} s for {self.generated} tokens")
        return "\n".join(lines)
