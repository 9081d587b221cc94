"""The one edit ttadapt makes to router logits: add a bias (per layer or per batch row), then force."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitEdit:
    """Callable applied to raw router logits ``z`` of one layer, before any softmax/sigmoid/top-k.

    ``bias`` is ``[E]`` (all tokens) or ``[B, E]`` (one vector per batch row; tokens are laid out
    row-major as the model flattens them). ``force_in``/``force_out`` are boolean ``[E]`` masks:
    SteerMoE semantics, ``z_e <- max(z) + margin`` / ``z_e <- min(z) - margin`` per token.
    """

    bias: torch.Tensor | None = None
    force_in: torch.Tensor | None = None
    force_out: torch.Tensor | None = None
    margin: float = 0.01

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            logits = logits + expand_bias(self.bias, logits).to(logits.dtype)
        if self.force_in is not None or self.force_out is not None:
            logits = force(logits, self.force_in, self.force_out, self.margin)
        return logits


def expand_bias(bias: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[E]`` or per-row ``[B, E]`` bias to the shape of ``logits``."""
    if bias.dim() == 1:
        return bias
    rows = bias.shape[0]
    if logits.dim() == 3:
        if logits.shape[0] != rows:
            raise RuntimeError(f"per-row router state has {rows} rows but the batch has {logits.shape[0]}")
        return bias[:, None, :]
    tokens = logits.shape[0]
    if tokens % rows:
        raise RuntimeError(
            f"per-row router state has {rows} rows but the router saw {tokens} tokens, not a multiple; "
            "pass the same batch size the state was made for (RouterState.zeros(..., batch_size=B))"
        )
    if tokens == rows:
        return bias
    return bias.repeat_interleave(tokens // rows, dim=0)


def force(
    logits: torch.Tensor,
    force_in: torch.Tensor | None,
    force_out: torch.Tensor | None,
    margin: float,
) -> torch.Tensor:
    """Set forced-in experts just above the token's best logit and forced-out just below its worst."""
    if force_in is not None:
        top = logits.amax(dim=-1, keepdim=True) + margin
        logits = torch.where(force_in.to(logits.device), top, logits)
    if force_out is not None:
        bottom = logits.amin(dim=-1, keepdim=True) - margin
        logits = torch.where(force_out.to(logits.device), bottom, logits)
    return logits
