"""The ``ttadapt`` command: demo, generate, patches, eval, heldout, bench, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_patches(args: argparse.Namespace) -> int:
    from ttadapt.patches import registered_specs

    specs = registered_specs()
    print(f"{'model_type':<20} {'router (per decoder layer)':<28} {'style':<14} {'scoring':<8} bias affects (options)")
    for name in sorted(specs):
        s = specs[name]
        opts = ", ".join(s.selection_options)
        since = f"  [transformers >= {s.min_transformers}]" if s.min_transformers else ""
        print(f"{name:<20} {s.router_attr:<28} {s.style:<14} {s.scoring:<8} {s.bias_affects} ({opts}){since}")
    print(f"\n{len(specs)} model types. 'selection+weights': the bias enters the router scores (changes which "
          "experts are picked and their weights; delta gets a gradient). 'selection': it moves only the choice. "
          "Hand-written styles are checked against the installed transformers when a model is patched.")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ttadapt.demo import main

    return main(args.preset)


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ttadapt.config import RerouteConfig
    from ttadapt.demo import embedded_model_path, load_model
    from ttadapt.generation import generate

    model, tok = load_model(args.model or embedded_model_path())
    cfg = RerouteConfig.preset(args.preset)
    if args.config:
        cfg = cfg.replace(**json.loads(args.config))
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if args.bos and tok.bos_token_id is not None:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    torch.manual_seed(args.seed)
    out, trace = generate(
        model, ids, reroute=cfg, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature if args.sample else None, return_trace=True,
    )
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print("\n--- ttadapt trace (" + cfg.name + ") ---", file=sys.stderr)
    print(trace.format(), file=sys.stderr)
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        print(f"ttadapt: {module} is unavailable ({exc}); install the extra: pip install 'ttadapt[eval]'", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttadapt", description="Test-time rerouting for MoE language models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="base vs rerouted held-out NLL on the embedded trained tiny OLMoE")
    d.add_argument("--preset", default="default", help="default | paper | fast")
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser("generate", help="generate with online rerouting and print a compact trace")
    g.add_argument("--model", help="local checkpoint folder (default: the embedded tiny OLMoE)")
    g.add_argument("--prompt", help="prompt text (default: read stdin)")
    g.add_argument("--preset", default="default", help="default | paper | fast")
    g.add_argument("--config", help='JSON of RerouteConfig overrides, e.g. \'{"interval": 64}\'')
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="prepend the BOS token")
    g.set_defaults(func=_cmd_generate)

    pt = sub.add_parser("patches", help="list supported model types and what the router bias affects")
    pt.set_defaults(func=_cmd_patches)

    for name, (module, help_) in _DELEGATES.items():
        e = sub.add_parser(name, help=help_, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
        e.set_defaults(func=lambda a, m=module: _delegate(m, a.rest))
    return p


_DELEGATES = {
    "eval": ("ttadapt.eval.cli", "benchmarks: base / reroute / icl / sc / reroute+sc (see eval/README.md)"),
    "heldout": ("ttadapt.eval.heldout", "held-out continuation NLL per domain, base vs presets"),
    "bench": ("ttadapt.eval.bench.cli", "speed and memory: plain generate vs presets (eval/bench/README.md)"),
    "serve": ("ttadapt.vllm.serve", "vLLM OpenAI server with per-request router states, rerouting (docs/vllm.md)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATES:
        return _delegate(_DELEGATES[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
