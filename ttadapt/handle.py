"""ttadapt.patch: bind the router edit to one model instance, reversibly, and expose its controls."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ttadapt.errors import AlreadyPatchedError, NotPatchedError
from ttadapt.model_info import MoEInfo, inspect_model, unwrap
from ttadapt.patches.base import BiasAffects
from ttadapt.patches._generic import generic_forward
from ttadapt.patches.verify import Binding, bind_style
from ttadapt.recording import RoutingRecorder
from ttadapt.state import RouterState

_ATTR = "_ttadapt_handle"


class PatchHandle:
    """Live patch of one model: routers compute ``z + delta + steer`` (then forcing) before top-k.

    Use :func:`patch` to create one. Also a context manager: leaving the block unpatches.
    """

    def __init__(self, model: nn.Module, info: MoEInfo, bias_affects: BiasAffects) -> None:
        self.model = model
        self.info = info
        self.bias_affects: BiasAffects = bias_affects
        self._selection_only = bias_affects == "selection"
        self._state = RouterState.zeros(info)
        self._recorder: RoutingRecorder | None = None
        self._originals: list[tuple[nn.Module, bool, Any]] = []
        self._patched = False
        self._straight_through = False
        self._batch: int | None = None  # sequences in the running forward (checked against per-row states)
        self._hooks: list[Any] = []
        self.bindings: dict[type, Binding] = {}  # per router class: the verified style, or generic

    # ------------------------------------------------------------------ introspection
    @property
    def moe_layers(self) -> list[int]:
        """True decoder-layer ids of the MoE layers, in order."""
        return list(self.info.layer_ids)

    @property
    def num_experts(self) -> int:
        return self.info.num_experts

    @property
    def top_k(self) -> int:
        return self.info.top_k

    @property
    def model_type(self) -> str:
        return self.info.model_type

    @property
    def state(self) -> RouterState:
        """The router state every forward uses now."""
        return self._state

    @property
    def is_patched(self) -> bool:
        return self._patched

    # ------------------------------------------------------------------ binding
    def _install(self) -> None:
        spec = self.info.spec
        try:
            for slot, site in enumerate(self.info.sites):
                router = site.module
                orig = router.forward
                binding = self.bindings.get(type(router))
                if binding is None:
                    binding = self.bindings[type(router)] = bind_style(spec, router, orig, site.num_experts)
                self._originals.append((router, "forward" in router.__dict__, router.__dict__.get("forward")))
                router.forward = self._make_forward(slot, router, orig, binding, site.num_experts)
            if self._selection_only and self.uses_generic:
                raise ValueError(
                    f"bias_affects='selection' needs ttadapt's hand-written {spec.model_type} router, which "
                    f"does not match this transformers release ({self._fallback_reason()}); patch with "
                    "bias_affects='selection+weights' (the generic interception, exact) or install a "
                    "transformers release the style was verified on (README)"
                )
            body = _decoder_body(unwrap(self.model), spec.layers_path)
            self._hooks = [
                body.register_forward_pre_hook(self._note_batch, with_kwargs=True),
                body.register_forward_hook(self._forget_batch, always_call=True),
            ]
        except Exception:
            self._restore()
            raise
        self._patched = True

    @property
    def uses_generic(self) -> bool:
        """Whether any router runs the generic interception (declared so, or its style did not verify)."""
        return any(b.style is None for b in self.bindings.values())

    def _fallback_reason(self) -> str:
        return "; ".join(b.fallback_reason for b in self.bindings.values() if b.fallback_reason)

    def _note_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self._batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None

    def _forget_batch(self, *_: Any) -> None:
        self._batch = None

    def _check_rows(self) -> None:
        rows = self._state.batch_size
        if rows is not None and self._batch is not None and rows != self._batch:
            raise RuntimeError(
                f"per-row router state has {rows} rows but the batch has {self._batch} sequences; "
                "make the state for this batch (RouterState.zeros(model, batch_size=B), state.select_rows(...))"
            )

    def _make_forward(self, slot: int, router: nn.Module, orig: Any, binding: Binding, num_classes: int) -> Any:
        spec = self.info.spec
        style, opts = binding.style, binding.options
        margin = spec.force_margin
        reader = spec.reader
        top_k = self.info.sites[slot].top_k

        def forward(*args: Any, **kwargs: Any) -> Any:
            edit = self._state.edit(slot, margin)
            if edit is not None:
                self._check_rows()
            if edit is None:
                out = orig(*args, **kwargs)
            elif style is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                if self._straight_through:
                    out = style(router, hidden, edit, self._selection_only, straight_through=True, **opts)
                else:
                    out = style(router, hidden, edit, self._selection_only, **opts)
            else:
                out = generic_forward(router, orig, num_classes, edit, args, kwargs)
            if self._recorder is not None:
                self._recorder.capture(slot, *reader(out, top_k))
            return out

        forward.__ttadapt__ = True  # type: ignore[attr-defined]
        return forward

    def _restore(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._batch = None
        for router, had_own, previous in reversed(self._originals):
            if had_own:
                router.forward = previous
            else:
                router.__dict__.pop("forward", None)
        self._originals.clear()

    def unpatch(self) -> None:
        """Restore the exact original routers; the handle becomes inert. Idempotent."""
        if not self._patched:
            return
        self._restore()
        self._patched = False
        self._recorder = None
        target = unwrap(self.model)
        if target.__dict__.get(_ATTR) is self:
            del target.__dict__[_ATTR]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    # ------------------------------------------------------------------ state
    def _check_live(self) -> None:
        if not self._patched:
            raise NotPatchedError("this handle was unpatched; call ttadapt.patch(model) again")

    def load_state(self, state: RouterState, *, strict: bool = True) -> RouterState:
        """Make ``state`` the one every forward uses (checked against this model, moved to its device)."""
        self._check_live()
        state.check_compatible(self.info, strict_weights=strict)
        if state.device != self.info.device:
            state = state.to(self.info.device)
        self._state = state
        return state

    @contextlib.contextmanager
    def use_state(self, state: RouterState, *, strict: bool = True) -> Iterator[RouterState]:
        """Use ``state`` inside the block, then restore the previous one."""
        previous = self._state
        loaded = self.load_state(state, strict=strict)
        try:
            yield loaded
        finally:
            self._state = previous

    def reset(self) -> RouterState:
        """Zero the current state in place."""
        return self._state.reset()

    def new_state(self, batch_size: int | None = None) -> RouterState:
        """A fresh zero state for this model (per-row with ``batch_size``), not yet loaded."""
        return RouterState.zeros(self.info, batch_size=batch_size)

    # ------------------------------------------------------------------ steering
    def steer(
        self,
        *,
        promote: int | Sequence[int] = (),
        suppress: int | Sequence[int] = (),
        layers: int | Sequence[int] | Literal["all"] = "all",
        bias: float = 1.0,
        hard: bool = False,
    ) -> RouterState:
        """Promote/suppress experts in ``layers`` (true layer ids) of the current state.

        Soft (default): add ``+bias`` to promoted and ``-bias`` to suppressed experts' logits.
        Hard (``hard=True``, SteerMoE semantics): promoted experts are forced into the top-k
        (logit set to the token's max + margin), suppressed ones out of it (min - margin).
        Composes with ``delta``; call repeatedly to accumulate, :meth:`clear_steer` to undo.
        """
        self._check_live()
        state = self._state
        slots = _slots(state, layers)
        up, down = _experts(promote, state.num_experts), _experts(suppress, state.num_experts)
        if set(up) & set(down):
            raise ValueError(f"experts {sorted(set(up) & set(down))} are both promoted and suppressed")
        if not up and not down:
            raise ValueError("steer() needs promote=... and/or suppress=... expert ids")
        if not hard and not (isinstance(bias, (int, float)) and bias == bias and abs(bias) != float("inf")):
            raise ValueError(f"bias must be a finite number, got {bias!r}")
        with torch.no_grad():
            for s in slots:
                if hard:
                    state.force[s, up] = 1
                    state.force[s, down] = -1
                else:
                    state.steer[s, up] += float(bias)
                    state.steer[s, down] -= float(bias)
        state.refresh()
        return state

    def clear_steer(self) -> RouterState:
        """Remove all steering (soft and hard) from the current state; ``delta`` is kept."""
        with torch.no_grad():
            self._state.steer.zero_()
            self._state.force.zero_()
        self._state.refresh()
        return self._state

    # ------------------------------------------------------------------ recording and training
    @contextlib.contextmanager
    def record(self, *, to_cpu: bool = False) -> Iterator[RoutingRecorder]:
        """Capture router logits/probabilities and selected experts of every forward in the block."""
        self._check_live()
        if self._recorder is not None:
            raise RuntimeError("a routing recorder is already active on this model")
        rec = RoutingRecorder(self.info, to_cpu=to_cpu)
        self._recorder = rec
        try:
            yield rec
        finally:
            self._recorder = None

    @contextlib.contextmanager
    def trainable(self, slots: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Freeze every model weight and let gradients reach ``state.delta`` (only) inside the block.

        Yields the delta leaf tensor. Model ``requires_grad`` flags are restored on exit.
        """
        self._check_live()
        if self.bias_affects == "selection":
            raise RuntimeError(
                "bias_affects='selection' gives the bias no gradient; patch with "
                "bias_affects='selection+weights' to optimise delta"
            )
        params = list(unwrap(self.model).parameters())
        flags = [p.requires_grad for p in params]
        state = self._state
        delta = state.delta.detach().requires_grad_(True)
        state.delta = delta
        state.mark_active(slots)
        try:
            for p in params:
                p.requires_grad_(False)
            yield delta
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            state.delta = delta.detach()

    @contextlib.contextmanager
    def straight_through(self, enabled: bool = True) -> Iterator[None]:
        """Inside the block, hand-written styles give routing weights the dense-softmax gradient
        (forward values unchanged). Generic-style families ignore it."""
        previous = self._straight_through
        self._straight_through = enabled and not self.uses_generic
        try:
            yield
        finally:
            self._straight_through = previous

    def __repr__(self) -> str:
        status = "patched" if self._patched else "unpatched"
        styles = "/".join(sorted({b.name for b in self.bindings.values()})) or self.info.spec.style
        return (
            f"PatchHandle({self.model_type}, {status}, layers={self.moe_layers}, experts={self.num_experts}, "
            f"top_k={self.top_k}, bias_affects={self.bias_affects!r}, style={styles!r})"
        )


def _slots(state: RouterState, layers: int | Sequence[int] | str) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or layer ids, got {layers!r}")
        return list(range(len(state.layer_ids)))
    ids = [layers] if isinstance(layers, int) else list(layers)
    return [state.slot(i) for i in ids]


def _experts(experts: int | Sequence[int], num_experts: int) -> list[int]:
    ids = [experts] if isinstance(experts, int) else [int(e) for e in experts]
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise ValueError(f"expert ids {bad} out of range: this model has experts 0..{num_experts - 1}")
    return ids


def _decoder_body(model: nn.Module, layers_path: str) -> nn.Module:
    """The module that owns the decoder layers (``model.model``; DBRX ``model.transformer``)."""
    parent = layers_path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The live handle of ``model``, or None when it is not patched."""
    handle = unwrap(model).__dict__.get(_ATTR)
    return handle if isinstance(handle, PatchHandle) and handle.is_patched else None


def patch(model: nn.Module, *, bias_affects: BiasAffects | None = None) -> PatchHandle:
    """Patch every MoE router of ``model`` (this instance only; weights untouched).

    Args:
        model: a transformers MoE causal LM (a PEFT-wrapped one is unwrapped).
        bias_affects: ``"selection+weights"`` (bias enters the router's scores: default, has a
            gradient) or ``"selection"`` (bias moves only the choice; weights use raw scores).

    Returns the :class:`PatchHandle`; ``handle.unpatch()`` (or leaving ``with``) restores the model.
    """
    target = unwrap(model)
    if get_handle(target) is not None:
        raise AlreadyPatchedError(
            "this model is already patched by ttadapt; reuse ttadapt.get_handle(model) or call "
            "handle.unpatch() first"
        )
    info = inspect_model(target)
    spec = info.spec
    mode: BiasAffects = bias_affects or spec.bias_affects
    if mode not in spec.selection_options:
        raise ValueError(
            f"{spec.model_type} supports bias_affects in {spec.selection_options}, not {mode!r}"
        )
    handle = PatchHandle(target, info, mode)
    handle._install()
    target.__dict__[_ATTR] = handle
    return handle


def unpatch(model: nn.Module) -> None:
    """Remove ttadapt's patch from ``model`` if present."""
    handle = get_handle(model)
    if handle is not None:
        handle.unpatch()
