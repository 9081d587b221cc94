"""The ``ttadapt`` field of an HTTP request to ``ttadapt serve``: parsed and type-checked, pure Python.

A request body to ``/v1/completions`` or ``/v1/chat/completions`` may carry::

    "ttadapt": {
        "state": "NAME",                                    # registered with --state NAME=FILE
        "steer": {"promote": [5], "bias": 4.0},             # or a list of such specs (ttadapt.vllm.Steer)
        "reroute": {"preset": "default", "steps": 2}        # or a preset name; adapt on the prompt
    }

``reroute`` may also pick the trainer (``"trainer": "hf" | "search"``, default: the server's) and,
for the search, its knobs (``"search": {"rounds": 2, ...}``, :class:`ttadapt.vllm.SearchConfig` fields).

:func:`parse_request` turns it into a :class:`RequestSpec` or raises :class:`RequestError`, whose
message names the fix (the server answers it with HTTP 400). Checks that need the served model
(layer ids, expert ids, |bias|) happen when the server builds the state (``ttadapt.vllm.runtime``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttadapt.config import PRESETS, RerouteConfig
from ttadapt.vllm.payload import PAYLOAD_KEY, Steer
from ttadapt.vllm.search import SearchConfig

__all__ = [
    "FIELD", "KNOWN_KEYS", "MAX_SEARCH_CANDIDATES", "REROUTE_FIELDS", "SEARCH_FIELDS", "STEER_FIELDS", "TRAINERS",
    "RequestError", "RequestSpec", "parse_request",
]

FIELD = "ttadapt"
"""Top-level key of the request body read by the server middleware."""
KNOWN_KEYS = ("state", "steer", "reroute")
STEER_FIELDS = ("promote", "suppress", "layers", "bias", "hard")
REROUTE_FIELDS = tuple(f.name for f in dataclasses.fields(RerouteConfig) if f.name != "name")
SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))
TRAINERS = ("hf", "search")
MAX_SEARCH_CANDIDATES = 64
"""Most ``reroute.search.candidates`` a request may ask for (each is one prompt forward per round)."""
_SCHEMA_HINT = 'e.g. {"ttadapt": {"state": "NAME", "steer": {"promote": [5], "bias": 4.0}, "reroute": "default"}}'


class RequestError(ValueError):
    """A bad ``ttadapt`` request field; the server answers HTTP 400 with this message."""

    def __init__(self, message: str, param: str = FIELD, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


@dataclass(frozen=True)
class RequestSpec:
    """What one request asks for: a registered state, steering specs and/or rerouting on its prompt.

    With ``reroute``, ``trainer`` names who adapts (``"hf"``/``"search"``) and ``search`` holds the
    search's knobs (``trainer == "search"`` only).
    """

    state: str | None = None
    steers: tuple[Steer, ...] = ()
    reroute: RerouteConfig | None = None
    trainer: str | None = None
    search: SearchConfig | None = None


def parse_request(
    body: Mapping[str, Any],
    *,
    states: Collection[str] = (),
    trainers: Sequence[str] = (),
    max_steps: int | None = None,
) -> RequestSpec:
    """Parse ``body["ttadapt"]`` (the whole request body is given to check ``vllm_xargs`` too).

    Args:
        states: names registered at server start (``--state NAME=FILE``).
        trainers: the trainers the server offers for ``reroute``, its default first (``--trainer hf``:
            ``("hf", "search")``; ``--trainer search``: ``("search",)``; ``--trainer none``: none).
        max_steps: the server's cap on ``reroute.steps`` and ``reroute.search.rounds`` (None: no cap).
    """
    raw = body.get(FIELD)
    if not isinstance(raw, Mapping):
        raise RequestError(
            f"'{FIELD}' must be an object with keys {list(KNOWN_KEYS)}, got {_kind(raw)}; {_SCHEMA_HINT}"
        )
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise RequestError(f"unknown '{FIELD}' keys {unknown}; known keys are {list(KNOWN_KEYS)}; {_SCHEMA_HINT}")
    if not any(raw.get(k) is not None for k in KNOWN_KEYS):
        raise RequestError(f"'{FIELD}' is empty: give at least one of {list(KNOWN_KEYS)}; {_SCHEMA_HINT}")
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, Mapping) and PAYLOAD_KEY in xargs:
        raise RequestError(
            f"this request has both '{FIELD}' and vllm_xargs['{PAYLOAD_KEY}']; send one of them (the "
            f"'{FIELD}' field is turned into vllm_xargs['{PAYLOAD_KEY}'] by the server)",
            param="vllm_xargs",
        )
    reroute, trainer, search = _parse_reroute(raw.get("reroute"), trainers=trainers, max_steps=max_steps)
    return RequestSpec(
        state=_parse_state(raw.get("state"), states),
        steers=_parse_steers(raw.get("steer")),
        reroute=reroute,
        trainer=trainer,
        search=search,
    )


# ------------------------------------------------------------------------------------------ state
def _parse_state(name: Any, states: Collection[str]) -> str | None:
    if name is None:
        return None
    param = f"{FIELD}.state"
    if not isinstance(name, str):
        raise RequestError(f"'{param}' must be the name of a registered state (a string), got {_kind(name)}", param)
    if name not in states:
        have = sorted(states)
        raise RequestError(
            f"unknown state {name!r}; this server has "
            + (f"states {have}" if have else "no registered states")
            + " (register one at start with `ttadapt serve --state NAME=FILE`)",
            param,
        )
    return name


# ------------------------------------------------------------------------------------------ steer
def _parse_steers(raw: Any) -> tuple[Steer, ...]:
    if raw is None:
        return ()
    specs = raw if isinstance(raw, list) else [raw]
    out = []
    for i, spec in enumerate(specs):
        param = f"{FIELD}.steer" + (f"[{i}]" if isinstance(raw, list) else "")
        if not isinstance(spec, Mapping):
            raise RequestError(
                f"'{param}' must be an object with fields {list(STEER_FIELDS)} (or a list of them), got "
                f"{_kind(spec)}; e.g. {{\"promote\": [5], \"layers\": \"all\", \"bias\": 4.0}}",
                param,
            )
        unknown = sorted(set(spec) - set(STEER_FIELDS))
        if unknown:
            raise RequestError(f"unknown '{param}' fields {unknown}; known fields are {list(STEER_FIELDS)}", param)
        kw: dict[str, Any] = {}
        for key in ("promote", "suppress"):
            if key in spec:
                kw[key] = _int_or_ints(spec[key], f"{param}.{key}", "expert ids")
        if "layers" in spec:
            layers = spec["layers"]
            kw["layers"] = "all" if layers == "all" else _int_or_ints(layers, f"{param}.layers", '"all" or layer ids')
        if "bias" in spec:
            bias = spec["bias"]
            if not _is_number(bias) or not math.isfinite(bias):
                raise RequestError(f"'{param}.bias' must be a finite number, got {bias!r}", f"{param}.bias")
            kw["bias"] = float(bias)
        if "hard" in spec:
            if not isinstance(spec["hard"], bool):
                raise RequestError(f"'{param}.hard' must be true or false, got {spec['hard']!r}", f"{param}.hard")
            kw["hard"] = spec["hard"]
        if all(kw.get(k) in (None, ()) for k in ("promote", "suppress")):
            raise RequestError(f"'{param}' needs \"promote\" and/or \"suppress\" expert ids", param)
        out.append(Steer(**kw))
    return tuple(out)


def _int_or_ints(x: Any, param: str, what: str) -> int | tuple[int, ...]:
    if _is_int(x):
        return int(x)
    if isinstance(x, list) and all(_is_int(v) for v in x):
        return tuple(int(v) for v in x)
    raise RequestError(f"'{param}' must be {what} (an integer or a list of integers), got {x!r}", param)


# ------------------------------------------------------------------------------------------ reroute
def _parse_reroute(
    raw: Any, *, trainers: Sequence[str], max_steps: int | None
) -> tuple[RerouteConfig | None, str | None, SearchConfig | None]:
    if raw is None or raw is False:
        return None, None, None
    param = f"{FIELD}.reroute"
    if not trainers:
        raise RequestError(
            f"'{param}' needs a trainer, but this server was started with --trainer none; restart it with "
            "`ttadapt serve --trainer hf` (the default) or `--trainer search`, or send a fixed state/steer instead",
            param,
        )
    if raw is True:
        raw = "default"
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, Mapping):
        raise RequestError(
            f"'{param}' must be a preset name {sorted(PRESETS)} or an object of RerouteConfig fields, "
            f"got {_kind(raw)}; "
            'e.g. {"preset": "default", "steps": 2}',
            param,
        )
    fields = dict(raw)
    preset = fields.pop("preset", "default")
    trainer = _parse_trainer(fields.pop("trainer", None), trainers)
    search = _parse_search(fields.pop("search", None), trainer, max_steps)
    if preset not in PRESETS:
        raise RequestError(f"unknown reroute preset {preset!r}; presets are {sorted(PRESETS)}", f"{param}.preset")
    unknown = sorted(set(fields) - set(REROUTE_FIELDS))
    if unknown:
        raise RequestError(
            f"unknown '{param}' fields {unknown}; known fields are 'preset', 'trainer', 'search' and the "
            f"RerouteConfig fields {list(REROUTE_FIELDS)}",
            param,
        )
    for key, value in fields.items():
        _check_type(_HINTS, key, value, f"{param}.{key}")
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    try:
        cfg = RerouteConfig.preset(preset, **fields)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"bad '{param}': {exc}", param) from None
    _check_step_limit(param, "steps", cfg.steps, max_steps)
    return cfg, trainer, search


def _parse_trainer(raw: Any, trainers: Sequence[str]) -> str:
    param = f"{FIELD}.reroute.trainer"
    if raw is None:
        return trainers[0]
    if raw not in TRAINERS:
        raise RequestError(f"'{param}' must be one of {list(TRAINERS)}, got {_kind(raw)}", param)
    if raw not in trainers:
        raise RequestError(
            f"'{param}' = {raw!r} needs the server's HF copy of the model, but this server was started with "
            f"--trainer {trainers[0]}; use {list(trainers)} or restart with `ttadapt serve --trainer hf`",
            param,
        )
    return str(raw)


def _check_step_limit(param: str, key: str, value: int, max_steps: int | None) -> None:
    """400 when ``param.key`` asks for more steps/rounds than ``ttadapt serve --max-reroute-steps`` allows."""
    if max_steps is not None and value > max_steps:
        raise RequestError(
            f"'{param}.{key}' = {value} exceeds this server's limit of {max_steps} "
            f"(ask for fewer {key}, or restart with a larger `ttadapt serve --max-reroute-steps`)",
            f"{param}.{key}",
        )


def _parse_search(raw: Any, trainer: str, max_steps: int | None) -> SearchConfig | None:
    param = f"{FIELD}.reroute.search"
    if trainer != "search":
        if raw is not None:
            raise RequestError(
                f"'{param}' configures the search trainer, but this request uses {trainer!r}; "
                f'add "trainer": "search" to \'{FIELD}.reroute\' or drop it',
                param,
            )
        return None
    if raw is None:
        return SearchConfig()
    if not isinstance(raw, Mapping):
        raise RequestError(
            f"'{param}' must be an object of SearchConfig fields {list(SEARCH_FIELDS)}, got {_kind(raw)}; "
            'e.g. {"rounds": 2, "candidates": 8}',
            param,
        )
    unknown = sorted(set(raw) - set(SEARCH_FIELDS))
    if unknown:
        raise RequestError(f"unknown '{param}' fields {unknown}; known fields are {list(SEARCH_FIELDS)}", param)
    fields = dict(raw)
    for key, value in fields.items():
        _check_type(_SEARCH_HINTS, key, value, f"{param}.{key}")
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    try:
        cfg = SearchConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"bad '{param}': {exc}", param) from None
    _check_step_limit(param, "rounds", cfg.rounds, max_steps)
    if cfg.candidates > MAX_SEARCH_CANDIDATES:
        raise RequestError(
            f"'{param}.candidates' = {cfg.candidates} exceeds the limit of {MAX_SEARCH_CANDIDATES} "
            "(each candidate is one prompt forward per round)",
            f"{param}.candidates",
        )
    return cfg


_HINTS = typing.get_type_hints(RerouteConfig)
_SEARCH_HINTS = typing.get_type_hints(SearchConfig)


def _check_type(hints: Mapping[str, Any], key: str, value: Any, param: str) -> None:
    """JSON type of one config field (values are checked by the config class itself)."""
    allowed = hints[key]
    union = isinstance(allowed, types.UnionType) or typing.get_origin(allowed) is typing.Union
    options = typing.get_args(allowed) if union else (allowed,)
    for opt in options:
        if opt is type(None) and value is None:
            return
        if opt is bool and isinstance(value, bool):
            return
        if opt is int and _is_int(value):
            return
        if opt is float and _is_number(value):
            return
        if typing.get_origin(opt) is typing.Literal and isinstance(value, str):
            return  # the config class names the valid choices
        if typing.get_origin(opt) is tuple and isinstance(value, list) and all(_is_int(v) for v in value):
            return
    want = " or ".join(_type_name(o) for o in options)
    raise RequestError(f"'{param}' must be {want}, got {value!r}", param)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    if typing.get_origin(t) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if typing.get_origin(t) is tuple:
        return "a list of integers"
    return {bool: "true/false", int: "an integer", float: "a number"}.get(t, str(t))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _kind(x: Any) -> str:
    return "null" if x is None else f"{type(x).__name__} {x!r}"[:80]
