"""ttadapt: test-time rerouting for Mixture-of-Experts language models.

Patch a transformers MoE model so every router computes ``z + delta[layer] + steer[layer]`` before
top-k (exact, per instance, reversible), steer experts, record routing, and adapt ``delta`` online.
"""

from __future__ import annotations

from ttadapt._version import __version__
from ttadapt.config import PRESETS, RerouteConfig
from ttadapt.errors import (
    AlreadyPatchedError,
    NotPatchedError,
    StateFileError,
    StateMismatchError,
    TTAdaptError,
)
from ttadapt.generation import Rerouter, generate, rounds_for
from ttadapt.handle import PatchHandle, get_handle, patch, unpatch
from ttadapt.model_info import MoEInfo, inspect_model
from ttadapt.patches import UnsupportedModelError, supported_model_types
from ttadapt.recording import RoutingRecorder
from ttadapt.state import RouterState
from ttadapt.trace import AdaptationTrace, RoundTrace

__all__ = [
    "PRESETS",
    "AdaptationTrace",
    "AlreadyPatchedError",
    "MoEInfo",
    "NotPatchedError",
    "PatchHandle",
    "RerouteConfig",
    "Rerouter",
    "RoundTrace",
    "RouterState",
    "RoutingRecorder",
    "StateFileError",
    "StateMismatchError",
    "TTAdaptError",
    "UnsupportedModelError",
    "__version__",
    "generate",
    "get_handle",
    "inspect_model",
    "patch",
    "rounds_for",
    "supported_model_types",
    "unpatch",
]
