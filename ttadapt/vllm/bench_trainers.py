"""Compare the two trainers on the same contexts: HF gradient presets vs the in-engine search.

``python -m ttadapt.vllm.bench_trainers`` (vLLM + transformers needed) adapts on the first
``--context`` tokens of shipped demo snippets and reports, per trainer, the context NLL (all its
targets) and the NLL of the next ``--continuation`` tokens under the adapted state, both scored by vLLM
(:func:`ttadapt.vllm.context_nll`), plus the wall time of one adaptation. The numbers in
``docs/vllm.md`` ("Gradient-free adaptation") come from the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SNIPPETS = ("kjv-genesis-1", "shakespeare-sonnets", "code-1", "prose-1")
SEARCHES: dict[str, dict[str, Any]] = {
    "search-8x4": {},
    "search-16x4": {"candidates": 16},
    "search-8x4-noguard": {"guard": False},
}


def vllm_ready_copy(src: Path, dst: Path) -> Path:
    """Copy a tied-embedding checkpoint with an explicit ``lm_head.weight`` (vLLM 0.32's OLMoE ignores
    ``tie_word_embeddings``; see docs/vllm.md, known quirks)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    with safe_open(str(dst / index["weight_map"]["model.embed_tokens.weight"]), framework="pt") as fh:
        emb = fh.get_tensor("model.embed_tokens.weight")
    save_file({"lm_head.weight": emb.clone()}, str(dst / "model-lm-head.safetensors"), metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = "model-lm-head.safetensors"
    index_path.write_text(json.dumps(index, indent=2))
    return dst


def run(
    model: str, snippets: Sequence[str], context: int, continuation: int, presets: Sequence[str]
) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ttadapt
    from ttadapt.demo import demo_snippets
    from ttadapt.vllm import context_nll, encode_state, make_llm, search_adapt

    tok = AutoTokenizer.from_pretrained(model)
    llm = make_llm(model, dtype="float32", max_model_len=context + continuation + 8, max_num_seqs=16, seed=0,
                   enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    texts = {s["id"]: s["text"] for s in demo_snippets()}
    def score(ids: list[int], state: Any) -> tuple[float, float]:
        """(mean NLL of the context's targets, mean NLL of the continuation) under ``state``."""
        pay = None if state is None else encode_state(state)
        a, b = context_nll(llm, [ids[:context], ids], [pay, pay])
        return float(a.mean()), float(b[context - 1 :].mean())

    rows = []
    for name in snippets:
        ids = ([0] + list(tok(texts[name])["input_ids"]))[: context + continuation]
        ctx = ids[:context]
        row: dict[str, Any] = {"snippet": name, "base": score(ids, None)}
        for preset in presets:
            t = time.perf_counter()
            state = ttadapt.Rerouter(hf, ttadapt.RerouteConfig.preset(preset)).adapt(torch.tensor([ctx]))
            row[f"hf-{preset}"] = (*score(ids, state), round(time.perf_counter() - t, 2))
        for label, kw in SEARCHES.items():
            t = time.perf_counter()
            state, trace = search_adapt(llm, ctx, return_trace=True, **kw)
            row[label] = (*score(ids, state), round(time.perf_counter() - t, 2), trace.kept)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: context NLL (change vs base) / next-tokens NLL per trainer."""
    keys = [k for k in rows[0] if k not in ("snippet", "base")]
    out = ["| snippet | base ctx / next | " + " | ".join(keys) + " |", "|---" * (2 + len(keys)) + "|"]
    for r in rows:
        b = r["base"]
        cells = [f"{r[k][0]:.3f} ({100 * (r[k][0] / b[0] - 1):+.1f}%) / {r[k][1]:.3f}" for k in keys]
        out.append(f"| {r['snippet']} | {b[0]:.3f} / {b[1]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", help="checkpoint served by vLLM and loaded by transformers (default: the embedded tiny OLMoE)"
    )
    ap.add_argument("--snippets", default=",".join(SNIPPETS))
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--presets", default="default,paper")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="ttadapt-bench-") as tmp:
        model = args.model
        if model is None:
            from ttadapt.demo import embedded_model_path

            model = str(vllm_ready_copy(embedded_model_path(), Path(tmp)))
        rows = run(model, args.snippets.split(","), args.context, args.continuation, args.presets.split(","))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
