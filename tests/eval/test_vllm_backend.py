"""The vLLM backend's logic without vLLM: method -> request mapping, batching, stop handling, config, runner.

A fake engine stands in for ``vllm.LLM`` (its outputs are a function of the prompt, seed and sample
index), and ``ttadapt.vllm.sampling_params``/``generate`` are replaced by recorders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import ttadapt.vllm
from ttadapt.eval.cli import main
from ttadapt.eval.config import EvalConfig, MethodSpec, VLLMOptions
from ttadapt.eval.methods import example_seed
from ttadapt.eval.runner import ResumeMismatchError, run_dir_for, run_eval
from ttadapt.eval.vllm_backend import (
    INSTALL_HINT,
    Call,
    PlainDecoder,
    RerouteDecoder,
    Sample,
    continuation_seed,
    decode_all,
    engine_kwargs,
    sampling_kwargs,
)

STOPS = ("\n\n", "Question:")
WORDS = [" A", " B", " C.", " D", " B\nQuestion: next"]  # the last one ends at a multiple-choice stop


@pytest.fixture
def params(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``ttadapt.vllm.sampling_params`` replaced by a recorder returning its keyword arguments."""
    made: list[dict[str, Any]] = []

    def fake(state: Any = None, **kw: Any) -> dict[str, Any]:
        assert state is None, "plain requests carry no ttadapt payload"
        made.append(kw)
        return kw

    monkeypatch.setattr(ttadapt.vllm, "sampling_params", fake, raising=False)
    return made


class FakeLLM:
    """``vllm.LLM.generate`` stand-in: sample ``j`` of a request is a word picked by (prompt, seed, j)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls = 0
        self.requests: list[tuple[list[int], dict[str, Any]]] = []

    def tokens(self, ids: list[int], seed: int | None, j: int) -> list[int]:
        key = f"{ids}|{seed}|{j if seed is not None else 0}"
        word = WORDS[hashlib.sha256(key.encode()).digest()[0] % len(WORDS)]
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]

    def generate(self, inputs: list[dict[str, Any]], params: list[dict[str, Any]], use_tqdm: bool) -> list[Any]:
        self.calls += 1
        outs = []
        for inp, sp in zip(inputs, params, strict=True):
            ids = inp["prompt_token_ids"]
            self.requests.append((ids, sp))
            samples = [
                SimpleNamespace(
                    index=j, token_ids=self.tokens(ids, sp["seed"], j)[: sp["max_tokens"]], finish_reason="length"
                )
                for j in range(sp["n"])
            ]
            outs.append(SimpleNamespace(outputs=samples[::-1]))  # vLLM does not promise sample order
        return outs


def test_sampling_kwargs_by_method() -> None:
    for name in ("base", "icl", "reroute"):
        assert sampling_kwargs(MethodSpec(name), STOPS) == {"temperature": 0.0, "stop": list(STOPS)}
    sc = MethodSpec("sc", samples=4, temperature=0.7, top_p=0.9)
    assert sampling_kwargs(sc, STOPS) == {"temperature": 0.7, "top_p": 0.9, "stop": list(STOPS)}
    assert sampling_kwargs(MethodSpec("reroute+sc", samples=4, temperature=0.7, top_p=0.9), STOPS) == sampling_kwargs(
        sc, STOPS
    )


def test_plain_decoder_seeds_only_sampled_requests(params: list[dict[str, Any]], tiny_random: tuple[Any, Any]) -> None:
    llm = FakeLLM(tiny_random[1])
    calls = [Call([0, 5, 6], 3, 11, 8), Call([0, 7], 3, 12, 4)]
    out = PlainDecoder(llm, MethodSpec("sc", samples=3), STOPS)(calls)
    assert [p["seed"] for p in params] == [11, 12] and all(p["n"] == 3 for p in params)
    assert [p["max_tokens"] for p in params] == [8, 4] and all(p["stop"] == list(STOPS) for p in params)
    # samples come back in index order although the engine listed them reversed
    assert [[s.tokens for s in g] for g in out] == [
        [llm.tokens(c.context, c.seed, j)[: c.max_tokens] for j in range(3)] for c in calls
    ]
    params.clear()
    PlainDecoder(llm, MethodSpec("base"), STOPS)(calls)
    assert [(p["seed"], p["n"], p["temperature"]) for p in params] == [(None, 3, 0.0), (None, 3, 0.0)]


def _fake_generate(log: list[dict[str, Any]]) -> Any:
    def generate(llm: Any, prompts: list[list[int]], **kw: Any) -> list[Any]:
        log.append(dict(kw, prompts=[list(p) for p in prompts]))
        return [
            SimpleNamespace(
                prompt_index=i,
                sample_index=j,
                token_ids=[len(p), j],
                finish_reason="length",
                chunks=2,
                states=["s0", f"s1-{i}-{j}"],
                rounds=[],
            )
            for i, p in enumerate(prompts)
            for j in range(kw["n"])
        ]

    return generate


@pytest.mark.parametrize(
    ("method", "trainer", "n_calls"), [("reroute", "hf", 1), ("reroute", "search", 3), ("reroute+sc", "hf", 3)]
)
def test_reroute_decoder_shares_a_call_only_when_batch_independent(
    monkeypatch: pytest.MonkeyPatch, method: str, trainer: str, n_calls: int
) -> None:
    log: list[dict[str, Any]] = []
    monkeypatch.setattr(ttadapt.vllm, "generate", _fake_generate(log), raising=False)
    spec = MethodSpec(method, samples=2 if method == "reroute+sc" else None)
    options = VLLMOptions(trainer=trainer, search={"rounds": 1} if trainer == "search" else {})
    dec = RerouteDecoder("llm", spec, STOPS, hf_model="hf", reroute_config="cfg", options=options)
    calls = [Call([0] * (k + 2), spec.samples, 100 + k, 6) for k in range(3)]
    out = dec(calls)
    assert len(log) == n_calls
    assert [[s.tokens for s in g] for g in out] == [[[k + 2, j] for j in range(spec.samples)] for k in range(3)]
    assert out[1][0].chunks == 2 and out[1][0].states == ["s0", "s1-0-0" if n_calls > 1 else "s1-1-0"]
    for entry in log:
        assert entry["reroute"] == "cfg" and entry["max_tokens"] == 6 and entry["n"] == spec.samples
        assert entry["trainer"] == trainer and ("hf_model" in entry) == (trainer == "hf")
        assert ("seed" in entry["sampling"]) == spec.sampling
    if spec.sampling:
        assert [e["sampling"]["seed"] for e in log] == [100, 101, 102]
    if trainer == "search":
        assert [(e["search"].seed, e["search"].rounds) for e in log] == [(100, 1), (101, 1), (102, 1)]


def test_decode_all_continues_stops_inside_leading_whitespace() -> None:
    text = {1: "\n", 2: "\n", 3: "A", 4: "B", 9: "<eos>"}
    script = {
        # sample 0 stopped at "\n\n" before any text: the HF rule goes on, so it is continued
        (0, ()): Sample([1, 2], "stop"),
        (0, (1, 2)): Sample([3, 1, 2], "stop"),  # then a real stop: done
        # sample 1 stopped at a real stop string: done
        (1, ()): Sample([3, 1, 2], "stop"),
        # sample 2 ended with EOS, sample 3 used its whole budget: done
        (2, ()): Sample([1, 9], "stop"),
        (3, ()): Sample([1, 2, 1, 2, 1, 2], "stop"),
    }
    calls = [Call([7, k], 1, 50 + k, 6) for k in range(4)]
    seen: list[list[Call]] = []

    def decode(batch: list[Call]) -> list[list[Sample]]:
        seen.append(batch)
        out = []
        for c in batch:
            k, done = c.context[1], tuple(c.context[2:])
            s = script[(k, done)]
            out.append([Sample(list(s.tokens), s.finish_reason)])
        return out

    res = decode_all(calls, decode, text_of=lambda t: "".join(text[i] for i in t), stops=("\n\n",), eos_ids={9})
    assert [s.tokens for (s,) in res] == [[1, 2, 3, 1, 2], [3, 1, 2], [1, 9], [1, 2, 1, 2, 1, 2]]
    assert res[0][0].chunks == 2 and res[1][0].chunks == 1
    assert len(seen) == 2 and seen[1] == [Call([7, 0, 1, 2], 1, continuation_seed(50, 1, 0), 4)]


def test_vllm_options_validation_and_identity() -> None:
    hf = EvalConfig(task="t")
    assert not {"backend", "vllm", "max_model_len"} & set(hf.identity())  # older run.json files still match
    base = EvalConfig(task="t", backend="vllm", batch_size=8, vllm=VLLMOptions(gpu_memory_utilization=0.5))
    assert base.identity()["backend"] == "vllm" and base.identity()["vllm"] == {"engine_args": {}}
    rr = EvalConfig(
        task="t", method=MethodSpec("reroute"), backend="vllm", vllm=VLLMOptions(trainer="search", search={"rounds": 2})
    )
    assert rr.identity()["vllm"] == {"engine_args": {}, "search": {"rounds": 2}, "trainer": "search"}
    # batch size and memory share do not change results; the trainer does
    assert EvalConfig(task="t", backend="vllm", batch_size=2).identity() == base.identity()
    assert EvalConfig(task="t", method=MethodSpec("reroute"), backend="vllm").identity() != rr.identity()
    for kwargs, msg in [
        (dict(vllm=VLLMOptions(trainer="search")), "need backend='vllm'"),
        (dict(backend="tgi"), "backend must be"),
        (dict(max_model_len=1), "max_model_len"),
    ]:
        with pytest.raises(ValueError, match=msg):
            EvalConfig(task="t", **kwargs)
    for kwargs, msg in [
        (dict(trainer="adam"), "trainer must be"),
        (dict(search={"rounds": 1}), "trainer='search'"),
        (dict(trainer="search", search={"bogus": 1}), "bad search setting"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(engine_args={"dtype": "half"}), r"dtype \(use --dtype\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            VLLMOptions(**kwargs)
    opts = VLLMOptions(gpu_memory_utilization=0.4, engine_args={"tensor_parallel_size": 2})
    assert engine_kwargs("bfloat16", 3, 2048, opts) == {
        "dtype": "bfloat16",
        "seed": 3,
        "max_model_len": 2048,
        "gpu_memory_utilization": 0.4,
        "tensor_parallel_size": 2,
    }
    assert engine_kwargs("float32", 0, None, VLLMOptions()) == {"dtype": "float32", "seed": 0}


def _records(out: Path, label: str) -> list[dict[str, Any]]:
    path = run_dir_for(out, "jsonl:mc", label) / "records.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    for r in recs:
        r.pop("timings")
    return recs


def test_runner_batches_resume_and_seeds_with_a_fake_engine(
    tmp_path: Path,
    params: list[dict[str, Any]],
    tiny_random_dir: Path,
    tiny_random: tuple[Any, Any],
    local_tasks: dict[str, str],
) -> None:
    model, tok = tiny_random
    kw = dict(
        model=model,
        tokenizer=tok,
        progress=False,
        max_new_tokens=6,
        write_root_report=False,
        backend="vllm",
        mc_mode="generate",
    )
    task, spec = local_tasks["mc"], MethodSpec("sc", samples=3)
    llm = FakeLLM(tok)
    run_eval(str(tiny_random_dir), task, spec, None, 4, tmp_path / "one", llm=llm, **kw)
    assert [p["seed"] for p in params] == [example_seed(4, f"q{i}") for i in range(3)]
    assert all(p["n"] == 3 for p in params) and (llm.calls, len(llm.requests)) == (3, 3)

    big = FakeLLM(tok)
    part = tmp_path / "part"
    run_eval(str(tiny_random_dir), task, spec, None, 4, part, llm=big, stop_after=2, batch_size=3, **kw)
    assert (big.calls, len(_records(part, spec.label))) == (1, 2)  # one call, records appended per example
    run_eval(str(tiny_random_dir), task, spec, None, 4, part, llm=big, batch_size=2, **kw)
    assert (big.calls, len(big.requests)) == (2, 3)  # nothing generated twice
    assert _records(part, spec.label) == _records(tmp_path / "one", spec.label)
    one = run_dir_for(tmp_path / "one", "jsonl:mc", spec.label) / "report.json"
    assert (run_dir_for(part, "jsonl:mc", spec.label) / "report.json").read_bytes() == one.read_bytes()
    outs = [r["outputs"] for r in _records(part, spec.label)]
    assert any(len(set(o)) > 1 for o in outs), "the fake gave identical samples: the seed checks are vacuous"
    n_cut = sum(o == " B" for r in outs for o in r)
    assert n_cut and not any("Question" in o for r in outs for o in r)  # truncated at the stop like HF


def test_backend_is_part_of_the_run_identity(
    tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    kw = dict(model=tiny_random[0], tokenizer=tiny_random[1], progress=False, max_new_tokens=4, write_root_report=False)
    run_eval(str(tiny_random_dir), local_tasks["code"], "base", 1, 0, tmp_path, **kw)
    with pytest.raises(ResumeMismatchError, match=r"settings \(config\.backend, config\.vllm\)"):
        run_eval(str(tiny_random_dir), local_tasks["code"], "base", 1, 0, tmp_path, backend="vllm", **kw)


def test_loglik_multiple_choice_needs_no_engine(
    tmp_path: Path, tiny_random_dir: Path, tiny_random: tuple[Any, Any], local_tasks: dict[str, str]
) -> None:
    kw = dict(model=tiny_random[0], tokenizer=tiny_random[1], progress=False, write_root_report=False)
    hf = run_eval(str(tiny_random_dir), local_tasks["mc"], "base", None, 0, tmp_path / "hf", **kw)
    vl = run_eval(str(tiny_random_dir), local_tasks["mc"], "base", None, 0, tmp_path / "vllm", backend="vllm", **kw)
    assert vl["metrics"] == hf["metrics"] and vl["n"] == 3  # scored by the HF model: no vLLM needed
    with pytest.raises(ValueError, match="trainer='search' adapts while generating"):
        run_eval(
            str(tiny_random_dir),
            local_tasks["mc"],
            "reroute",
            None,
            0,
            tmp_path / "s",
            backend="vllm",
            vllm=VLLMOptions(trainer="search"),
            **kw,
        )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_names_the_extra(
    tmp_path: Path,
    tiny_random_dir: Path,
    tiny_random: tuple[Any, Any],
    local_tasks: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    kw = dict(model=tiny_random[0], tokenizer=tiny_random[1], progress=False, max_new_tokens=4)
    with pytest.raises(RuntimeError, match=r"pip install 'ttadapt\[vllm\]'"):
        run_eval(str(tiny_random_dir), local_tasks["code"], "base", 1, 0, tmp_path, backend="vllm", **kw)
    argv = ["--model", str(tiny_random_dir), "--task", local_tasks["code"], "--out", str(tmp_path / "cli")]
    assert main([*argv, "--backend", "vllm"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_cli_rejects_vllm_options_without_the_backend(
    tmp_path: Path, tiny_random_dir: Path, local_tasks: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_random_dir), "--task", local_tasks["code"], "--out", str(tmp_path)]
    assert main([*argv, "--trainer", "search"]) == 2  # (--batch-size serves both backends)
    assert "need --backend vllm" in capsys.readouterr().err
    assert main([*argv, "--backend", "vllm", "--vllm-arg", "seed=3"]) == 2
    assert "seed (use --seed)" in capsys.readouterr().err
