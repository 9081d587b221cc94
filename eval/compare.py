"""``ttadapt eval compare DIR1 DIR2``: paired differences between runs on the same examples.

Accuracy: exact McNemar test on the discordant items plus a paired-bootstrap interval of the
difference. Reference NLL: paired-bootstrap interval of the mean difference and a sign test.
Items are paired by example id; items present in only one run are left out (and counted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import mcnemar_exact, paired_bootstrap, sign_test
from .records import load_records

RunKey = tuple[str, str]


def load_runs(path: str | Path) -> dict[RunKey, list[dict[str, Any]]]:
    """Records of every run under ``path`` (an eval ``--out`` directory or one run directory), by (task, method)."""
    root = Path(path)
    if (root / "records.jsonl").is_file():
        run_dirs = [root]
    else:
        run_dirs = sorted(p.parent for p in root.glob("runs/*/*/records.jsonl"))
    if not run_dirs:
        raise FileNotFoundError(f"no eval runs under {root} (expected runs/<task>/<method>/records.jsonl)")
    out: dict[RunKey, list[dict[str, Any]]] = {}
    for d in run_dirs:
        recs = sorted(load_records(d / "records.jsonl").values(), key=lambda r: r["index"])
        if not recs:
            continue
        rep = d / "report.json"
        if rep.is_file():
            meta = json.loads(rep.read_text(encoding="utf-8"))
            key = (meta["task"], meta["method"])
            allowed = None if meta.get("n") is None else {r["id"] for r in recs[: meta["n"]]}
            recs = [r for r in recs if allowed is None or r["id"] in allowed]
        else:
            key = (recs[0]["task"], recs[0]["method"])
        out[key] = recs
    return out


@dataclass(frozen=True)
class Comparison:
    """Paired statistics of run B against run A on their shared examples."""

    task: str
    method_a: str
    method_b: str
    n: int
    unpaired: int
    acc_a: float
    acc_b: float
    acc_diff: dict[str, Any]
    mcnemar: dict[str, Any]
    nll: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compare_records(
    task: str, ma: str, mb: str, a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]
) -> Comparison:
    """Pair two runs' records by id and test the differences."""
    bmap = {r["id"]: r for r in b}
    pairs = [(r, bmap[r["id"]]) for r in a if r["id"] in bmap]
    unpaired = len(a) + len(b) - 2 * len(pairs)
    ca = [bool(x["scores"]["correct"]) for x, _ in pairs]
    cb = [bool(y["scores"]["correct"]) for _, y in pairs]
    n = len(pairs)
    nll = None
    npairs = [
        (x["ref_nll"]["value"], y["ref_nll"]["value"]) for x, y in pairs if x.get("ref_nll") and y.get("ref_nll")
    ]
    if npairs:
        va, vb = [p[0] for p in npairs], [p[1] for p in npairs]
        nll = {
            "n": len(npairs),
            "a": round(sum(va) / len(va), 6),
            "b": round(sum(vb) / len(vb), 6),
            "diff": paired_bootstrap(va, vb).to_dict(),
            "sign_test": sign_test([y - x for x, y in npairs]),
        }
    return Comparison(
        task,
        ma,
        mb,
        n,
        unpaired,
        round(sum(ca) / n, 6) if n else float("nan"),
        round(sum(cb) / n, 6) if n else float("nan"),
        paired_bootstrap([float(x) for x in ca], [float(y) for y in cb]).to_dict() if n else {},
        mcnemar_exact(ca, cb),
        nll,
    )


def pair_runs(
    runs_a: dict[RunKey, list[dict[str, Any]]],
    runs_b: dict[RunKey, list[dict[str, Any]]],
    method_a: str | None = None,
    method_b: str | None = None,
) -> list[tuple[str, str, str]]:
    """Which (task, method A, method B) to compare.

    Explicit ``method_a``/``method_b`` first; else the only run on each side; else runs with the same name.
    """
    tasks = sorted({t for t, _ in runs_a} & {t for t, _ in runs_b})
    out = []
    for t in tasks:
        ma = sorted(m for tt, m in runs_a if tt == t)
        mb = sorted(m for tt, m in runs_b if tt == t)
        if method_a or method_b:
            x, y = method_a or method_b, method_b or method_a
            if x in ma and y in mb:
                out.append((t, x, y))
        elif len(ma) == 1 and len(mb) == 1:
            out.append((t, ma[0], mb[0]))
        else:
            out.extend((t, m, m) for m in ma if m in mb)
    return out


def compare_dirs(
    dir_a: str | Path, dir_b: str | Path, method_a: str | None = None, method_b: str | None = None
) -> list[Comparison]:
    """All paired comparisons between two eval output (or run) directories."""
    ra, rb = load_runs(dir_a), load_runs(dir_b)
    pairs = pair_runs(ra, rb, method_a, method_b)
    if not pairs:
        raise ValueError(
            f"nothing to compare: tasks/methods A={sorted(ra)} B={sorted(rb)}; "
            "pass --method-a/--method-b to pick the runs to pair"
        )
    return [compare_records(t, x, y, ra[(t, x)], rb[(t, y)]) for t, x, y in pairs]


def format_comparisons(comps: Sequence[Comparison]) -> str:
    """A Markdown table of the comparisons (B - A)."""
    lines = [
        "| task | A | B | n | acc A | acc B | B - A [95% CI] | McNemar p (A only / B only) "
        "| NLL A | NLL B | NLL B - A [95% CI] | sign p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comps:
        d = c.acc_diff
        acc = f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else ""
        mc = f"{c.mcnemar['p_value']:.3g} ({c.mcnemar['only_a']}/{c.mcnemar['only_b']})"
        if c.nll:
            nd = c.nll["diff"]
            nll = (
                f"{c.nll['a']:.4f} | {c.nll['b']:.4f} | {nd['value']:+.4f} [{nd['low']:+.4f}, {nd['high']:+.4f}] "
                f"| {c.nll['sign_test']['p_value']:.3g}"
            )
        else:
            nll = " | | | "
        lines.append(
            f"| {c.task} | {c.method_a} | {c.method_b} | {c.n} | {100 * c.acc_a:.1f} | {100 * c.acc_b:.1f} "
            f"| {acc} | {mc} | {nll} |"
        )
    notes = [f"{c.task}: {c.unpaired} unpaired items left out" for c in comps if c.unpaired]
    return "\n".join([*lines, *(["", *notes] if notes else [])]) + "\n"
