"""The eval harness's vLLM backend (``backend="vllm"``) on the tiny OLMoE: one in-process engine for the module.

Checks it against the HF backend (greedy outputs), ``sc`` (``reroute+sc`` with 0 steps), itself
(a resumed run) and the run identity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from ttadapt.eval.config import MethodSpec, VLLMOptions  # noqa: E402
from ttadapt.eval.runner import ResumeMismatchError, load_model, run_dir_for, run_eval  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_LEN = 256  # the engine's max_model_len (conftest.engine)

CODE_ROWS = [
    ("c0", "def add(a, b):", "Return the sum of a and b.", "    return a + b\n", "assert f(1, 2) == 3"),
    (
        "c1",
        "def fibonacci(n):",
        "Return the n-th Fibonacci number.",
        "    return n if n < 2 else f(n - 1) + f(n - 2)\n",
        "assert f(10) == 55",
    ),
    (
        "c2",
        "import os\n\n\ndef list_files(path):",
        "List the files in a directory.",
        "    return os.listdir(path)\n",
        "assert f('.') is not None",
    ),
    ("c3", "def is_even(n):", "Return True if n is even.", "    return n % 2 == 0\n", "assert f(2)"),
]
MC_ROWS = [
    {
        "id": "q0",
        "kind": "mc",
        "prompt": "Which command lists the files in a directory?",
        "choices": ["ls", "cd", "rm"],
        "gold": 0,
    },
    {
        "id": "q1",
        "kind": "mc",
        "prompt": "Which keyword defines a function in Python?",
        "choices": ["class", "def", "import"],
        "gold": 1,
    },
    {
        "id": "q2",
        "kind": "mc",
        "prompt": "Which git command records changes?",
        "choices": ["commit", "clone", "log"],
        "gold": 0,
    },
]


@pytest.fixture(scope="module")
def hf(vt: Any) -> tuple[Any, Any]:
    return load_model(vt.model_path())


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("eval_tasks")
    code = [
        {
            "id": i,
            "kind": "code",
            "prompt": f'{head}\n    """{doc}"""\n',
            "reference": ref,
            "tests": f"def check(f):\n    {test}\n",
            "entry_point": head.split("def ")[1].split("(")[0],
            "prompt_in_program": True,
        }
        for i, head, doc, ref, test in CODE_ROWS
    ]
    out = {}
    for name, rows in (("code", code), ("mc", MC_ROWS)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out[name] = f"jsonl:{d / name}.jsonl"
    return out


def _run(vt: Any, hf: tuple[Any, Any], task: str, method: str | MethodSpec, out: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("max_new_tokens", 16)
    return run_eval(
        vt.model_path(),
        task,
        method,
        kw.pop("limit", None),
        kw.pop("seed", 0),
        out,
        model=hf[0],
        tokenizer=hf[1],
        progress=False,
        write_root_report=False,
        max_model_len=MAX_LEN,
        **kw,
    )


RESULT_KEYS = ("id", "prompt", "outputs", "new_tokens", "scores", "ref_nll", "routing", "trace")


def _records(out: Path, task: str, label: str) -> list[dict[str, Any]]:
    """A run's records without timings and sandbox stderr (it names a temporary directory)."""
    name = "jsonl:" + Path(task.removeprefix("jsonl:")).stem
    recs = [json.loads(x) for x in (run_dir_for(out, name, label) / "records.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in RESULT_KEYS} for r in sorted(recs, key=lambda r: r["index"])]


def test_base_greedy_equals_hf_backend(
    vt: Any, hf: tuple[Any, Any], llm: Any, tasks: dict[str, str], tmp_path: Path
) -> None:
    for kind, kw in (("code", {"max_new_tokens": 24}), ("mc", {"mc_mode": "generate"})):
        _run(vt, hf, tasks[kind], "base", tmp_path / "hf", **kw)
        # 4 code items in vLLM batches of 3 and 1
        _run(vt, hf, tasks[kind], "base", tmp_path / "vllm", llm=llm, backend="vllm", batch_size=3, **kw)
        a, b = _records(tmp_path / "hf", tasks[kind], "base"), _records(tmp_path / "vllm", tasks[kind], "base")
        assert len(a) == len(b) > 2
        assert a == b  # outputs, new-token counts, scores, reference NLL
    # The MC outputs start with newlines, where vLLM stops at "\n" and the HF rule does not: the
    # backend continued them, so this comparison covers its stop handling.
    mc = _records(tmp_path / "vllm", tasks["mc"], "base")
    assert any(o.startswith("\n") and o.strip() for r in mc for o in r["outputs"])


def test_reroute_equals_hf_backend(
    vt: Any, hf: tuple[Any, Any], llm: Any, tasks: dict[str, str], tmp_path: Path
) -> None:
    over = {"steps": 2, "lr": 0.5, "guard": False, "min_tokens": 1, "interval": 6}
    spec = MethodSpec("reroute", reroute_overrides=over)
    _run(vt, hf, tasks["code"], spec, tmp_path / "hf", limit=2)
    _run(vt, hf, tasks["code"], spec, tmp_path / "vllm", limit=2, llm=llm, backend="vllm")
    a, b = _records(tmp_path / "hf", tasks["code"], spec.label), _records(tmp_path / "vllm", tasks["code"], spec.label)
    # Same outputs (ttadapt.generate vs chunked ttadapt.vllm.generate); the state vLLM's first chunk ran
    # under is the one the HF backend adapts for the NLL: same reference NLL and routing counts.
    for key in ("outputs", "new_tokens", "ref_nll", "routing"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert all(r["ref_nll"]["rerouted"] != r["ref_nll"]["base"] for r in b)
    assert all(r["trace"]["generate"]["chunks"] == [3] for r in b)  # 16 tokens in chunks of 6
    for x, y in zip(a, b):
        want = x["trace"]["prefill_adapt"]["delta_mean_abs"]
        assert y["trace"]["prefill_adapt"]["delta_mean_abs"] == pytest.approx(want)
        # The HF trainer's per-round losses reach the record: same prefill fit loss, same last round's.
        assert y["trace"]["prefill_adapt"]["first_loss"] == pytest.approx(x["trace"]["prefill_adapt"]["first_loss"])
        assert y["trace"]["generate"]["adapted_rounds"] == 3
        assert y["trace"]["generate"]["last_loss"] == pytest.approx(x["trace"]["generate"]["last_loss"], rel=1e-4)


def test_reroute_sc_with_zero_steps_equals_sc(
    vt: Any, hf: tuple[Any, Any], llm: Any, tasks: dict[str, str], tmp_path: Path
) -> None:
    kw = dict(llm=llm, backend="vllm", batch_size=2, seed=7)
    sc = MethodSpec("sc", samples=3)
    rsc = MethodSpec("reroute+sc", samples=3, reroute_overrides={"steps": 0})
    _run(vt, hf, tasks["code"], sc, tmp_path, **kw)
    _run(vt, hf, tasks["code"], rsc, tmp_path, **kw)
    a, b = _records(tmp_path, tasks["code"], sc.label), _records(tmp_path, tasks["code"], rsc.label)
    assert [r["outputs"] for r in a] == [r["outputs"] for r in b]
    assert [r["new_tokens"] for r in a] == [r["new_tokens"] for r in b]
    assert [r["scores"] for r in a] == [r["scores"] for r in b]
    assert any(len(set(r["outputs"])) > 1 for r in a), "the samples are identical: the seed test is vacuous"
    for r in b:
        assert r["ref_nll"]["rerouted"] == r["ref_nll"]["base"]  # the unchanged prefill state scored the NLL
        assert r["trace"]["generate"]["trainer"] == "hf" and r["trace"]["generate"]["chunks"] == [1, 1, 1]


def test_resumed_run_reproduces_report_bytes(
    vt: Any, hf: tuple[Any, Any], llm: Any, tasks: dict[str, str], tmp_path: Path
) -> None:
    spec = MethodSpec(
        "reroute+sc",
        samples=2,
        reroute_overrides={"steps": 2, "interval": 6, "lr": 0.5, "guard": False, "min_tokens": 1},
    )
    kw = dict(llm=llm, backend="vllm", batch_size=2, max_new_tokens=14)
    _run(vt, hf, tasks["code"], spec, tmp_path / "full", **kw)
    _run(vt, hf, tasks["code"], spec, tmp_path / "part", stop_after=1, **kw)
    assert len(_records(tmp_path / "part", tasks["code"], spec.label)) == 1
    _run(vt, hf, tasks["code"], spec, tmp_path / "part", **kw)

    name = "jsonl:" + Path(tasks["code"].removeprefix("jsonl:")).stem
    full, part = (run_dir_for(tmp_path / d, name, spec.label) / "report.json" for d in ("full", "part"))
    assert part.read_bytes() == full.read_bytes()
    recs = _records(tmp_path / "part", tasks["code"], spec.label)
    assert recs == _records(tmp_path / "full", tasks["code"], spec.label)
    # not vacuous: the prompt state moved the NLL, and samples re-adapted between chunks
    assert any(r["ref_nll"]["rerouted"] != r["ref_nll"]["base"] for r in recs)
    assert all(r["trace"]["prefill_adapt"]["delta_mean_abs"] > 0 for r in recs)
    assert max(c for r in recs for c in r["trace"]["generate"]["chunks"]) > 1
    report = json.loads(full.read_text())
    assert report["n"] == 4 and report["adaptation"]["generate"]["mean_rounds"] > 1


def test_search_trainer_state_scores_the_nll(
    vt: Any, hf: tuple[Any, Any], llm: Any, tasks: dict[str, str], tmp_path: Path
) -> None:
    search = {"rounds": 2, "candidates": 4, "guard": False, "min_tokens": 1}
    opts = VLLMOptions(trainer="search", search=search)
    spec = MethodSpec("reroute", reroute_overrides={"interval": 8})
    _run(vt, hf, tasks["code"], spec, tmp_path, llm=llm, backend="vllm", vllm=opts, batch_size=2, limit=2,
         max_new_tokens=12)
    recs = _records(tmp_path, tasks["code"], spec.label)
    assert [r["trace"]["generate"]["trainer"] for r in recs] == ["search", "search"]
    assert all(r["trace"]["prefill_adapt"]["delta_mean_abs"] > 0 for r in recs)
    assert all(r["ref_nll"]["rerouted"] != r["ref_nll"]["base"] for r in recs)  # the engine's state, on the HF model


def test_run_identity_rejects_another_backend(
    vt: Any, hf: tuple[Any, Any], llm: Any, tasks: dict[str, str], tmp_path: Path
) -> None:
    _run(vt, hf, tasks["code"], "base", tmp_path / "hf", limit=1)
    _run(vt, hf, tasks["code"], "base", tmp_path / "vllm", limit=1, llm=llm, backend="vllm")
    with pytest.raises(ResumeMismatchError, match=r"settings \(config\.backend, config\.vllm\)"):
        _run(vt, hf, tasks["code"], "base", tmp_path / "hf", limit=2, llm=llm, backend="vllm")
    with pytest.raises(ResumeMismatchError, match=r"settings \(config\.backend, config\.vllm\)"):
        _run(vt, hf, tasks["code"], "base", tmp_path / "vllm", limit=2)
    # the batch size is throughput only: a resume may change it
    _run(
        vt,
        hf,
        tasks["code"],
        "base",
        tmp_path / "vllm",
        limit=2,
        llm=llm,
        backend="vllm",
        batch_size=2,
    )
    assert len(_records(tmp_path / "vllm", tasks["code"], "base")) == 2
