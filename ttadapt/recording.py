"""RoutingRecorder: router logits, probabilities and selected experts of every token, per MoE layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ttadapt.model_info import MoEInfo


class RoutingRecorder:
    """Filled by a patched model inside ``handle.record()``; each forward appends its tokens.

    Tokens are in the order the model flattens them (row-major over ``[batch, seq]``), so a batched
    forward of shape ``[B, S]`` gives ``B * S`` rows per layer.
    """

    def __init__(self, info: MoEInfo, *, to_cpu: bool = False) -> None:
        self.layer_ids = info.layer_ids
        self.top_k = info.top_k
        self.num_experts = info.num_experts
        self.scoring = info.spec.scoring
        self._to_cpu = to_cpu
        self._logits: list[list[torch.Tensor]] = [[] for _ in self.layer_ids]
        self._indices: list[list[torch.Tensor | None]] = [[] for _ in self.layer_ids]

    def capture(self, slot: int, logits: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Store one router call (called by the patched forward)."""
        lg = logits.detach().reshape(-1, logits.shape[-1])[:, : self.num_experts].float()
        ix = None if indices is None else indices.detach().reshape(lg.shape[0], -1)
        if self._to_cpu:
            lg = lg.cpu()
            ix = None if ix is None else ix.cpu()
        self._logits[slot].append(lg)
        self._indices[slot].append(ix)

    def clear(self) -> None:
        for lst in (*self._logits, *self._indices):
            lst.clear()

    @property
    def num_calls(self) -> int:
        return len(self._logits[0])

    def _slot(self, layer_id: int) -> int:
        try:
            return self.layer_ids.index(layer_id)
        except ValueError:
            raise ValueError(f"layer {layer_id} is not a MoE layer; MoE layers are {list(self.layer_ids)}") from None

    def logits(self, layer_id: int) -> torch.Tensor:
        """Edited router logits ``[T, E]`` of all recorded tokens (fp32)."""
        chunks = self._logits[self._slot(layer_id)]
        if not chunks:
            raise RuntimeError("nothing recorded: run a forward inside handle.record()")
        return torch.cat(chunks)

    def probs(self, layer_id: int) -> torch.Tensor:
        """Router probabilities ``[T, E]`` (softmax, or per-expert sigmoid for sigmoid routers)."""
        lg = self.logits(layer_id)
        return lg.sigmoid() if self.scoring == "sigmoid" else lg.softmax(dim=-1)

    def selected(self, layer_id: int) -> torch.Tensor:
        """Selected experts ``[T, k]`` as the router returned them (top-k of probs if it returns none)."""
        slot = self._slot(layer_id)
        idx = self._indices[slot]
        if idx and all(i is not None for i in idx):
            return torch.cat(idx)  # type: ignore[arg-type]
        return self.probs(layer_id).topk(self.top_k, dim=-1).indices

    def confidence(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer ``C_l = mean_t -(1/k) sum_{j in top-k} log p_{t,j}`` (the paper's score; high = uncertain).

        ``mask`` (bool ``[T]``) restricts the mean to real (non-padding) tokens.
        """
        out = []
        for lid in self.layer_ids:
            p = self.probs(lid)
            sel = p.gather(1, self.selected(lid).long())
            per_token = -(sel.clamp_min(1e-30).log()).mean(dim=-1)
            out.append(per_token[mask.to(per_token.device)].mean() if mask is not None else per_token.mean())
        return torch.stack(out)

    def confidence_rows(self, batch_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer, per-row confidence ``[L, B]`` over forwards of ``[B, S_i]`` tokens (``mask``
        ``[B, sum S_i]``, the forwards' columns side by side, e.g. a prefill then decode steps)."""
        out = []
        for slot, lid in enumerate(self.layer_ids):
            p = self.probs(lid)
            sel = p.gather(1, self.selected(lid).long())
            flat = -(sel.clamp_min(1e-30).log()).mean(dim=-1)
            calls = flat.split([c.shape[0] for c in self._logits[slot]])
            per_token = torch.cat([c.view(batch_size, -1) for c in calls], dim=1)
            m = torch.ones_like(per_token) if mask is None else mask.to(per_token.device).float()
            out.append((per_token * m).sum(dim=1) / m.sum(dim=1).clamp_min(1))
        return torch.stack(out)

    def expert_counts(self, layer_id: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """How often each expert was selected ``[E]`` (over masked tokens)."""
        sel = self.selected(layer_id).long()
        if mask is not None:
            sel = sel[mask.to(sel.device)]
        return torch.bincount(sel.flatten(), minlength=self.num_experts)[: self.num_experts]

    def selection_sets(self, *, missing_ok: bool = False) -> list[torch.Tensor | None]:
        """Per layer, a bool ``[T, E]`` mask of selected experts (None for unrecorded layers if ``missing_ok``)."""
        out: list[torch.Tensor | None] = []
        for slot, lid in enumerate(self.layer_ids):
            if missing_ok and not self._logits[slot]:
                out.append(None)
                continue
            sel = self.selected(lid).long()
            m = torch.zeros(sel.shape[0], self.num_experts, dtype=torch.bool, device=sel.device)
            out.append(m.scatter_(1, sel, True))
        return out
