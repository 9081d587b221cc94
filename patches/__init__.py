"""Registry of MoE family patches, keyed by ``config.model_type`` (installed as ``ttadapt.patches``).

Each family module declares ``SPECS``: data saying where the routers are, which router style
applies the bias, and what the bias affects. Add a family by adding a module and naming it in
``FAMILY_MODULES`` (the registry-completeness test enforces both).
"""

from __future__ import annotations

import importlib

from .base import FamilySpec, RouterSite, find_sites
from .logit_edit import LogitEdit

__all__ = [
    "FAMILY_MODULES",
    "FamilySpec",
    "LogitEdit",
    "RouterSite",
    "UnsupportedModelError",
    "find_sites",
    "get_spec",
    "register",
    "registered_specs",
    "supported_model_types",
]

#: Family modules in this package; each exports ``SPECS: tuple[FamilySpec, ...]``.
FAMILY_MODULES: tuple[str, ...] = (
    # hand-written styles
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "flex_olmo",
    "mellum",
    "mixtral",
    "minimax",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granite",
    "aria",
    # generic interception
    "afmoe",
    "axk2",
    "beam",
    "cohere2_moe",
    "dbrx",
    "deepseek_v4",
    "ergo",
    "ernie4_5_moe",
    "flint",
    "gemma4",
    "hunyuan",
    "inkling",
    "inkling2",
    "jamba",
    "jetmoe",
    "kolibri",
    "laguna",
    "lara_mini",
    "lfm2_moe",
    "llama4",
    "longcat_flash",
    "minicpm5_moe",
    "mistral4",
    "phimoe",
    "zaya",
)

_REGISTRY: dict[str, FamilySpec] = {}


class UnsupportedModelError(ValueError):
    """Raised for a model whose ``model_type`` has no registered patch."""


def register(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` to the registry; a model_type may be registered once."""
    if spec.model_type in _REGISTRY:
        raise ValueError(f"model_type {spec.model_type!r} is already registered")
    _REGISTRY[spec.model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    """Sorted ``config.model_type`` values ttadapt can patch."""
    return sorted(_REGISTRY)


def registered_specs() -> dict[str, FamilySpec]:
    """A copy of the registry."""
    return dict(_REGISTRY)


def get_spec(model_type: str) -> FamilySpec:
    """The spec for ``model_type``, or one clear error listing what is supported."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"ttadapt has no router patch for model_type {model_type!r}. Supported model_types: "
            f"{', '.join(supported_model_types())}. To add one, see patches/README.md."
        ) from None


for _name in FAMILY_MODULES:
    for _spec in importlib.import_module(f"{__name__}.{_name}").SPECS:
        register(_spec)
