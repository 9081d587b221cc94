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
from pathlib import Path
from typing import Any

from .config import EvalConfig, MethodSpec, parse_method
from .datasets import iter_limited, load_task
from .evaluate import EvalContext, evaluate_example
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


def _check_identity(run_dir: Path, ident: dict[str, Any]) -> None:
    import json

    path = run_dir / "run.json"
    if not path.is_file():
        write_json(path, ident)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    if old != ident:
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        raise ResumeMismatchError(
            f"{run_dir} holds a run with different settings ({', '.join(diff)}); "
            "use a new --out directory, a different --label, or delete that run directory to start over"
        )


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
    progress: bool = True,
    stop_after: int | None = None,
    write_root_report: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Evaluate ``method`` on the first ``limit`` examples of ``task`` and return this run's summary.

    Examples already in the run's ``records.jsonl`` are skipped (resume), so an interrupted run
    continues where it stopped and ends with the same ``report.json``. ``model``/``tokenizer`` may be
    passed pre-loaded (``model_path`` is then only recorded). ``config`` holds further
    :class:`EvalConfig` fields (``max_new_tokens``, ``mc_mode``, ``sandbox``, ...). ``stop_after``
    stops after that many new examples (to test interruption). ``write_root_report=False`` skips
    rebuilding ``out_dir``'s combined report and plots (the CLI does it once after all runs).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    spec = method if isinstance(method, MethodSpec) else parse_method(method)
    cfg = EvalConfig(task=task, method=spec, seed=seed, **config)
    data = load_task(task)
    if data.kind == "mc" and cfg.mc_mode == "loglik" and spec.sampling:
        raise ValueError(
            f"{spec.name!r} samples generations; multiple choice by log-likelihood has none: "
            "use mc_mode='generate' (--mc-mode generate)"
        )
    run_dir = run_dir_for(out_dir, data.name, spec.label)
    run_dir.mkdir(parents=True, exist_ok=True)
    ident = {"schema": RUN_SCHEMA, "model": str(model_path), "config": cfg.identity()}
    _check_identity(run_dir, ident)
    rec_path = run_dir / "records.jsonl"
    done = load_records(rec_path, repair=True)

    todo = [(i, ex) for i, ex in iter_limited(data, limit) if ex.id not in done]
    if todo:
        if model is None or tokenizer is None:
            model, tokenizer = load_model(model_path, cfg.dtype, cfg.device)
        reroute_cfg = spec.reroute_config() if spec.rerouting else None
        ctx = EvalContext(model, tokenizer, data, cfg, reroute_cfg)
        from tqdm.auto import tqdm

        bar = tqdm(todo, desc=f"{data.name}/{spec.label}", unit="ex", disable=not progress)
        for n_new, (i, ex) in enumerate(bar):
            if stop_after is not None and n_new >= stop_after:
                break
            rec = evaluate_example(ctx, i, ex)
            append_record(rec_path, rec)
            done[ex.id] = rec
    wanted = [ex.id for _, ex in iter_limited(data, limit)]
    records = [done[i] for i in wanted if i in done]
    summary = run_summary(data.name, spec, str(model_path), records, expected=len(wanted))
    write_json(run_dir / "report.json", summary)
    if write_root_report:
        write_reports(out_dir)
    return summary
