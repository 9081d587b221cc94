"""Client helpers: build vLLM requests that carry a RouterState or a steering spec.

* :func:`sampling_params` puts the payload in ``SamplingParams.extra_args["ttadapt"]``;
* :func:`prompt` salts the prefix cache per vector (``cache_salt``), so a request never reuses KV
  computed under another vector (the engine-side plugin also salts requests itself; this makes the
  salt explicit and visible);
* :func:`make_llm` starts ``vllm.LLM`` with the logits processor wired in and ``enforce_eager=True``
  (on either model runner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ttadapt.vllm.payload import (
    PAYLOAD_KEY,
    Layout,
    PayloadError,
    Steer,
    encode_state,
    merge_steer,
    steer_payload,
)

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

    from ttadapt.state import RouterState

__all__ = ["make_llm", "model_layout", "payload_for", "prompt", "sampling_params"]


def payload_for(
    state: RouterState | None = None,
    steer: Steer | Mapping[str, Any] | None = None,
    *,
    row: int | None = None,
) -> list[float | int] | None:
    """The flat ``extra_args["ttadapt"]`` list for a state and/or a steering spec (None for neither)."""
    spec = Steer(**steer) if isinstance(steer, Mapping) else steer
    if state is None:
        return None if spec is None else steer_payload(spec)
    if spec is not None:
        if state.batch_size is not None:
            if row is None:
                raise PayloadError("a per-row RouterState needs row=i (one request carries one vector)")
            state, row = state.row(row), None
        state = merge_steer(state, spec)
    return encode_state(state, row=row)


def sampling_params(
    state: RouterState | None = None,
    steer: Steer | Mapping[str, Any] | None = None,
    *,
    row: int | None = None,
    **sp_kwargs: Any,
) -> SamplingParams:
    """``vllm.SamplingParams(**sp_kwargs)`` carrying ``state`` (its ``delta + steer`` and ``force``)
    and/or a steering spec (:class:`~ttadapt.vllm.payload.Steer` or a dict of its fields).

    With neither, the request runs the unedited model. ``row`` picks one vector of a per-row state.
    """
    from vllm import SamplingParams

    payload = payload_for(state, steer, row=row)
    extra = dict(sp_kwargs.pop("extra_args", None) or {})
    if payload is not None:
        extra[PAYLOAD_KEY] = payload
    return SamplingParams(**sp_kwargs, extra_args=extra or None)


def prompt(
    text_or_ids: str | Sequence[int],
    state: RouterState | None = None,
    *,
    steer: Steer | Mapping[str, Any] | None = None,
    row: int | None = None,
    cache_salt: str | None = None,
) -> dict[str, Any]:
    """A vLLM prompt dict (``TextPrompt`` or ``TokensPrompt``) whose ``cache_salt`` names the vector.

    The salt is ``"ttadapt:" + state.content_hash()`` (plus the steering spec when given), so prefix
    caching only shares KV between requests with the same vector. A state that changes nothing
    (all zero, no steering) gets no salt and shares the unedited model's cache, which is exact.
    ``cache_salt`` is prepended (e.g. a per-tenant salt).
    """
    if isinstance(text_or_ids, str):
        out: dict[str, Any] = {"prompt": text_or_ids}
    else:
        ids = [int(t) for t in text_or_ids]
        out = {"prompt_token_ids": ids}
    salt = _salt(state, steer, row)
    parts = [p for p in (cache_salt, salt) if p]
    if parts:
        out["cache_salt"] = "|".join(parts)
    return out


def _salt(state: RouterState | None, steer: Any, row: int | None) -> str | None:
    if state is None and steer is None:
        return None
    if state is not None and steer is None:
        if state.batch_size is not None:
            if row is None:
                raise PayloadError("a per-row RouterState needs row=i (one request carries one vector)")
            state = state.row(row)
        return None if state.is_zero() else "ttadapt:" + state.content_hash()
    from ttadapt.vllm.payload import payload_salt

    return payload_salt(payload_for(state, steer, row=row))


def make_llm(model: str, **engine_kwargs: Any) -> LLM:
    """``vllm.LLM(model, **engine_kwargs)`` ready for ttadapt requests.

    Adds ttadapt's logits processor (after any given in ``logits_processors``) and defaults
    ``enforce_eager=True`` (the router hook is a Python forward hook; compiled mode works on CPU
    but is less tested). Either model runner works: vLLM picks its platform default unless
    ``VLLM_USE_V2_MODEL_RUNNER`` chooses. Raises if the installed vLLM is unsupported.
    """
    from vllm import LLM

    from ttadapt.vllm import plugin
    from ttadapt.vllm.logits_processor import FQCN

    plugin.ensure_registered()
    procs = list(engine_kwargs.pop("logits_processors", None) or [])
    if not any(p == FQCN or getattr(p, "__name__", None) == "TTAdaptLogitsProcessor" for p in procs):
        procs.append(FQCN)
    engine_kwargs.setdefault("enforce_eager", True)
    return LLM(model=model, logits_processors=procs, **engine_kwargs)


def model_layout(llm: LLM) -> Layout:
    """The served model's MoE layout (true layer ids, experts), e.g. for :func:`steer_payload`."""
    from ttadapt.vllm import plugin

    layout, why = plugin.frontend_layout(llm.llm_engine.vllm_config)
    if layout is None:
        raise PayloadError(f"ttadapt cannot describe this model's MoE layout: {why}")
    return layout
