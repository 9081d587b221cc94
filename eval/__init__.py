"""ttadapt.eval: offline benchmark harness (datasets, sandboxed scoring, methods, runner, reports).

Imports are lazy: ``import ttadapt.eval`` loads nothing heavy. Use the submodules directly, e.g.
``from ttadapt.eval.runner import run_eval`` or the CLI entry ``ttadapt.eval.cli.main(argv)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main", "run_eval"]


def run_eval(*args: Any, **kwargs: Any) -> Any:
    """Run one (task, method) evaluation; see :func:`ttadapt.eval.runner.run_eval`."""
    from .runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """CLI entry for ``ttadapt eval ...``; see :func:`ttadapt.eval.cli.main`."""
    from .cli import main as _main

    return _main(argv)
