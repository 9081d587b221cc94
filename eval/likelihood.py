"""Tokenisation with a document-start token, and log-likelihood of continuations given a context.

Context and continuation are tokenised together (offsets decide which tokens are scored), so a
BPE merge across the boundary is scored as the model would see it; a token that straddles the
boundary counts as continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Encoder:
    """Wraps a tokenizer: prepends the document-start token (the model's BOS, else EOS) once."""

    tokenizer: Any
    max_length: int | None = None

    def __post_init__(self) -> None:
        tok = self.tokenizer
        probe = tok("a")["input_ids"]
        special = {tok.bos_token_id, tok.eos_token_id} - {None}
        adds_own = bool(probe) and probe[0] in special
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.prefix: list[int] = [] if adds_own or start is None else [int(start)]
        self.add_special = True

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the document-start prefix."""
        return self.prefix + list(self.tokenizer(text, add_special_tokens=self.add_special)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Ids of ``context + continuation`` tokenised together and how many leading ids are context."""
        full = context + continuation
        tok = self.tokenizer
        try:
            enc = tok(full, add_special_tokens=self.add_special, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError, KeyError):
            ctx = self.encode(context)
            return ctx + list(tok(continuation, add_special_tokens=False)["input_ids"]), len(ctx)
        ids = list(enc["input_ids"])
        n_ctx = 0
        for i, (_start, end) in enumerate(offsets):
            if end > len(context):
                break
            n_ctx = i + 1
        if n_ctx == len(ids) and continuation:  # defensive: always score at least one token
            n_ctx = max(0, len(ids) - 1)
        return self.prefix + ids, len(self.prefix) + n_ctx

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def fit_left(ids: list[int], n_ctx: int, max_len: int | None, keep: int) -> tuple[list[int], int, bool]:
    """Drop context tokens after the first ``keep`` (the prefix) until ``ids`` fits ``max_len``."""
    if max_len is None or len(ids) <= max_len:
        return ids, n_ctx, False
    excess = len(ids) - max_len
    if excess > n_ctx - keep:
        raise ValueError(f"continuation alone ({len(ids) - n_ctx} tokens) exceeds the model context ({max_len})")
    return ids[:keep] + ids[keep + excess :], n_ctx - excess, True


@torch.no_grad()
def continuation_logprobs(
    model: Any,
    batch: Sequence[tuple[list[int], int]],
    pad_id: int,
) -> list[tuple[float, int]]:
    """For each ``(ids, n_ctx)``: the summed log-prob of ``ids[n_ctx:]`` and its token count (one padded forward)."""
    if not batch:
        return []
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, _) in enumerate(batch):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[r, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for r, (ids, n_ctx) in enumerate(batch):
        if n_ctx < 1 or n_ctx >= len(ids):
            raise ValueError(f"need 1 <= n_ctx < len(ids), got n_ctx={n_ctx}, len={len(ids)}")
        tgt = torch.tensor(ids[n_ctx:], dtype=torch.long, device=device)
        lp = logp[r, n_ctx - 1 : len(ids) - 1].gather(1, tgt[:, None]).squeeze(1)
        out.append((float(lp.sum()), len(ids) - n_ctx))
    return out
