"""Final-answer extraction (light, regex) and equivalence (math-verify) for GSM8K/MATH and letters for MC.

Extraction only locates the final answer span (``\\boxed{}``, ``####``, "The answer is"); all
normalisation and equivalence (fractions, LaTeX, thousands separators, units) is math-verify's.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

_BOX_CMDS = ("\\boxed", "\\fbox")


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (None when unbalanced)."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces ok) or ``\\boxed 5``."""
    best: tuple[int, str] | None = None
    for cmd in _BOX_CMDS:
        start = text.rfind(cmd)
        while start != -1:
            j = start + len(cmd)
            content: str | None = None
            if j < len(text) and text[j] == "{":
                end = _match_brace(text, j)
                if end is not None:
                    content = text[j + 1 : end]
            elif j < len(text) and text[j] == " ":
                m = re.match(r" +([^\s$]+)", text[j:])
                content = m.group(1) if m else None
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(cmd, 0, start)
    return best[1].strip() if best else None


_HASHES = re.compile(r"####\s*([^\n]+)")
# a lookahead so overlapping phrases ("Final Answer: The final answer is 24") all match; the last wins
_ANSWER_IS = re.compile(r"(?=(?:answer\s+is|final\s+answer\s*:)\s*:?\s*([^\n]+))", re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _clean_span(span: str) -> str:
    """Trim a located answer span to its first sentence, without ``$`` delimiters ("$18$. I hope" -> "18")."""
    span = re.split(r"\s+I hope", span)[0]
    span = re.split(r"\.(?:\s|$)", span)[0]  # a period ending the sentence; decimal points survive
    return span.strip().strip("$").strip().rstrip(",;:").strip()


def extract_final_answer(text: str) -> str | None:
    """The final-answer span of a generated solution, or None when nothing looks like one.

    Priority: last ``\\boxed{}``; the first ``#### x`` line; the last "(final) answer is x";
    the last number in the text (GSM8K-style fallback).
    """
    if not text or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed:
        return boxed
    m = _HASHES.search(text)
    if m and m.group(1).strip():
        return _clean_span(m.group(1))
    found = _ANSWER_IS.findall(text)
    for span in reversed(found):
        span = _clean_span(span)
        if span:
            return span
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace("$", "").rstrip(".,")
    return None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parse(span: str) -> tuple:
    """math-verify parse of one answer span (wrapped in ``\\boxed{}`` so LaTeX and plain both parse)."""
    from math_verify import parse

    timeout = 5 if _in_main_thread() else None  # math-verify's timeout uses SIGALRM (main thread only)
    return tuple(parse("\\boxed{" + span + "}", parsing_timeout=timeout))


def answers_equivalent(gold: str | None, pred: str | None) -> bool:
    """Whether ``pred`` equals ``gold`` per math-verify (``gold`` first: the check is not symmetric)."""
    if gold is None or pred is None or not gold.strip() or not pred.strip():
        return False
    from math_verify import verify

    g, p = _parse(gold.strip()), _parse(pred.strip())
    if not g or not p:
        return gold.strip() == pred.strip()
    timeout = 5 if _in_main_thread() else None
    return bool(verify(list(g), list(p), timeout_seconds=timeout))


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def extract_choice_letter(text: str, n_choices: int) -> int | None:
    """0-based choice index named by a generated answer ("B", "(B)", "Answer: B", "the answer is B.")."""
    if not text:
        return None
    valid = LETTERS[:n_choices]
    cls = f"[{valid}]"
    patterns = [
        rf"answer\s*(?:is|:)\s*:?\s*\(?({cls})\b",
        rf"^\s*\(?({cls})\)?(?:[.):\s]|$)",
        rf"\(({cls})\)",
        rf"\b({cls})\b",
    ]
    for pat in patterns:
        m = re.search(pat, text, flags=re.IGNORECASE if pat.startswith("answer") else 0)
        if m:
            return valid.index(m.group(1).upper())
    return None
