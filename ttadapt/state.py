"""RouterState: per-MoE-layer learnable ``delta``, fixed ``steer`` bias and hard forcing masks."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ttadapt.errors import StateFileError, StateMismatchError
from ttadapt.patches import LogitEdit

if TYPE_CHECKING:
    from ttadapt.handle import PatchHandle
    from ttadapt.model_info import MoEInfo

FORMAT = "ttadapt.router_state"
FORMAT_VERSION = "1"


class RouterState:
    """Router edits for every MoE layer of one model, in float32.

    ``delta`` is ``[L, E]`` (shared by all sequences) or ``[L, B, E]`` (one vector per batch row);
    ``steer`` is a fixed ``[L, E]`` additive bias; ``force`` is ``[L, E]`` int8 in {-1, 0, +1}
    (hard force out / none / in). Layers are addressed by their true decoder-layer id.
    The effective edit of layer ``l`` is ``z + delta[l] + steer[l]``, then forcing.
    """

    def __init__(
        self,
        *,
        layer_ids: Sequence[int],
        num_experts: int,
        delta: torch.Tensor,
        steer: torch.Tensor,
        force: torch.Tensor,
        model_type: str = "",
        fingerprint: str = "",
        weights_digest: str = "",
    ) -> None:
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.num_experts = int(num_experts)
        self.model_type = model_type
        self.model_fingerprint = fingerprint
        self.weights_digest = weights_digest
        L, E = len(self.layer_ids), self.num_experts
        if delta.dim() not in (2, 3) or delta.shape[0] != L or delta.shape[-1] != E:
            raise StateMismatchError(f"delta must be [L={L}, E={E}] or [L, B, E], got {tuple(delta.shape)}")
        if tuple(steer.shape) != (L, E) or tuple(force.shape) != (L, E):
            raise StateMismatchError(f"steer and force must be [L={L}, E={E}]")
        self.delta = delta.float()
        self.steer = steer.float()
        self.force = force.to(torch.int8)
        self._slot = {lid: i for i, lid in enumerate(self.layer_ids)}
        self._on = [False] * L
        self.refresh()

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(
        cls,
        model: nn.Module | PatchHandle | MoEInfo,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> RouterState:
        """An all-zero state for ``model`` (shared, or per-row with ``batch_size`` rows)."""
        info = _info(model)
        L, E = len(info.layer_ids), info.num_experts
        dev = torch.device(device) if device is not None else info.device
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shape = (L, E) if batch_size is None else (L, batch_size, E)
        return cls(
            layer_ids=info.layer_ids,
            num_experts=E,
            delta=torch.zeros(shape, device=dev),
            steer=torch.zeros(L, E, device=dev),
            force=torch.zeros(L, E, dtype=torch.int8, device=dev),
            model_type=info.model_type,
            fingerprint=info.fingerprint(),
            weights_digest=info.weights_digest(),
        )

    # ------------------------------------------------------------------ introspection
    @property
    def batch_size(self) -> int | None:
        """Rows of a per-row state, or None when one vector serves every sequence."""
        return self.delta.shape[1] if self.delta.dim() == 3 else None

    @property
    def device(self) -> torch.device:
        return self.delta.device

    def slot(self, layer_id: int) -> int:
        """Row of ``layer_id`` in the ``[L, ...]`` tensors; clear error for a non-MoE layer."""
        try:
            return self._slot[int(layer_id)]
        except KeyError:
            raise ValueError(f"layer {layer_id} is not a MoE layer; MoE layers are {list(self.layer_ids)}") from None

    def is_zero(self) -> bool:
        """True when the state changes nothing (all vectors zero, no forcing)."""
        return not (bool(self.delta.detach().any()) or bool(self.steer.any()) or bool(self.force.any()))

    def refresh(self) -> None:
        """Recompute which layers carry an edit (one device sync); call after editing tensors by hand."""
        with torch.no_grad():
            d = self.delta.detach().reshape(len(self.layer_ids), -1).ne(0).any(dim=1)
            s = self.steer.ne(0).any(dim=1)
            f = self.force.ne(0).any(dim=1)
        self._steer_on = [bool(x) for x in s.tolist()]
        self._force_on = [bool(x) for x in f.tolist()]
        self._on = [bool(x) for x in (d | s | f).tolist()]

    def mark_active(self, slots: Sequence[int] | None = None) -> None:
        """Route ``slots`` (all by default) through the edit even while their vectors are still zero."""
        for s in range(len(self.layer_ids)) if slots is None else slots:
            self._on[s] = True

    def active_slots(self) -> list[int]:
        return [i for i, on in enumerate(self._on) if on]

    # ------------------------------------------------------------------ the edit
    def edit(self, slot: int, margin: float) -> LogitEdit | None:
        """The logit edit for layer slot ``slot``, or None when that layer is untouched (exact fast path)."""
        if not self._on[slot]:
            return None
        bias = self.delta[slot]
        if self._steer_on[slot]:
            bias = bias + self.steer[slot]
        f_in = f_out = None
        if self._force_on[slot]:
            f_in, f_out = self.force[slot].eq(1), self.force[slot].eq(-1)
        return LogitEdit(bias=bias, force_in=f_in, force_out=f_out, margin=margin)

    # ------------------------------------------------------------------ editing
    def reset(self) -> RouterState:
        """Zero every vector and forcing mask in place."""
        with torch.no_grad():
            self.delta.zero_()
            self.steer.zero_()
            self.force.zero_()
        self.refresh()
        return self

    def clone(self) -> RouterState:
        """A detached deep copy."""
        return self._replace(delta=self.delta.detach().clone())

    def to(self, device: torch.device | str) -> RouterState:
        """A copy on ``device``."""
        return RouterState(
            layer_ids=self.layer_ids,
            num_experts=self.num_experts,
            delta=self.delta.detach().to(device),
            steer=self.steer.to(device),
            force=self.force.to(device),
            model_type=self.model_type,
            fingerprint=self.model_fingerprint,
            weights_digest=self.weights_digest,
        )

    def per_row(self, batch_size: int) -> RouterState:
        """A per-row copy with ``batch_size`` rows (a shared delta is repeated)."""
        if self.batch_size is not None:
            if self.batch_size == batch_size:
                return self.clone()
            if self.batch_size != 1:
                raise ValueError(f"cannot turn a {self.batch_size}-row state into {batch_size} rows")
            d = self.delta.detach()[:, 0]
        else:
            d = self.delta.detach()
        return self._replace(delta=d[:, None, :].repeat(1, batch_size, 1).contiguous())

    def row(self, index: int) -> RouterState:
        """Row ``index`` of a per-row state as a shared state."""
        if self.batch_size is None:
            return self.clone()
        return self._replace(delta=self.delta.detach()[:, index].clone())

    def select_rows(self, index: Sequence[int] | torch.Tensor) -> RouterState:
        """A per-row state holding rows ``index`` (for batch expansion or reordering)."""
        if self.batch_size is None:
            raise ValueError("select_rows needs a per-row state; use per_row(B) first")
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self._replace(delta=self.delta.detach().index_select(1, idx).clone())

    def _replace(self, *, delta: torch.Tensor) -> RouterState:
        new = RouterState(
            layer_ids=self.layer_ids,
            num_experts=self.num_experts,
            delta=delta,
            steer=self.steer.clone(),
            force=self.force.clone(),
            model_type=self.model_type,
            fingerprint=self.model_fingerprint,
            weights_digest=self.weights_digest,
        )
        new.mark_active(self.active_slots())
        return new

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, info: MoEInfo, *, strict_weights: bool = True) -> None:
        """Raise a StateMismatchError naming the difference when this state does not fit ``info``."""
        problems = []
        if self.model_type and self.model_type != info.model_type:
            problems.append(f"model_type {self.model_type!r} != model's {info.model_type!r}")
        if self.layer_ids != info.layer_ids:
            problems.append(f"MoE layers {list(self.layer_ids)} != model's {list(info.layer_ids)}")
        if self.num_experts != info.num_experts:
            problems.append(f"{self.num_experts} experts != model's {info.num_experts}")
        if self.model_fingerprint and not problems and self.model_fingerprint != info.fingerprint():
            problems.append("structural fingerprint differs (top-k changed?)")
        if strict_weights and self.weights_digest and not problems and self.weights_digest != info.weights_digest():
            problems.append(
                "router weights differ from those the state was made for (another checkpoint?); "
                "pass strict=False to use it anyway"
            )
        if problems:
            raise StateMismatchError("router state does not match this model: " + "; ".join(problems))

    # ------------------------------------------------------------------ use
    @contextlib.contextmanager
    def apply(self, model: nn.Module | PatchHandle) -> Iterator[PatchHandle]:
        """Make every forward of ``model`` use this state inside the block (patching it if needed)."""
        from ttadapt.handle import PatchHandle, get_handle, patch

        handle = model if isinstance(model, PatchHandle) else get_handle(model)
        owned = handle is None
        if owned:
            handle = patch(model)
        try:
            with handle.use_state(self):
                yield handle
        finally:
            if owned:
                handle.unpatch()

    def content_hash(self) -> str:
        """Hash of the vectors (e.g. a vLLM ``cache_salt``); equal states hash equal."""
        h = hashlib.sha256()
        for t in (self.delta.detach(), self.steer, self.force):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """Per-layer mean |delta| and the most promoted/suppressed expert, for logs and traces."""
        d = self.delta.detach().float()
        d = d if d.dim() == 2 else d.mean(dim=1)
        out = {}
        for i, lid in enumerate(self.layer_ids):
            row = d[i] + self.steer[i]
            out[lid] = {
                "mean_abs": float(row.abs().mean()),
                "max_expert": int(row.argmax()),
                "min_expert": int(row.argmin()),
                "forced_in": [int(e) for e in torch.nonzero(self.force[i] == 1).flatten()],
                "forced_out": [int(e) for e in torch.nonzero(self.force[i] == -1).flatten()],
            }
        return out

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> Path:
        """Write the state as safetensors with metadata (never pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "layer_ids": json.dumps(list(self.layer_ids)),
            "num_experts": str(self.num_experts),
            "fingerprint": self.model_fingerprint,
            "weights_digest": self.weights_digest,
        }
        tensors = {
            "delta": self.delta.detach().to("cpu").contiguous(),
            "steer": self.steer.to("cpu").contiguous(),
            "force": self.force.to("cpu").contiguous(),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | PatchHandle | MoEInfo | None = None,
        *,
        strict: bool = True,
    ) -> RouterState:
        """Read a state saved by :meth:`save`; with ``model``, check it fits and move it to its device."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no router-state file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
            raise StateFileError(f"{path} is not a readable safetensors file (corrupted?): {exc}") from exc
        if meta.get("format") != FORMAT:
            raise StateFileError(f"{path} is not a ttadapt router-state file (metadata format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StateFileError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
        missing = {"delta", "steer", "force"} - set(tensors)
        if missing:
            raise StateFileError(f"{path} lacks tensors {sorted(missing)}")
        try:
            layer_ids = json.loads(meta["layer_ids"])
            num_experts = int(meta["num_experts"])
        except (KeyError, ValueError) as exc:
            raise StateFileError(f"{path}: malformed metadata ({exc})") from exc
        for name in ("delta", "steer"):
            if not torch.isfinite(tensors[name]).all():
                raise StateFileError(f"{path}: tensor {name!r} holds NaN or inf")
        if not tensors["force"].abs().le(1).all():
            raise StateFileError(f"{path}: force must hold only -1, 0, +1")
        state = cls(
            layer_ids=layer_ids,
            num_experts=num_experts,
            delta=tensors["delta"],
            steer=tensors["steer"],
            force=tensors["force"],
            model_type=meta.get("model_type", ""),
            fingerprint=meta.get("fingerprint", ""),
            weights_digest=meta.get("weights_digest", ""),
        )
        if model is not None:
            info = _info(model)
            state.check_compatible(info, strict_weights=strict)
            state = state.to(info.device)
        return state

    def __repr__(self) -> str:
        rows = "" if self.batch_size is None else f", rows={self.batch_size}"
        return (
            f"RouterState({self.model_type or '?'}, layers={list(self.layer_ids)}, experts={self.num_experts}"
            f"{rows}, active={self.active_slots()})"
        )


def _info(model: Any) -> MoEInfo:
    from ttadapt.handle import PatchHandle
    from ttadapt.model_info import MoEInfo, inspect_model

    if isinstance(model, MoEInfo):
        return model
    if isinstance(model, PatchHandle):
        return model.info
    return inspect_model(model)
