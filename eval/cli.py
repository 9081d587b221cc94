"""Command line for ``ttadapt eval``: run evaluations, rebuild reports, compare runs.

ttadapt eval --model PATH --task humaneval --method reroute --limit N --seed S --out DIR
ttadapt eval --model PATH --task gsm8k,mbpp --method base,icl5,sc8 --out DIR
ttadapt eval --model PATH --task humaneval --method base,sc8,reroute --backend vllm --device cuda --out DIR
ttadapt eval report DIR
ttadapt eval compare DIR1 DIR2 [--method-a base --method-b reroute]
ttadapt eval tasks
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import BACKENDS, METHODS, TRAINERS, VLLMOptions, parse_method
from .sandbox import SandboxLimits


def _kv(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value when it parses (``steps=0``, ``interval=null``), else the string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ttadapt eval", description="Evaluate base / reroute / icl / sc / reroute+sc on offline benchmarks."
    )
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument(
        "--task",
        required=True,
        help="comma list of: humaneval, mbpp, gsm8k, math500, mmlu, arc_challenge, arc_easy, jsonl:PATH",
    )
    p.add_argument(
        "--method",
        default="base",
        help=f"comma list of {', '.join(METHODS)}; counts allowed: icl3, icl5, sc8, reroute+sc8",
    )
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_out", help="output directory (runs are resumed when it already holds them)")
    p.add_argument("--label", default="", help="run name in reports (default derived from the method)")
    p.add_argument("--shots", type=int, default=None, help="ICL shots (icl default 5; any method may add shots)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt for sc methods (default 8)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--reroute-preset", default="paper", help="ttadapt.RerouteConfig preset: paper, fast, default")
    p.add_argument(
        "--reroute-config", type=Path, default=None, help="JSON file of RerouteConfig fields overriding the preset"
    )
    p.add_argument(
        "--reroute-set",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one RerouteConfig field, e.g. steps=0",
    )
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--mc-mode", choices=("loglik", "generate"), default="loglik")
    p.add_argument("--mc-norm", choices=("mean", "sum"), default="mean")
    p.add_argument("--pass-k", type=_ints, default=(1, 5, 10), help="k values for pass@k / maj@k (default 1,5,10)")
    p.add_argument("--no-nll", action="store_true", help="skip the reference-solution NLL")
    p.add_argument("--no-routing", action="store_true", help="skip expert-usage recording")
    p.add_argument("--keep-trailing-newline", action="store_true", help="do not cut a prompt's trailing newline")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per executed program")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per executed program")
    p.add_argument("--workers", type=int, default=1, help="programs executed in parallel")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument(
        "--backend", choices=BACKENDS, default="hf", help="generate with transformers (hf) or a vLLM engine (vllm)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context limit for prompts and the vLLM engine")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="examples generated per call, left-padded (default 1); with --backend hf part of the run identity",
    )
    v = p.add_argument_group("vLLM backend (--backend vllm)")
    v.add_argument("--trainer", choices=TRAINERS, default="hf", help="reroute trainer: HF gradient steps or search")
    v.add_argument(
        "--search-set",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one ttadapt.vllm.SearchConfig field for --trainer search, e.g. rounds=2",
    )
    v.add_argument("--gpu-memory-utilization", type=float, default=None, help="the engine's share of GPU memory")
    v.add_argument(
        "--vllm-arg",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further vllm.LLM argument (JSON value), e.g. tensor_parallel_size=2",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def _run(argv: Sequence[str]) -> int:
    args = run_parser().parse_args(list(argv))
    from .runner import load_model, run_eval

    overrides: dict[str, Any] = {}
    if args.reroute_config is not None:
        overrides.update(json.loads(args.reroute_config.read_text(encoding="utf-8")))
    overrides.update(dict(args.reroute_set))
    methods = [m for m in args.method.split(",") if m.strip()]
    tasks = [t for t in args.task.split(",") if t.strip()]
    if args.label and len(methods) > 1:
        raise SystemExit("--label names one run: give a single --method with it")
    specs = []
    for m in methods:
        fields: dict[str, Any] = {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "label": args.label,
            "reroute_preset": args.reroute_preset,
        }
        if args.shots is not None:
            fields["shots"] = args.shots
        if args.samples is not None and m.startswith(("sc", "reroute+sc")):
            fields["samples"] = args.samples
        if m.startswith("reroute"):
            fields["reroute_overrides"] = overrides
        specs.append(parse_method(m, **fields))
    sandbox = SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb, workers=args.workers)
    options = _vllm_options(args)
    if args.batch_size < 1:  # before loading the model (EvalConfig checks it too)
        raise ValueError(f"--batch-size must be >= 1 (examples per generation call), got {args.batch_size}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from .vllm_backend import build_engine, require_vllm

    if args.backend == "vllm":
        require_vllm()  # before loading the HF model: fail fast
    model, tok = load_model(args.model, args.dtype, args.device)
    llm = None
    if args.backend == "vllm":
        llm = build_engine(
            args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len, options=options
        )
    for t in tasks:
        for spec in specs:
            run_eval(
                args.model,
                t,
                spec,
                args.limit,
                args.seed,
                args.out,
                model=model,
                tokenizer=tok,
                llm=llm,
                progress=not args.no_progress,
                max_new_tokens=args.max_new_tokens,
                mc_mode=args.mc_mode,
                mc_norm=args.mc_norm,
                pass_ks=args.pass_k,
                nll=not args.no_nll,
                routing=not args.no_routing,
                strip_trailing_newline=not args.keep_trailing_newline,
                sandbox=sandbox,
                dtype=args.dtype,
                device=args.device,
                backend=args.backend,
                batch_size=args.batch_size,
                max_model_len=args.max_model_len,
                vllm=options,
                write_root_report=False,
            )
    from .report import markdown_report, write_reports

    print(markdown_report(write_reports(args.out)["runs"]), end="")
    return 0


def _vllm_options(args: argparse.Namespace) -> VLLMOptions:
    """The vLLM backend's options from the CLI; an error before any model loads when they come without it."""
    options = VLLMOptions(
        trainer=args.trainer,
        search=dict(args.search_set),
        gpu_memory_utilization=args.gpu_memory_utilization,
        engine_args=dict(args.vllm_arg),
    )
    if args.backend != "vllm" and options != VLLMOptions():
        raise ValueError(
            "--trainer, --search-set, --gpu-memory-utilization and --vllm-arg need --backend vllm"
        )
    return options


def _compare(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ttadapt eval compare", description="Paired differences between two eval output directories (B - A)."
    )
    p.add_argument("dir_a", type=Path)
    p.add_argument("dir_b", type=Path)
    p.add_argument("--method-a", default=None, help="method label to take from DIR_A")
    p.add_argument("--method-b", default=None, help="method label to take from DIR_B")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(list(argv))
    from .compare import compare_dirs, format_comparisons

    comps = compare_dirs(args.dir_a, args.dir_b, args.method_a, args.method_b)
    if args.json:
        print(json.dumps([c.to_dict() for c in comps], indent=2, sort_keys=True))
    else:
        print(format_comparisons(comps), end="")
    return 0


def _report(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ttadapt eval report", description="Rebuild report.json, report.md and plots of an eval directory."
    )
    p.add_argument("dir", type=Path)
    args = p.parse_args(list(argv))
    from .report import markdown_report, write_reports

    rep = write_reports(args.dir)
    print(markdown_report(rep["runs"]), end="")
    return 0


def _tasks(argv: Sequence[str]) -> int:
    from .datasets import LOCAL_SCHEMA, task_names

    print("built-in tasks: " + ", ".join(task_names()))
    print("local tasks: jsonl:PATH with\n" + LOCAL_SCHEMA)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry for ``ttadapt eval`` (``argv`` excludes the ``eval`` word itself)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sub = {"compare": _compare, "report": _report, "tasks": _tasks}
    try:
        if argv and argv[0] in sub:
            return sub[argv[0]](argv[1:])
        return _run(argv)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"ttadapt eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
