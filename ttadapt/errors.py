"""Exceptions raised by ttadapt; each message names the fix."""

from __future__ import annotations


class TTAdaptError(Exception):
    """Base class of ttadapt errors."""


class AlreadyPatchedError(TTAdaptError, RuntimeError):
    """The model already carries a ttadapt patch."""


class NotPatchedError(TTAdaptError, RuntimeError):
    """An operation needs a patched model."""


class StateMismatchError(TTAdaptError, ValueError):
    """A router state does not fit the model it is used with."""


class StateFileError(TTAdaptError, ValueError):
    """A router-state file is corrupted or not a ttadapt file."""
