"""Summaries of runs (``report.json``) and the method x task Markdown table, free of timings.

Everything here is a pure function of the records, rounded and key-sorted, so a resumed run writes
the same bytes as an uninterrupted one. Accuracies carry 95% Wilson intervals; continuous means
(pass@k estimates, NLL) carry fixed-seed bootstrap intervals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import MethodSpec
from .metrics import bootstrap_mean, paired_bootstrap, sign_test, wilson_interval
from .records import write_json

log = logging.getLogger(__name__)
REPORT_SCHEMA = "ttadapt.eval.report/1"
_TRACE_FIELDS = (
    "rounds",
    "adapted_rounds",
    "kept_rounds",
    "first_loss",
    "last_loss",
    "delta_mean_abs",
    "routing_changed",
)


def _r(x: float | None, d: int = 6) -> float | None:
    return None if x is None or x != x else round(float(x), d)


def _score_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    out: dict[str, Any] = {"accuracy": wilson_interval(sum(int(r["scores"]["correct"]) for r in records), n).to_dict()}
    keys = sorted({k for r in records for k in r["scores"] if k.startswith(("pass@", "maj@", "correct_"))})
    for k in keys:
        vals = [float(r["scores"][k]) for r in records if k in r["scores"]]
        if k.startswith("pass@"):
            out[k] = bootstrap_mean(vals).to_dict()
        else:
            out[k] = wilson_interval(sum(vals), len(vals)).to_dict()
    return out


def _nll_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [r["ref_nll"] for r in records if r.get("ref_nll")]
    if not rows:
        return None
    tokens = np.array([x["tokens"] for x in rows], dtype=np.float64)
    base = np.array([x["base"] for x in rows])
    out: dict[str, Any] = {
        "base": bootstrap_mean(base).to_dict(),
        "base_token_weighted": _r(float((base * tokens).sum() / tokens.sum())),
        "tokens": int(tokens.sum()),
    }
    rr_rows = [x for x in rows if "rerouted" in x]
    if len(rr_rows) == len(rows):
        rr = np.array([x["rerouted"] for x in rows])
        out["rerouted"] = bootstrap_mean(rr).to_dict()
        out["rerouted_token_weighted"] = _r(float((rr * tokens).sum() / tokens.sum()))
        out["delta"] = paired_bootstrap(base, rr).to_dict()
        out["sign_test"] = sign_test(list(rr - base))
    out["value"] = out.get("rerouted", out["base"])
    return out


def _routing_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [r["routing"] for r in records if r.get("routing")]
    if not rows:
        return None
    layers = rows[0]["layers"]
    base = np.sum([np.array(x["base"], dtype=np.float64) for x in rows if x["layers"] == layers], axis=0)
    rr = np.sum([np.array(x["rerouted"], dtype=np.float64) for x in rows if x["layers"] == layers], axis=0)
    fb = base / np.maximum(base.sum(axis=1, keepdims=True), 1)
    fr = rr / np.maximum(rr.sum(axis=1, keepdims=True), 1)
    rnd = lambda m: [[_r(v) for v in row] for row in m]  # noqa: E731
    return {
        "layers": layers,
        "base": rnd(fb),
        "rerouted": rnd(fr),
        "shift": rnd(fr - fb),
        "total_variation": [_r(0.5 * float(np.abs(fr[i] - fb[i]).sum())) for i in range(len(layers))],
    }


def _trace_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for part in ("generate", "prefill_adapt"):
        traces = [r["trace"][part] for r in records if r.get("trace") and r["trace"].get(part)]
        if not traces:
            continue
        agg = {}
        for f in _TRACE_FIELDS:
            vals = [t[f] for t in traces if isinstance(t.get(f), (int, float)) and not isinstance(t.get(f), bool)]
            if vals:
                agg[f"mean_{f}"] = _r(float(np.mean(vals)))
        agg["n"] = len(traces)
        out[part] = agg
    return out or None


def run_summary(
    task: str, spec: MethodSpec, model: str, records: Sequence[dict[str, Any]], expected: int
) -> dict[str, Any]:
    """Summary of one (task, method) run from its records (in canonical order)."""
    exec_status: dict[str, int] = {}
    for r in records:
        for e in (r.get("details") or {}).get("exec", []):
            exec_status[e["status"]] = exec_status.get(e["status"], 0) + 1
    return {
        "schema": REPORT_SCHEMA,
        "task": task,
        "method": spec.label,
        "spec": spec.to_dict(),
        "model": model,
        "n": len(records),
        "complete": len(records) == expected,
        "metrics": _score_metrics(records) if records else {},
        "ref_nll": _nll_summary(records),
        "routing": _routing_summary(records),
        "adaptation": _trace_summary(records),
        "truncated_prompts": sum(1 for r in records if r.get("truncated")),
        "exec_status": dict(sorted(exec_status.items())) or None,
    }


def collect_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """All run summaries under ``out_dir/runs`` sorted by (task, method)."""
    runs = []
    for path in sorted(Path(out_dir).glob("runs/*/*/report.json")):
        runs.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(runs, key=lambda r: (r["task"], r["method"]))


def _pct(iv: dict[str, Any]) -> str:
    return f"{100 * iv['value']:.1f} [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}] (n={iv['n']})"


def _num(iv: dict[str, Any]) -> str:
    return f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] (n={iv['n']})"


def _table(runs: Sequence[dict[str, Any]], cell: Any) -> list[str]:
    tasks = sorted({r["task"] for r in runs})
    methods = sorted({r["method"] for r in runs})
    by = {(r["task"], r["method"]): r for r in runs}
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        cells = [cell(by[(t, m)]) if (t, m) in by else "" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(c or "" for c in cells) + " |")
    return lines


def markdown_report(runs: Sequence[dict[str, Any]]) -> str:
    """The Markdown summary: accuracy and reference NLL (method x task), paired NLL shift, sampling metrics."""
    lines = ["# ttadapt eval report", ""]
    if not runs:
        return "\n".join([*lines, "No runs found.", ""])
    lines += ["## Accuracy, % [95% Wilson interval] (n)", ""]
    lines += _table(
        runs,
        lambda r: _pct(r["metrics"]["accuracy"]) + ("" if r["complete"] else " *partial*") if r["metrics"] else "",
    )
    lines += [
        "",
        "## Reference-solution NLL given the prompt, nats/token [95% bootstrap] (n)",
        "",
        "Base NLL for base/icl/sc runs; NLL under the prompt-adapted state for reroute runs.",
        "",
    ]
    lines += _table(runs, lambda r: _num(r["ref_nll"]["value"]) if r.get("ref_nll") else "")
    paired = [r for r in runs if r.get("ref_nll") and "delta" in r["ref_nll"]]
    if paired:
        lines += [
            "",
            "## Rerouted vs base NLL on the same tokens (paired per item)",
            "",
            "| task | method | base | rerouted | rerouted - base [95% CI] | sign test p |",
            "|---|---|---|---|---|---|",
        ]
        for r in paired:
            nll = r["ref_nll"]
            d = nll["delta"]
            lines.append(
                f"| {r['task']} | {r['method']} | {nll['base']['value']:.4f} | {nll['rerouted']['value']:.4f} | "
                f"{d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | {nll['sign_test']['p_value']:.3g} |"
            )
    extra = [r for r in runs if any(k.startswith(("pass@", "maj@")) for k in r.get("metrics", {}))]
    if extra:
        lines += ["", "## Sampling metrics", "", "| task | method | metric | value [95% CI] |", "|---|---|---|---|"]
        for r in extra:
            for k, iv in r["metrics"].items():
                if k.startswith(("pass@", "maj@")):
                    lines.append(f"| {r['task']} | {r['method']} | {k} | {_pct(iv)} |")
    return "\n".join([*lines, ""])


def write_reports(out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots for every run under ``out_dir``."""
    out = Path(out_dir)
    runs = collect_runs(out)
    report = {"schema": REPORT_SCHEMA, "runs": runs}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown_report(runs), encoding="utf-8")
    try:
        from .plots import write_plots

        write_plots(runs, out / "plots")
    except ImportError as exc:  # matplotlib is optional for the numbers
        log.warning("plots skipped (%s); pip install 'ttadapt[eval]' for matplotlib", exc)
    return report
