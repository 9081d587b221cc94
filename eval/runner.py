"""``run_eval``: one (task, method) run with resumable per-example records and deterministic reports.

Layout of ``out_dir``::

    runs/<task>/<method label>/run.json        model + EvalConfig identity (a resume must match it)
    runs/<task>/<method label>/records.jsonl   one line per example (outputs, scores, trace, timings)
    runs/<task>/<method label>/report.json     this run's summary (no timings: reproducible)
    report.json, report.md, plots/*.png        all runs under out_dir, method x task
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import vllm_backend
from .config import EvalConfig, MethodSpec, parse_method
from .datasets import iter_limited, load_task
from .evaluate import EvalContext, evaluate_batch
from .records import append_record, load_records, write_json
from .report import run_summary, write_reports

log = logging.getLogger(__name__)
RUN_SCHEMA = "ttadapt.eval.run/1"


class ResumeMismatchError(ValueError):
    """An existing run directory was made with different settings."""


def run_dir_for(out_dir: str | Path, task: str, label: str) -> Path:
    """Where a (task, method label) run lives under ``out_dir``."""
    safe_task = re.sub(r"[^A-Za-z0-9_.+=,-]", "_", task)
    return Path(out_dir) / "runs" / safe_task / label


def load_model(model_path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory (eval mode, frozen)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (give a local HF model directory)")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (``config.backend``, ``config.method.shots``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def _check_identity(run_dir: Path, ident: dict[str, Any]) -> None:
    import json

    path = run_dir / "run.json"
    if not path.is_file():
        write_json(path, ident)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    if old != ident:
        raise ResumeMismatchError(
            f"{run_dir} holds a run with different settings ({', '.join(_changed(old, ident))}); "
            "use a new --out directory, a different --label, or delete that run directory to start over"
        )


def _check_engine_len(llm: Any, max_len: int | None) -> None:
    have = vllm_backend.engine_max_len(llm)
    if have is not None and max_len is not None and have < max_len:
        raise ValueError(
            f"the vLLM engine's max_model_len ({have}) is below the context prompts are fitted to ({max_len}); "
            f"pass max_model_len={have} (--max-model-len {have}) so prompts leave room for generation"
        )


def batches(
    every: list[tuple[int, Any]], todo: list[tuple[int, Any]], size: int, *, fixed: bool
) -> Iterator[tuple[list[tuple[int, Any]], set[int]]]:
    """The generation calls of a run: (examples to generate together, indices to record).

    ``fixed=False`` (vLLM backend, and runs that generate nothing): the examples still to do, packed
    ``size`` at a time. ``fixed=True`` (HF generation): the examples at positions ``[g*size,
    (g+1)*size)`` of the limited canonical order always form call ``g``, so an example's batch mates,
    hence its float rounding, are the same in a resumed run as in an uninterrupted one. A group that
    was partly recorded before an interruption is generated whole again and only its missing
    examples are recorded (at most ``size - 1`` extra generations per resume). A larger ``limit``
    fills the old last group up, so that group's old records came from a smaller call.
    """
    if not fixed or size == 1:
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            yield chunk, {i for i, _ in chunk}
        return
    wanted = {i for i, _ in todo}
    for start in range(0, len(every), size):
        group = every[start : start + size]
        keep = {i for i, _ in group if i in wanted}
        if keep:
            yield group, keep


def run_eval(
    model_path: str | Path,
    task: str,
    method: str | MethodSpec = "base",
    limit: int | None = None,
    seed: int = 0,
    out_dir: str | Path = "eval_out",
    *,
    model: Any = None,
    tokenizer: Any = None,
    llm: Any = None,
    progress: bool = True,
    stop_after: int | None = None,
    write_root_report: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Evaluate ``method`` on the first ``limit`` examples of ``task`` and return this run's summary.

    Examples already in the run's ``records.jsonl`` are skipped (resume), so an interrupted run
    continues where it stopped and ends with the same ``report.json``. ``model``/``tokenizer`` may be
    passed pre-loaded (``model_path`` is then only recorded), and so may the vLLM engine ``llm`` of
    ``backend="vllm"`` (else one is built with ``ttadapt.vllm.make_llm``). ``config`` holds further
    :class:`EvalConfig` fields (``max_new_tokens``, ``mc_mode``, ``sandbox``, ``backend``, ``vllm``,
    ...). Examples are generated ``batch_size`` at a time (:func:`batches`); records are appended one
    by one. ``stop_after`` stops after that many new examples (to test interruption).
    ``write_root_report=False`` skips rebuilding ``out_dir``'s combined report and plots (the CLI does
    it once after all runs).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    spec = method if isinstance(method, MethodSpec) else parse_method(method)
    cfg = EvalConfig(task=task, method=spec, seed=seed, **config)
    data = load_task(task)
    loglik = data.kind == "mc" and cfg.mc_mode == "loglik"  # scored by the HF model, nothing generated
    if loglik and spec.sampling:
        raise ValueError(
            f"{spec.name!r} samples generations; multiple choice by log-likelihood has none: "
            "use mc_mode='generate' (--mc-mode generate)"
        )
    if loglik and spec.rerouting and cfg.vllm.trainer == "search":
        raise ValueError(
            "trainer='search' adapts while generating; multiple choice by log-likelihood generates nothing "
            "(its prompt state comes from the HF model): use mc_mode='generate' or trainer='hf'"
        )
    run_dir = run_dir_for(out_dir, data.name, spec.label)
    run_dir.mkdir(parents=True, exist_ok=True)
    ident = {"schema": RUN_SCHEMA, "model": str(model_path), "config": cfg.identity()}
    _check_identity(run_dir, ident)
    rec_path = run_dir / "records.jsonl"
    done = load_records(rec_path, repair=True)

    todo = [(i, ex) for i, ex in iter_limited(data, limit) if ex.id not in done][:stop_after]
    if todo:
        use_vllm = cfg.backend == "vllm" and not loglik
        if use_vllm and llm is None:
            vllm_backend.require_vllm()  # before loading the HF model: fail fast
        if model is None or tokenizer is None:
            model, tokenizer = load_model(model_path, cfg.dtype, cfg.device)
        reroute_cfg = spec.reroute_config() if spec.rerouting else None
        ctx = EvalContext(model, tokenizer, data, cfg, reroute_cfg)
        if use_vllm:
            if llm is None:
                llm = vllm_backend.build_engine(
                    model_path, dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len, options=cfg.vllm
                )
            _check_engine_len(llm, ctx.max_len)
            ctx.generator = vllm_backend.VLLMGenerator(llm, tokenizer, cfg, hf_model=model, reroute_config=reroute_cfg)
        from tqdm.auto import tqdm

        fixed = cfg.backend == "hf" and not loglik  # see batches(): HF batches are fixed groups
        every = list(iter_limited(data, limit))
        with tqdm(total=len(todo), desc=f"{data.name}/{spec.label}", unit="ex", disable=not progress) as bar:
            for group, keep in batches(every, todo, cfg.batch_size, fixed=fixed):
                for rec in evaluate_batch(ctx, group, keep):
                    append_record(rec_path, rec)
                    done[rec["id"]] = rec
                    bar.update(1)
    wanted = [ex.id for _, ex in iter_limited(data, limit)]
    records = [done[i] for i in wanted if i in done]
    summary = run_summary(data.name, spec, str(model_path), records, expected=len(wanted))
    write_json(run_dir / "report.json", summary)
    if write_root_report:
        write_reports(out_dir)
    return summary
