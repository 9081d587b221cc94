"""vLLM methods of ``ttadapt bench time``: vanilla vLLM vs ``ttadapt.vllm.generate``, one engine, one process.

``vllm`` is plain ``llm.generate``; ``vllm-<preset>`` adapts with the HF trainer (gradient rounds on
the HF copy of the model, vLLM decoding in ``interval`` chunks, each chunk re-prefilled under its
vector); ``vllm-search`` with the in-engine gradient-free search (``trainer="search"``). All decode
greedily exactly ``new`` tokens. Their ``adapt`` phase is the trainers' time; ``decode`` the rest.
Random-weight shapes (``--model olmoe-1b-7b``) start the engine with ``load_format="dummy"``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

VLLM_METHODS = ("vllm", "vllm-paper", "vllm-fast", "vllm-default", "vllm-search")


def is_vllm(method: str) -> bool:
    return method.split(":", 1)[0] in VLLM_METHODS


class _TimedTrainer:
    """A chunk trainer that adds the seconds of its ``adapt`` calls to ``seconds``."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    @property
    def adapts(self) -> bool:
        return bool(self.inner.adapts)

    def adapt(self, jobs: Sequence[Any]) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return self.inner.adapt(jobs)
        finally:
            self.seconds += time.perf_counter() - t0

    def fork(self, src: int, dst: int) -> None:
        self.inner.fork(src, dst)


def build_engine(model_name: str, hf_model: Any, *, max_len: int, dtype: str, tmp: Path) -> Any:
    """A vLLM engine for the bench's model: the embedded/local checkpoint, or dummy weights at a SHAPES config."""
    from ttadapt.vllm import make_llm
    from ttadapt.vllm.bench_trainers import vllm_ready_copy

    from .models import SHAPES

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    kw: dict[str, Any] = dict(dtype=dtype, max_model_len=max_len, seed=0, max_num_seqs=16)
    if model_name in SHAPES:
        hf_model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["architectures"] = ["OlmoeForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg))
        kw.update(load_format="dummy", skip_tokenizer_init=True)
        path = tmp
    else:
        from ttadapt.demo import embedded_model_path

        src = Path(embedded_model_path() if model_name == "embedded" else model_name)
        path = vllm_ready_copy(src, tmp) if (src / "model.safetensors.index.json").exists() else src
    return make_llm(str(path), **kw)


def runner(llm: Any, hf_model: Any, method: str, cfg: Any, ids: list[int], new: int) -> Callable[[], Any]:
    """A zero-argument run of ``method`` returning ``(output, phases)``."""
    from vllm import SamplingParams

    from ttadapt.vllm.generation import generate, make_trainer

    if method.split(":", 1)[0] == "vllm":
        params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0)

        def plain() -> Any:
            t0 = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            return out, {"decode": time.perf_counter() - t0}

        return plain
    search = method.split(":", 1)[0] == "vllm-search"

    def adapted() -> Any:
        trainer = _TimedTrainer(make_trainer(
            "search" if search else "hf", llm=llm, hf_model=None if search else hf_model, reroute=cfg, search=None,
        ))
        t0 = time.perf_counter()
        out = generate(llm, [ids], reroute=cfg, trainer=trainer, max_tokens=new,
                          sampling={"temperature": 0.0, "min_tokens": new}, keep_states=False)
        total = time.perf_counter() - t0
        return out, {"adapt": trainer.seconds, "decode": total - trainer.seconds}

    return adapted


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="ttadapt-bench-vllm-")
