"""Next-token loss without materialising ``[tokens, vocab]`` logits: the LM head runs in token chunks.

On long contexts the full-vocabulary logits (and, with grad, their log-softmax and gradient) are the
largest tensors of an adaptation step. ``LossHead`` runs the model's decoder, then the LM head and
cross-entropy chunk by chunk; with grad each chunk is checkpointed, so only one chunk of logits is
alive during the backward (its LM head is recomputed there). It is used only where it reproduces the
model's own logits (checked once per model): families that post-process logits (scaling, soft-capping)
keep the plain full-logits path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ttadapt.hf_compat import output_cache

_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class LossOutput:
    """Per-token next-token cross-entropy ``[B, T]`` (fp32) and the cache when one was asked for."""

    losses: torch.Tensor
    past_key_values: Any = None


def _chunk_losses(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # the head module itself, not F.linear on its weight: some heads cast their input (Ergo's fp32-output head)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The model's decoder (everything before the LM head), or None where the model does not expose one."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


class LossHead:
    """The model split as decoder + linear LM head, computing token losses in chunks of ``chunk`` tokens."""

    def __init__(self, model: nn.Module, decoder: nn.Module, head: nn.Linear, chunk: int) -> None:
        self.model, self.decoder, self.head, self.chunk = model, decoder, head, chunk

    @classmethod
    def for_model(cls, model: nn.Module, probe: torch.Tensor, chunk: int = 256) -> LossHead | None:
        """A LossHead if ``lm_head(decoder(x))`` equals the model's logits on ``probe`` ids; else None."""
        decoder = decoder_of(model)
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if decoder is None or not isinstance(head, nn.Linear):
            return None
        lh = cls(model, decoder, head, chunk)
        ok = _VERIFIED.get(model)
        if ok is None:
            ok = lh._reproduces_logits(probe[:, : min(probe.shape[1], 8)])  # all rows: a per-row state must fit
            _VERIFIED[model] = ok
        return lh if ok else None

    @torch.no_grad()
    def _reproduces_logits(self, ids: torch.Tensor) -> bool:
        ref = self.model(input_ids=ids, use_cache=False).logits.float()
        try:
            mine = self.head(self.decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        except (RuntimeError, TypeError, ValueError, AttributeError):  # a decoder or head the split cannot call
            return False
        return ref.shape == mine.shape and torch.allclose(ref, mine, rtol=1e-4, atol=1e-4)

    def __call__(self, targets: torch.Tensor, **decoder_kwargs: Any) -> LossOutput:
        out = self.decoder(return_dict=True, **decoder_kwargs)
        hidden = out.last_hidden_state
        B, T, H = hidden.shape
        h, t = hidden.reshape(B * T, H), targets.reshape(B * T)
        grad = torch.is_grad_enabled() and h.requires_grad
        parts = []
        for i in range(0, B * T, self.chunk):
            hs, ts = h[i : i + self.chunk], t[i : i + self.chunk]
            parts.append(
                checkpoint(_chunk_losses, self.head, hs, ts, use_reentrant=False) if grad else _chunk_losses(self.head, hs, ts)
            )
        return LossOutput(torch.cat(parts).view(B, T), output_cache(out))
