"""HF backend batching (``batch_size``): batched runs equal unbatched ones, resume exactly, reject bad sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ttadapt.eval.cli import main
from ttadapt.eval.config import EvalConfig, MethodSpec
from ttadapt.eval.runner import ResumeMismatchError, batches, run_dir_for, run_eval

REROUTE = MethodSpec(
    "reroute", reroute_overrides={"steps": 2, "interval": 3, "guard": False, "min_tokens": 1, "lr": 0.5}
)


def _records(out: Path, task: str, label: str) -> list[dict[str, Any]]:
    name = "jsonl:" + Path(task.removeprefix("jsonl:")).stem
    path = run_dir_for(out, name, label) / "records.jsonl"
    recs = sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda r: r["index"])
    for r in recs:
        r.pop("timings")
        for part in (r["trace"] or {}).values():
            for key in ("adapt_time", "decode_time"):
                (part or {}).pop(key, None)
    return recs


def _kw(model: tuple[Any, Any], **extra: Any) -> dict[str, Any]:
    return dict(model=model[0], tokenizer=model[1], progress=False, write_root_report=False, **extra)


def test_greedy_batches_equal_one_prompt_at_a_time(
    core: Any, tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    task = local_tasks["mc"]  # 3 prompts of different lengths in one left-padded call
    for spec in (MethodSpec("base"), REROUTE):
        for bs in (1, 3):
            kw = _kw(tiny_random, batch_size=bs, max_new_tokens=10, mc_mode="generate")
            run_eval(str(tiny_random_dir), task, spec, None, 0, tmp_path / str(bs), **kw)
        one, three = _records(tmp_path / "1", task, spec.label), _records(tmp_path / "3", task, spec.label)
        assert [r["outputs"] for r in three] == [r["outputs"] for r in one]
        assert [r["new_tokens"] for r in three] == [r["new_tokens"] for r in one]
        # one row hit a stop string while the others went on (past a chunk boundary with reroute):
        # neither the padding nor the token decoded after the boundary reaches its record
        assert sorted(n for r in three for n in r["new_tokens"]) == [7, 10, 10]
        if spec.rerouting:
            # every prompt is adapted alone, so NLL and routing do not depend on the batch
            for key in ("ref_nll", "routing", "scores"):
                assert [r[key] for r in three] == [r[key] for r in one]
            assert [r["trace"]["prefill_adapt"] for r in three] == [r["trace"]["prefill_adapt"] for r in one]
            assert all(r["trace"]["generate"]["batch_examples"] == 3 for r in three)
            assert all(r["trace"]["generate"]["adapted_rounds"] > 1 for r in three)  # re-adapted mid-generation
        else:
            assert three == one


def test_sampling_seeds_do_not_depend_on_batch_mates(
    core: Any, tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    task = local_tasks["math"]
    sc, rsc = MethodSpec("sc", samples=3), MethodSpec("reroute+sc", samples=3, reroute_overrides={"steps": 0})
    run_eval(str(tiny_random_dir), task, sc, None, 7, tmp_path / "1", max_new_tokens=12, **_kw(tiny_random))
    for spec in (sc, rsc):
        kw = _kw(tiny_random, batch_size=3, max_new_tokens=12)
        run_eval(str(tiny_random_dir), task, spec, None, 7, tmp_path / "3", **kw)
    alone = [r["outputs"] for r in _records(tmp_path / "1", task, sc.label)]
    assert [r["outputs"] for r in _records(tmp_path / "3", task, sc.label)] == alone
    assert [r["outputs"] for r in _records(tmp_path / "3", task, rsc.label)] == alone
    assert any(len(set(o)) > 1 for o in alone)  # the samples differ: the equalities are not vacuous


def test_resumed_batched_run_reproduces_report_bytes(
    core: Any, tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    task = local_tasks["math"]
    kw = _kw(tiny_random, batch_size=3, max_new_tokens=8)
    full, part = tmp_path / "full", tmp_path / "part"
    for spec in (MethodSpec("sc", samples=2), REROUTE):
        run_eval(str(tiny_random_dir), task, spec, None, 0, full, **kw)
        # interrupted inside the first call of 3: the resume generates that call whole again
        run_eval(str(tiny_random_dir), task, spec, None, 0, part, stop_after=2, **kw)
        assert len(_records(part, task, spec.label)) == 2
        run_eval(str(tiny_random_dir), task, spec, None, 0, part, **kw)
        a, b = (run_dir_for(d, "jsonl:math", spec.label) / "report.json" for d in (full, part))
        assert a.read_bytes() == b.read_bytes()
        assert _records(part, task, spec.label) == _records(full, task, spec.label)
    # with the HF backend the batch size is part of the run identity
    with pytest.raises(ResumeMismatchError, match=r"config\.batch_size"):
        run_eval(str(tiny_random_dir), task, REROUTE, None, 0, part, **dict(kw, batch_size=2))


def test_fixed_groups_and_bad_batch_sizes(
    tmp_path: Path, tiny_random_dir: Path, local_tasks: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    every = [(i, f"x{i}") for i in range(5)]
    todo = [every[1], every[4]]
    assert list(batches(every, todo, 2, fixed=True)) == [(every[0:2], {1}), (every[4:5], {4})]
    assert list(batches(every, todo, 2, fixed=False)) == [(todo, {1, 4})]
    assert EvalConfig(task="t", batch_size=4).identity()["batch_size"] == 4
    assert "batch_size" not in EvalConfig(task="t").identity()  # older run.json files still match
    assert "batch_size" not in EvalConfig(task="t", backend="vllm", batch_size=4).identity()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            EvalConfig(task="t", batch_size=bad)
    argv = ["--model", str(tiny_random_dir), "--task", local_tasks["code"], "--out", str(tmp_path)]
    assert main([*argv, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
