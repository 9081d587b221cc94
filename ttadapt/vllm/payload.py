"""The per-request wire format of ttadapt's vLLM plugin: ``extra_args["ttadapt"]``.

vLLM carries per-request extension data in ``SamplingParams.extra_args``; over HTTP the field is
``vllm_xargs``, which accepts only strings, numbers and *flat* lists of them. The payload is therefore
one flat list of numbers (version 1)::

    [1, L, E, F,                      # version, layer count, experts, has-force flag (0 or 1)
     lid_0, ..., lid_{L-1},           # true decoder-layer ids (HF numbering), or the single id -1
     b_0, ..., b_{L*E-1},             # additive router-logit bias, row-major [L, E]
     f_0, ..., f_{L*E-1}]             # only when F == 1: force, row-major [L, E], each -1, 0 or +1

The bias of layer ``lid_i`` is added to that layer's router logits before top-k, for every token of
the request: ``z + b`` (the HF side's ``delta + steer``). ``force`` then applies SteerMoE hard forcing
(+1: logit set to the token's max + margin; -1: min - margin), as ``RouterState.force`` does.
Layers not listed get no edit. The single layer id ``-1`` (with ``L == 1``) applies one row to every
MoE layer of the served model.

This module is pure Python + numpy (no vLLM import): :func:`encode_state` / :func:`steer_payload`
build payloads on the client, :func:`decode` validates one (the engine calls it at admission, with
the served model's layout, so a bad payload is rejected before it reaches a forward).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from ttadapt.state import RouterState

__all__ = [
    "ALL_LAYERS",
    "AUTO_SALT_KEY",
    "FORMAT_VERSION",
    "MAX_ABS_BIAS",
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "PAYLOAD_KEY",
    "Layout",
    "Payload",
    "PayloadError",
    "Steer",
    "decode",
    "encode",
    "encode_state",
    "merge_steer",
    "payload_salt",
    "steer_payload",
]

PAYLOAD_KEY = "ttadapt"
"""Key of the payload in ``SamplingParams.extra_args`` (HTTP: ``vllm_xargs``)."""
AUTO_SALT_KEY = "ttadapt_auto_salt"
"""``extra_args[AUTO_SALT_KEY] = 0`` opts a request out of the engine-side per-vector cache salt."""
FORMAT_VERSION = 1
ALL_LAYERS = -1
"""Layer id meaning "every MoE layer" (only as the single layer of a payload)."""
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_ABS_BIAS = 1.0e4
"""Largest accepted |bias|: far above any useful steering (a +50 bias already forces an expert) and
small enough that ``logits + bias`` stays finite in fp16/bf16."""
_HEADER = 4
_MAX_VALUES = _HEADER + MAX_LAYERS + 2 * 262_144  # at most 262,144 (L*E) entries per tensor
_WHERE = f"extra_args[{PAYLOAD_KEY!r}]"


class PayloadError(ValueError):
    """A malformed ttadapt payload (vLLM turns a ValueError at admission into a 400 / an exception)."""


@dataclass(frozen=True)
class Layout:
    """The MoE layout of a served model: true layer ids of its MoE layers and the expert count."""

    layer_ids: tuple[int, ...]
    num_experts: int


@dataclass(frozen=True)
class Payload:
    """A decoded payload: ``bias`` float32 ``[L, E]``, ``force`` int8 ``[L, E]`` or None."""

    layer_ids: tuple[int, ...]
    num_experts: int
    bias: np.ndarray
    force: np.ndarray | None

    @property
    def all_layers(self) -> bool:
        return self.layer_ids == (ALL_LAYERS,)

    def is_zero(self) -> bool:
        """True when the payload changes nothing (zero bias, no forcing)."""
        return not self.bias.any() and (self.force is None or not self.force.any())

    def to_list(self) -> list[float | int]:
        return encode(self.layer_ids, self.bias, self.force)


# ---------------------------------------------------------------------------------------- encode
def encode(
    layer_ids: Sequence[int],
    bias: Any,
    force: Any = None,
) -> list[float | int]:
    """Encode ``bias`` ``[L, E]`` (and optional ``force`` ``[L, E]`` in {-1, 0, 1}) for ``layer_ids``.

    Accepts numpy arrays, torch tensors or nested lists. The result is validated with :func:`decode`
    (so an encoder never produces a payload the engine would reject for its structure).
    """
    ids = [int(i) for i in layer_ids]
    b = _as_array(bias, np.float32, "bias")
    if b.ndim == 1 and len(ids) == 1:
        b = b[None, :]
    if b.ndim != 2 or b.shape[0] != len(ids):
        raise PayloadError(f"bias must be [L={len(ids)}, E], got shape {tuple(b.shape)}")
    f = None
    if force is not None:
        f = _as_array(force, np.float64, "force")
        if f.ndim == 1 and len(ids) == 1:
            f = f[None, :]
        if f.shape != b.shape:
            raise PayloadError(f"force must have the shape of bias {tuple(b.shape)}, got {tuple(f.shape)}")
        if not f.any():
            f = None
    values: list[float | int] = [FORMAT_VERSION, len(ids), int(b.shape[1]), 0 if f is None else 1, *ids]
    values.extend(b.reshape(-1).tolist())  # exact: float32 -> Python float -> float32 round-trips
    if f is not None:
        values.extend(int(x) for x in f.reshape(-1).tolist())
    decode(values)
    return values


def encode_state(state: RouterState, *, row: int | None = None) -> list[float | int]:
    """Encode a :class:`ttadapt.RouterState`: bias ``delta + steer`` and ``force``, per MoE layer.

    A per-row state (``delta`` ``[L, B, E]``) needs ``row``: one request carries one vector.
    """
    import torch

    delta = state.delta.detach()
    if delta.dim() == 3:
        if row is None:
            raise PayloadError(
                f"this RouterState holds {delta.shape[1]} per-row vectors; pick one with row=i "
                "(one vLLM request carries one vector)"
            )
        if not -delta.shape[1] <= row < delta.shape[1]:
            raise PayloadError(f"row {row} out of range for a {delta.shape[1]}-row state")
        delta = delta[:, row]
    elif row not in (None, 0):
        raise PayloadError(f"row={row} given but the state is shared (one vector for all rows)")
    with torch.no_grad():
        bias = (delta.float() + state.steer.float()).to("cpu")  # same fp32 sum the HF patch uses
        force = state.force.to("cpu")
    return encode(state.layer_ids, bias.numpy(), force.numpy() if bool(force.any()) else None)


@dataclass(frozen=True)
class Steer:
    """A steering spec, as :meth:`ttadapt.PatchHandle.steer` takes it, for a vLLM request.

    Args:
        promote / suppress: expert ids.
        layers: ``"all"`` or true layer ids.
        bias: soft steering: ``+bias`` to promoted, ``-bias`` to suppressed experts' logits.
        hard: SteerMoE forcing instead (promoted into every token's top-k, suppressed out of it).
        num_experts: experts per MoE layer; needed only when no RouterState is given with the spec.
    """

    promote: int | Sequence[int] = ()
    suppress: int | Sequence[int] = ()
    layers: Literal["all"] | int | Sequence[int] = "all"
    bias: float = 1.0
    hard: bool = False
    num_experts: int | None = None

    def experts(self, num_experts: int) -> tuple[list[int], list[int]]:
        up, down = _ids(self.promote, "promote"), _ids(self.suppress, "suppress")
        bad = [e for e in up + down if not 0 <= e < num_experts]
        if bad:
            raise PayloadError(f"expert ids {bad} out of range: experts are 0..{num_experts - 1}")
        if set(up) & set(down):
            raise PayloadError(f"experts {sorted(set(up) & set(down))} are both promoted and suppressed")
        if not up and not down:
            raise PayloadError("a steering spec needs promote=... and/or suppress=... expert ids")
        if not self.hard and not (isinstance(self.bias, (int, float)) and math.isfinite(self.bias)):
            raise PayloadError(f"steering bias must be a finite number, got {self.bias!r}")
        return up, down

    def layer_list(self) -> list[int] | None:
        """True layer ids, or None for every layer."""
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise PayloadError(f"layers must be 'all' or layer ids, got {self.layers!r}")
            return None
        return _ids(self.layers, "layers")


def steer_payload(spec: Steer | None = None, /, **kwargs: Any) -> list[float | int]:
    """Payload for a steering spec alone (no RouterState): ``steer_payload(promote=[5], num_experts=64)``."""
    spec = spec if spec is not None else Steer(**kwargs)
    if spec.num_experts is None:
        raise PayloadError("steer_payload needs num_experts= (the served model's experts per MoE layer)")
    E = int(spec.num_experts)
    up, down = spec.experts(E)
    layers = spec.layer_list()
    ids = [ALL_LAYERS] if layers is None else layers
    bias = np.zeros((len(ids), E), dtype=np.float32)
    force = np.zeros((len(ids), E), dtype=np.int8)
    if spec.hard:
        force[:, up], force[:, down] = 1, -1
    else:
        bias[:, up] += np.float32(spec.bias)
        bias[:, down] -= np.float32(spec.bias)
    return encode(ids, bias, force if spec.hard else None)


def merge_steer(state: RouterState, spec: Steer) -> RouterState:
    """A copy of ``state`` with ``spec`` applied to its ``steer``/``force`` (as ``handle.steer`` would)."""
    import torch

    up, down = spec.experts(state.num_experts)
    layers = spec.layer_list()
    try:
        slots = list(range(len(state.layer_ids))) if layers is None else [state.slot(i) for i in layers]
    except ValueError as exc:
        raise PayloadError(str(exc)) from None
    out = state.clone()
    with torch.no_grad():
        for s in slots:
            if spec.hard:
                out.force[s, up] = 1
                out.force[s, down] = -1
            else:
                out.steer[s, up] += float(spec.bias)
                out.steer[s, down] -= float(spec.bias)
    out.refresh()
    return out


# ---------------------------------------------------------------------------------------- decode
def decode(obj: Any, layout: Layout | None = None) -> Payload:
    """Validate a payload and return it decoded; raise :class:`PayloadError` with the reason.

    With ``layout`` (the served model's MoE layer ids and expert count) the layer ids and the expert
    count are checked too; without it only the structure is.
    """
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise PayloadError(
            f"{_WHERE} must be a flat list of numbers (see ttadapt.vllm.payload), got {type(obj).__name__}"
        )
    n = len(obj)
    if n < _HEADER:
        raise PayloadError(f"{_WHERE} is too short ({n} values): it starts with [version, L, E, has_force]")
    if n > _MAX_VALUES:
        raise PayloadError(f"{_WHERE} is too large: {n} values, the limit is {_MAX_VALUES}")
    version, L, E, has_force = (_header_int(obj[i], name) for i, name in enumerate(("version", "L", "E", "F")))
    if version != FORMAT_VERSION:
        raise PayloadError(f"{_WHERE}: unsupported payload version {version} (this ttadapt reads {FORMAT_VERSION})")
    if not 1 <= L <= MAX_LAYERS:
        raise PayloadError(f"{_WHERE}: layer count L={L} must be in 1..{MAX_LAYERS}")
    if not 1 <= E <= MAX_EXPERTS:
        raise PayloadError(f"{_WHERE}: expert count E={E} must be in 1..{MAX_EXPERTS}")
    if has_force not in (0, 1):
        raise PayloadError(f"{_WHERE}: has_force flag must be 0 or 1, got {has_force}")
    want = _HEADER + L + (1 + has_force) * L * E
    if n != want:
        raise PayloadError(
            f"{_WHERE} has {n} values but its header [v={version}, L={L}, E={E}, F={has_force}] "
            f"needs {want} (4 + L layer ids + {'2*' if has_force else ''}L*E)"
        )
    ids = tuple(_header_int(x, "layer id") for x in obj[_HEADER : _HEADER + L])
    if ALL_LAYERS in ids and ids != (ALL_LAYERS,):
        raise PayloadError(f"{_WHERE}: layer id {ALL_LAYERS} (every MoE layer) must be the only layer id")
    if any(i < ALL_LAYERS for i in ids):
        raise PayloadError(f"{_WHERE}: negative layer ids {sorted(i for i in ids if i < ALL_LAYERS)}")
    if len(set(ids)) != len(ids):
        raise PayloadError(f"{_WHERE}: repeated layer ids {sorted({i for i in ids if ids.count(i) > 1})}")
    start = _HEADER + L
    bias_vals = obj[start : start + L * E]
    _check_numbers(bias_vals, "bias")
    bias64 = np.asarray(bias_vals, dtype=np.float64)
    if not np.isfinite(bias64).all():
        raise PayloadError(f"{_WHERE}: bias holds NaN or inf")
    if bias64.size and float(np.abs(bias64).max()) > MAX_ABS_BIAS:
        raise PayloadError(f"{_WHERE}: |bias| must be <= {MAX_ABS_BIAS:g}, got {float(np.abs(bias64).max()):g}")
    force = None
    if has_force:
        fvals = obj[start + L * E :]
        _check_numbers(fvals, "force")
        f64 = np.asarray(fvals, dtype=np.float64)
        if not np.isin(f64, (-1.0, 0.0, 1.0)).all():
            raise PayloadError(f"{_WHERE}: force values must be -1, 0 or +1")
        force = f64.astype(np.int8).reshape(L, E)
    if layout is not None:
        if E != layout.num_experts:
            raise PayloadError(
                f"{_WHERE} is for {E} experts but the served model has {layout.num_experts} per MoE layer"
            )
        if ids != (ALL_LAYERS,):
            unknown = sorted(set(ids) - set(layout.layer_ids))
            if unknown:
                raise PayloadError(
                    f"{_WHERE}: layers {unknown} are not MoE layers of the served model; "
                    f"its MoE layers are {list(layout.layer_ids)} (or use {ALL_LAYERS} for all)"
                )
    return Payload(layer_ids=ids, num_experts=E, bias=bias64.astype(np.float32).reshape(L, E), force=force)


def payload_salt(obj: Any) -> str | None:
    """A prefix-cache salt for a payload: None when it changes nothing (so it shares vanilla KV)."""
    p = obj if isinstance(obj, Payload) else decode(obj)
    if p.is_zero():
        return None
    h = hashlib.sha256()
    h.update(np.asarray(p.layer_ids, dtype=np.int64).tobytes())
    h.update(p.bias.tobytes())
    if p.force is not None:
        h.update(p.force.tobytes())
    return "ttadapt:" + h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------- helpers
def _header_int(x: Any, name: str) -> int:
    if type(x) is int:
        return x
    if type(x) is float and x.is_integer():
        return int(x)
    raise PayloadError(f"{_WHERE}: {name} must be an integer, got {x!r}")


def _check_numbers(vals: Sequence[Any], name: str) -> None:
    if isinstance(vals, np.ndarray):
        if vals.dtype.kind not in "iuf":
            raise PayloadError(f"{_WHERE}: {name} must hold numbers, got dtype {vals.dtype}")
        return
    for x in vals:
        t = type(x)
        if t is not float and t is not int:
            raise PayloadError(f"{_WHERE}: {name} must hold only numbers, found {x!r} ({t.__name__})")


def _as_array(x: Any, dtype: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{name} must be numeric: {exc}") from None
    return arr


def _ids(x: int | Sequence[int], name: str) -> list[int]:
    vals = [x] if isinstance(x, int) else list(x)
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise PayloadError(f"{name} must be integer ids, got {v!r}")
        out.append(int(v))
    return out
