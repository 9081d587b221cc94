"""Fixtures for the eval harness tests: a tiny random OLMoE with a BPE tokenizer, local JSONL tasks,
and the trained tiny-olmoe from ``/work/shared`` when that directory exists."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TINY_OLMOE = SHARED / "models" / "tiny-olmoe"

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def square(x):\n    return x * x\n",
    "Question: What is 2 + 3?\nAnswer: 2 + 3 = 5. The answer is 5.",
    "Problem:\nCompute 1/2 + 1/4.\n\nSolution: The sum is $\\boxed{\\frac{3}{4}}$.",
    "Question: Which is a fruit?\nAnswer: apple",
    "assert add(1, 2) == 3\nassert square(3) == 9\n",
]

CODE_ROWS = [
    {
        "id": "c0",
        "kind": "code",
        "prompt": 'def add(a, b):\n    """Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n',
        "reference": "    return a + b\n",
        "tests": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n",
        "entry_point": "add",
        "prompt_in_program": True,
    },
    {
        "id": "c1",
        "kind": "code",
        "prompt": "Write a function square(x) returning x squared.",
        "reference": "def square(x):\n    return x * x\n",
        "tests": "assert square(3) == 9\nassert square(-2) == 4",
        "visible_tests": ["assert square(3) == 9"],
    },
    {
        "id": "c2",
        "kind": "code",
        "prompt": 'def neg(x):\n    """Negate x."""\n',
        "reference": "    return -x\n",
        "tests": "def check(f):\n    assert f(2) == -2\n",
        "entry_point": "neg",
        "prompt_in_program": True,
    },
]
MATH_ROWS = [
    {
        "id": "m0",
        "kind": "math",
        "prompt": "What is 2 + 3?",
        "answer": "5",
        "reference": "2 + 3 = 5. The answer is 5.",
    },
    {
        "id": "m1",
        "kind": "math",
        "prompt": "What is 10 / 4?",
        "answer": "\\frac{5}{2}",
        "reference": "10 / 4 = 2.5. The answer is 2.5.",
    },
    {
        "id": "m2",
        "kind": "math",
        "prompt": "What is 7 * 6?",
        "answer": "42",
        "reference": "7 * 6 = 42. The answer is 42.",
    },
    {
        "id": "m3",
        "kind": "math",
        "prompt": "What is 9 - 4?",
        "answer": "5",
        "reference": "9 - 4 = 5. The answer is 5.",
    },
    {
        "id": "t0",
        "kind": "math",
        "prompt": "What is 1 + 1?",
        "answer": "2",
        "reference": "1 + 1 = 2. The answer is 2.",
        "split": "train",
    },
]
MC_ROWS = [
    {"id": "q0", "kind": "mc", "prompt": "Which is a fruit?", "choices": ["apple", "car", "stone"], "gold": 0},
    {"id": "q1", "kind": "mc", "prompt": "Which is a number?", "choices": ["blue", "seven"], "gold": 1},
    {"id": "q2", "kind": "mc", "prompt": "Which is a colour?", "choices": ["red", "dog", "cup", "pen"], "gold": 0},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """One torch thread: much faster than two on a shared 2-core machine, and deterministic."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 4-expert random OLMoE plus a 300-token byte-level BPE, saved as a local model dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = OlmoeForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_random_olmoe")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_random(tiny_random_dir: Path) -> tuple[Any, Any]:
    from ttadapt.eval.runner import load_model

    return load_model(tiny_random_dir)


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Task names (``jsonl:PATH``) of three small local tasks, one per kind."""
    d = tmp_path_factory.mktemp("tasks")
    return {
        "code": "jsonl:" + str(write_jsonl(d / "code.jsonl", CODE_ROWS)),
        "math": "jsonl:" + str(write_jsonl(d / "math.jsonl", MATH_ROWS)),
        "mc": "jsonl:" + str(write_jsonl(d / "mc.jsonl", MC_ROWS)),
    }


@pytest.fixture(scope="session")
def tiny_olmoe() -> tuple[Any, Any]:
    """The trained tiny-olmoe (skips when /work/shared is absent)."""
    if not TINY_OLMOE.is_dir():
        pytest.skip(f"{TINY_OLMOE} not present (needs the shared project directory)")
    from ttadapt.eval.runner import load_model

    return load_model(TINY_OLMOE)


@pytest.fixture
def core() -> Any:
    """The ttadapt core module; skips until it exposes ``ttadapt.generate`` and ``RerouteConfig``."""
    ttadapt = pytest.importorskip("ttadapt")
    if not hasattr(ttadapt, "generate") or not hasattr(ttadapt, "RerouteConfig"):
        pytest.skip("ttadapt.generate / RerouteConfig not available yet (core library not landed)")
    return ttadapt
