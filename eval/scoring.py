"""Score one example's outputs: code by sandboxed execution, math by math-verify, MC by letter or log-prob.

Every scorer returns ``scores`` with a binary ``correct`` (the primary, paired-testable outcome):
greedy methods score their single output; sampling methods score the majority vote (math, MC) or the
execution-selected sample (code), and also report pass@k / maj@k for each configured k <= samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .answers import LETTERS, answers_equivalent, extract_choice_letter, extract_final_answer
from .datasets import Example
from .metrics import majority_vote, pass_at_k
from .programs import check_program, select_sample, visible_program
from .sandbox import ExecResult, SandboxLimits, run_programs


def _run_unique(sources: Sequence[str | None], limits: SandboxLimits) -> list[ExecResult | None]:
    """Run each distinct program once (identical samples share a result)."""
    uniq = sorted({s for s in sources if s is not None})
    results = dict(zip(uniq, run_programs(uniq, limits), strict=True))
    return [results[s] if s is not None else None for s in sources]


def score_code(
    ex: Example, code_prefix: str, texts: Sequence[str], ks: Sequence[int], limits: SandboxLimits
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hidden-test pass/fail per sample; with k > 1 samples also pass@k and execution-based selection."""
    hidden = _run_unique([check_program(ex, code_prefix, t) for t in texts], limits)
    passed = [bool(r and r.passed) for r in hidden]
    extra: dict[str, Any] = {"exec": [{"status": r.status, "stderr": r.stderr[-300:]} for r in hidden if r]}
    n = len(texts)
    if n == 1:
        return {"correct": int(passed[0])}, extra
    vis_src = [visible_program(ex, code_prefix, t) for t in texts]
    vis = _run_unique(vis_src, limits)
    vis_ok = [None if r is None else r.passed for r in vis]
    chosen = select_sample(texts, vis_ok)
    c = sum(passed)
    scores: dict[str, Any] = {"correct": int(passed[chosen]), "selected": chosen, "num_correct": c, "n": n}
    for k in ks:
        if k <= n:
            scores[f"pass@{k}"] = round(pass_at_k(n, c, k), 6)
    extra["visible_passed"] = vis_ok
    extra["passed"] = [int(p) for p in passed]
    return scores, extra


def score_math(ex: Example, texts: Sequence[str], ks: Sequence[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Final answers extracted per sample and checked with math-verify; maj@k for k > 1 samples."""
    extracted = [extract_final_answer(t) for t in texts]
    correct = [answers_equivalent(ex.answer, e) for e in extracted]
    extra: dict[str, Any] = {"extracted": extracted}
    n = len(texts)
    if n == 1:
        return {"correct": int(correct[0])}, extra
    scores: dict[str, Any] = {"num_correct": sum(correct), "n": n}
    for k in sorted({*[k for k in ks if k <= n], n}):
        winner, votes, _ = majority_vote(extracted[:k], same=answers_equivalent)
        scores[f"maj@{k}"] = int(answers_equivalent(ex.answer, winner))
        if k == n:
            scores["correct"] = scores[f"maj@{k}"]
            extra["vote"] = {"answer": winner, "votes": votes}
        scores[f"pass@{k}"] = round(pass_at_k(n, sum(correct), k), 6)
    extra["correct"] = [int(c) for c in correct]
    return scores, extra


def score_mc_generate(ex: Example, texts: Sequence[str], ks: Sequence[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Letters extracted from generated answers; majority vote over samples for k > 1."""
    picks = [extract_choice_letter(t, len(ex.choices)) for t in texts]
    extra: dict[str, Any] = {"extracted": [None if p is None else LETTERS[p] for p in picks]}
    n = len(texts)
    if n == 1:
        return {"correct": int(picks[0] == ex.gold)}, extra
    scores: dict[str, Any] = {"n": n, "num_correct": sum(p == ex.gold for p in picks)}
    for k in sorted({*[k for k in ks if k <= n], n}):
        winner, _, _ = majority_vote(picks[:k])
        scores[f"maj@{k}"] = int(winner == ex.gold)
    scores["correct"] = scores[f"maj@{n}"]
    return scores, extra


def score_mc_loglik(
    ex: Example, logprobs: Sequence[tuple[float, int]], norm: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pick the choice with the highest summed or per-token log-prob (ties: lowest index)."""
    sums = np.array([s for s, _ in logprobs])
    means = np.array([s / max(n, 1) for s, n in logprobs])
    pred_sum, pred_mean = int(np.argmax(sums)), int(np.argmax(means))
    pred = pred_mean if norm == "mean" else pred_sum
    scores = {
        "correct": int(pred == ex.gold),
        "correct_sum": int(pred_sum == ex.gold),
        "correct_mean": int(pred_mean == ex.gold),
    }
    extra = {"pred": pred, "logprob_sum": [round(float(x), 6) for x in sums], "tokens": [n for _, n in logprobs]}
    return scores, extra
