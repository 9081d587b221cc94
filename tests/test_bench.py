"""The benchmark CLI runs end to end on a tiny model and reports ratios against plain generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


def test_bench_smoke(tmp_path: Path) -> None:
    from ttadapt.eval.bench.cli import main

    rc = main([
        "--model", "tiny", "--context", "24", "40", "--new-tokens", "6", "--repeats", "1", "--warmup", "0",
        "--methods", "plain", "paper", "--memory-context", "24", "--interval", "3", "--out", str(tmp_path),
    ])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    methods = {r["method"] for r in data["timing"]}
    assert methods == {"plain", "paper"}
    plain = [r for r in data["timing"] if r["method"] == "plain"]
    assert all(r["ratio"] == pytest.approx(1.0) for r in plain)
    paper = [r for r in data["timing"] if r["method"] == "paper"]
    assert all(r["phases"]["steps"] > 0 and r["phases"]["decode"] > 0 for r in paper)
    assert {r["method"] for r in data["memory"]} == methods and all(r["peak_mib"] > 0 for r in data["memory"])
    held = next(r for r in data["memory"] if r["method"] == "plain")
    assert all(r["rss_mib"] > r["peak_mib"] > 0 for r in data["memory"])  # RSS adds the interpreter and libraries
    assert held["ratio"] == pytest.approx(1.0) and held["rss_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "ratio vs plain" in (tmp_path / "bench.md").read_text()
    units = data["unit_costs"]  # one per context: 2 rounds (interval 3, 6 new) of paper's 5 steps
    assert [(u["context"], u["rounds"], u["steps"], u["mean_context"]) for u in units] == [(24, 2, 5, 26), (40, 2, 5, 42)]
    assert all(u["predicted_ratio"] == pytest.approx(1 + 2 * 5 * u["quotient"] / 6) for u in units)
    assert (tmp_path / "bench.md").read_text().count("Cost model (context") == 2


def test_bench_unit_mode_reports_only_the_cost_model(tmp_path: Path) -> None:
    from ttadapt.eval.bench.cli import main

    rc = main(["unit", "--model", "tiny", "--context", "12", "--new-tokens", "6", "9", "--interval", "3", "--steps", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["timing"] == [] and data["memory"] == []
    assert [(u["rounds"], u["steps"], u["mean_context"]) for u in data["unit_costs"]] == [(2, 2, 14), (3, 2, 15)]
    assert (tmp_path / "bench.md").read_text().count("Cost model (context 12") == 2


def test_cost_model_arithmetic_and_round_contexts() -> None:
    from ttadapt.eval.bench.unit import UnitCosts, round_contexts

    assert round_contexts(200, 256, 128) == [200, 328]
    assert round_contexts(200, 257, 128) == [200, 328, 456]
    assert round_contexts(200, 256, None) == [200]
    u = UnitCosts(context=200, new_tokens=256, rounds=2, steps=5, mean_context=264, fwd_bwd_s=0.078, decode_token_s=0.0049)
    assert u.quotient == pytest.approx(0.078 / 0.0049)
    assert u.predicted_ratio == pytest.approx(1 + 10 * (0.078 / 0.0049) / 256)
    assert "= 1.62× plain" in u.describe() and u.to_dict()["predicted_ratio"] == pytest.approx(u.predicted_ratio)


def test_unit_costs_leave_the_model_as_found() -> None:
    import torch

    import ttadapt
    from ttadapt.eval.bench.models import build
    from ttadapt.eval.bench.unit import measure_unit_costs

    model, vocab = build("tiny", device="cpu", dtype=torch.float32)
    ids = torch.randint(2, vocab, (1, 10), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    kw = dict(vocab=vocab, steps=3, interval=4, decode={}, device="cpu", repeats=1)
    u = measure_unit_costs(model, ids, 9, **kw)
    assert (u.rounds, u.mean_context) == (3, 14) and u.fwd_bwd_s > 0 and u.decode_token_s > 0
    assert ttadapt.get_handle(model) is None and torch.equal(model(ids).logits, before)  # patched only meanwhile
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    with ttadapt.patch(model) as h:  # an existing patch (static decode) is used and kept, its state untouched
        measure_unit_costs(model, ids, 9, **kw)
        assert ttadapt.get_handle(model) is h and not h.state.delta.any() and h.state.delta.grad is None


def test_bench_static_decode_applies_to_every_method(tmp_path: Path) -> None:
    from ttadapt.eval.bench.cli import decode_kwargs, main

    assert decode_kwargs("dynamic") == {}
    assert decode_kwargs("static") == {"cache_implementation": "static", "disable_compile": True}
    compiled = decode_kwargs("compiled")
    assert compiled["cache_implementation"] == "static" and compiled["compile_config"]._compile_all_devices
    rc = main([
        "time", "--model", "tiny", "--context", "24", "--new-tokens", "6", "--repeats", "1", "--warmup", "0",
        "--methods", "plain", "paper", "--interval", "3", "--decode", "static", "--out", str(tmp_path),
    ])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["env"]["decode"] == "static"
    assert {r["method"] for r in data["timing"]} == {"plain", "paper"}


def test_bench_vllm_methods_parse_and_need_vllm() -> None:
    import argparse
    import importlib.util

    from ttadapt.eval.bench.cli import _config, build_parser, check_method, main

    assert check_method("vllm-paper:steps=2") == "vllm-paper:steps=2"
    with pytest.raises(argparse.ArgumentTypeError, match="no overrides"):
        check_method("vllm:steps=2")
    args = build_parser().parse_args(["time"])
    assert _config("vllm-search", args).name == "paper" and _config("vllm-fast:steps=1", args).steps == 1
    assert _config("vllm", args) is None
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(SystemExit, match="need vLLM"):
            main(["time", "--model", "tiny", "--methods", "vllm-paper"])


def test_bench_self_consistency_batched_vs_separate_calls(tmp_path: Path) -> None:
    import argparse

    import torch

    from ttadapt.eval.bench.cli import _runner, build_parser, check_method, main
    from ttadapt.eval.bench.models import build

    assert check_method("paper:steps=2@seq") == "paper:steps=2@seq"
    with pytest.raises(argparse.ArgumentTypeError, match="HF methods only"):
        check_method("vllm-paper@seq")
    with pytest.raises(SystemExit, match="give --samples"):
        main(["time", "--model", "tiny", "--methods", "paper@seq"])
    args = build_parser().parse_args(["time", "--samples", "3", "--interval", "3"])
    model, vocab = build("tiny", device="cpu", dtype=torch.float32)
    ids = torch.randint(2, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    out, trace = _runner(model, "paper", ids, 6, args)()
    assert out.shape == (3, 18) and trace.rounds[1].rows is None and len(trace.rounds[1].rows_selected) == 3
    calls, phases = _runner(model, "paper@seq", ids, 6, args)()
    assert [o.shape for o, _ in calls] == [(1, 18)] * 3  # three prefill adaptations, one per call
    assert phases["steps"] == pytest.approx(sum(sum(r.times.get("steps", 0) for r in t.rounds) for _, t in calls))
    rc = main(["time", "--model", "tiny", "--context", "12", "--new-tokens", "6", "--repeats", "1", "--warmup", "0",
               "--samples", "3", "--interval", "3", "--methods", "plain", "plain@seq", "paper", "paper@seq",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["env"]["samples"] == 3 and len(data["timing"]) == 4
    assert "3 sampled sequences per run" in (tmp_path / "bench.md").read_text()
