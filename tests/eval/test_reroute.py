"""Reroute methods through the core API (skipped until ``ttadapt.generate`` exists)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttadapt.eval.config import MethodSpec
from ttadapt.eval.runner import run_dir_for, run_eval


def _records(out: Path, task: str, label: str) -> list[dict[str, Any]]:
    path = run_dir_for(out, task, label) / "records.jsonl"
    return sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda r: r["index"])


def test_reroute_sc_with_zero_steps_equals_sc(
    core: Any, tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    kw = dict(
        model=tiny_random[0], tokenizer=tiny_random[1], progress=False, max_new_tokens=12, write_root_report=False
    )
    for kind in ("math", "code"):
        task = local_tasks[kind]
        sc = MethodSpec("sc", samples=3)
        rsc = MethodSpec("reroute+sc", samples=3, reroute_overrides={"steps": 0})
        run_eval(str(tiny_random_dir), task, sc, None, 7, tmp_path, **kw)
        run_eval(str(tiny_random_dir), task, rsc, None, 7, tmp_path, **kw)
        name = "jsonl:" + Path(task.removeprefix("jsonl:")).stem
        a, b = _records(tmp_path, name, sc.label), _records(tmp_path, name, rsc.label)
        assert [r["outputs"] for r in a] == [r["outputs"] for r in b]
        assert [r["scores"] for r in a] == [r["scores"] for r in b]
        # the samples really differ from each other (otherwise the equality would be vacuous)
        assert any(len(set(r["outputs"])) > 1 for r in a)


def test_reroute_records_pair_nll_and_routing(
    core: Any, tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    kw = dict(model=tiny_random[0], tokenizer=tiny_random[1], progress=False, max_new_tokens=8)
    spec = MethodSpec("reroute", reroute_overrides={"steps": 3, "guard": False, "min_tokens": 1, "lr": 0.5})
    summary = run_eval(str(tiny_random_dir), local_tasks["math"], spec, None, 0, tmp_path, **kw)
    recs = _records(tmp_path, "jsonl:math", spec.label)
    top_k = tiny_random[0].config.num_experts_per_tok
    for r in recs:
        nll, routing = r["ref_nll"], r["routing"]
        assert set(nll) >= {"base", "rerouted", "tokens"}
        assert r["trace"]["generate"] is not None and r["trace"]["prefill_adapt"] is not None
        assert routing["layers"] == [0, 1]
        for table in (routing["base"], routing["rerouted"]):
            assert [sum(row) for row in table] == [routing["tokens"] * top_k] * 2
    assert any(r["ref_nll"]["rerouted"] != r["ref_nll"]["base"] for r in recs)
    assert summary["ref_nll"]["delta"]["n"] == len(recs) and summary["routing"]["shift"]
    plots = list((tmp_path / "plots").glob("routing_shift_jsonl_math_reroute*.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 1000


def test_reroute_with_zero_steps_keeps_base_nll(
    core: Any, tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    kw = dict(
        model=tiny_random[0], tokenizer=tiny_random[1], progress=False, max_new_tokens=4, write_root_report=False
    )
    spec = MethodSpec("reroute", reroute_overrides={"steps": 0})
    run_eval(str(tiny_random_dir), local_tasks["mc"], spec, None, 0, tmp_path, **kw)
    base = run_eval(str(tiny_random_dir), local_tasks["mc"], "base", None, 0, tmp_path, **kw)
    recs = _records(tmp_path, "jsonl:mc", spec.label)
    assert all(r["ref_nll"]["rerouted"] == r["ref_nll"]["base"] for r in recs)
    assert [r["details"]["logprob_sum"] for r in recs] == [
        r["details"]["logprob_sum"] for r in _records(tmp_path, "jsonl:mc", "base")
    ]
    assert base["n"] == 3
