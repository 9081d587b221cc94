"""Runner: resumed runs reproduce report.json byte for byte, settings are guarded, compare and CLI work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ttadapt.eval.cli import main
from ttadapt.eval.compare import compare_dirs
from ttadapt.eval.config import EvalConfig, MethodSpec, parse_method
from ttadapt.eval.runner import ResumeMismatchError, run_dir_for, run_eval

RUNS = [("code", "base"), ("math", "sc3"), ("mc", "base"), ("math", "icl1")]


def _run_all(out: Path, model_dir: Path, model: tuple[Any, Any], tasks: dict[str, str], **kw: Any) -> None:
    for i, (kind, method) in enumerate(RUNS):
        run_eval(
            str(model_dir),
            tasks[kind],
            method,
            None,
            0,
            out,
            model=model[0],
            tokenizer=model[1],
            progress=False,
            max_new_tokens=10,
            write_root_report=i == len(RUNS) - 1,
            **kw,
        )


def test_resumed_run_reproduces_report_bytes(
    tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    _run_all(full, tiny_random_dir, tiny_random, local_tasks)
    # interrupted after one example per run, with a torn half-written line at the end of one file
    _run_all(part, tiny_random_dir, tiny_random, local_tasks, stop_after=1)
    rec = run_dir_for(part, "jsonl:math", "sc3") / "records.jsonl"
    first_line = rec.read_text(encoding="utf-8")
    assert first_line.count("\n") == 1
    with rec.open("a", encoding="utf-8") as fh:
        fh.write('{"id": "m1", "scores": {"corr')
    assert json.loads((part / "report.json").read_text())["runs"][0]["n"] == 1
    _run_all(part, tiny_random_dir, tiny_random, local_tasks)

    assert (part / "report.json").read_bytes() == (full / "report.json").read_bytes()
    for kind, method in RUNS:
        name = local_tasks[kind].split("/")[-1].removesuffix(".jsonl")
        a = run_dir_for(full, f"jsonl:{name}", parse_method(method).label)
        b = run_dir_for(part, f"jsonl:{name}", parse_method(method).label)
        assert (a / "report.json").read_bytes() == (b / "report.json").read_bytes()
    # the resumed file kept the first record as written, dropped the torn line, and added the rest
    text = rec.read_text(encoding="utf-8")
    assert text.startswith(first_line)
    ids = [json.loads(line)["id"] for line in text.splitlines()]  # every line parses: the torn one is gone
    assert sorted(ids) == ["m0", "m1", "m2", "m3"]

    report = json.loads((full / "report.json").read_text())
    assert "timings" not in json.dumps(report) and '_s"' not in json.dumps(report)
    runs = {(r["task"], r["method"]): r for r in report["runs"]}
    sc = runs[("jsonl:math", "sc3")]
    assert sc["n"] == 4 and sc["complete"] and "maj@3" in sc["metrics"] and "pass@1" in sc["metrics"]
    assert sc["ref_nll"]["base"]["n"] == 4
    recs = [json.loads(line) for line in text.splitlines()]
    assert all(len(r["outputs"]) == 3 and r["timings"]["total_s"] >= 0 for r in recs)
    icl = [json.loads(x) for x in (run_dir_for(full, "jsonl:math", "icl1") / "records.jsonl").read_text().splitlines()]
    assert all(r["shot_ids"] and r["id"] not in r["shot_ids"] for r in icl)
    assert (full / "report.md").read_text().count("| base |") >= 2
    assert (full / "plots" / "accuracy.png").stat().st_size > 1000

    comps = compare_dirs(full, part)
    assert len(comps) == 4
    assert all(c.mcnemar["only_a"] == c.mcnemar["only_b"] == 0 and c.acc_diff["value"] == 0 for c in comps)


def test_extending_the_limit_resumes(
    tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    kw = dict(model=tiny_random[0], tokenizer=tiny_random[1], progress=False, max_new_tokens=8)
    s2 = run_eval(str(tiny_random_dir), local_tasks["mc"], "base", 2, 0, tmp_path / "a", **kw)
    assert s2["n"] == 2
    s3 = run_eval(str(tiny_random_dir), local_tasks["mc"], "base", None, 0, tmp_path / "a", **kw)
    fresh = run_eval(str(tiny_random_dir), local_tasks["mc"], "base", None, 0, tmp_path / "b", **kw)
    assert s3 == fresh and s3["n"] == 3
    with pytest.raises(ResumeMismatchError, match="different settings"):
        run_eval(str(tiny_random_dir), local_tasks["mc"], "base", None, 0, tmp_path / "a", mc_norm="sum", **kw)
    with pytest.raises(ValueError, match="mc_mode='generate'"):
        run_eval(str(tiny_random_dir), local_tasks["mc"], "sc", None, 0, tmp_path / "c", **kw)
    gen = run_eval(str(tiny_random_dir), local_tasks["mc"], "sc3", None, 0, tmp_path / "c", mc_mode="generate", **kw)
    assert gen["n"] == 3 and "maj@3" in gen["metrics"] and "maj@1" in gen["metrics"]
    recs = [
        json.loads(x)
        for x in (run_dir_for(tmp_path / "c", "jsonl:mc", "sc3") / "records.jsonl").read_text().splitlines()
    ]
    assert all(len(r["details"]["extracted"]) == 3 for r in recs)


def test_cli_run_report_and_compare(
    tmp_path: Path, tiny_random_dir: Path, local_tasks: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    argv = [
        "--model",
        str(tiny_random_dir),
        "--task",
        f"{local_tasks['mc']},{local_tasks['code']}",
        "--method",
        "base,icl1",
        "--limit",
        "2",
        "--seed",
        "1",
        "--out",
        str(out),
        "--max-new-tokens",
        "6",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## Accuracy" in printed and "| icl1 |" in printed
    assert main(["compare", str(out), str(out), "--method-a", "base", "--method-b", "icl1"]) == 0
    table = capsys.readouterr().out
    assert table.count("| base | icl1 |") == 2
    assert main(["report", str(out)]) == 0
    assert main(["--model", str(tiny_random_dir), "--task", "nope", "--out", str(out)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["tasks"]) == 0


def test_method_and_config_validation() -> None:
    assert parse_method("icl3").shots == 3 and parse_method("icl").shots == 5
    assert parse_method("sc16").samples == 16 and parse_method("reroute+sc4").label == "reroute+sc4"
    assert MethodSpec("reroute+sc", samples=4, reroute_overrides={"steps": 0}).label == "reroute+sc4-steps=0"
    assert MethodSpec("base", shots=2).label == "base+icl2"
    for bad, msg in [("bogus", "unknown method"), ("base3", "takes no count")]:
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)
    with pytest.raises(ValueError, match="samples >= 2"):
        MethodSpec("sc", samples=1)
    with pytest.raises(ValueError, match="greedy"):
        MethodSpec("base", samples=4)
    with pytest.raises(ValueError, match="only apply"):
        MethodSpec("sc", reroute_overrides={"steps": 1})
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalConfig(task="gsm8k", max_new_tokens=0)
    assert EvalConfig(task="x", pass_ks=(10, 1, 5, 1)).pass_ks == (1, 5, 10)
