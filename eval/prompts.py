"""Prompt templates per task and deterministic ICL shot selection (never the evaluated item).

A prompt is ``shot + "\\n\\n" + ... + target``. A trailing newline is cut from the model input by
default and prepended to what is scored or generated, because byte-level BPEs (tiny-olmoe's
included) merge a newline with the next line's indentation, so text ending in ``"\\n"`` is unusual
input; the cut part is kept in :attr:`Prompt.stripped` so programs and NLL spans stay exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .answers import LETTERS
from .datasets import Example, TaskData

MCMode = Literal["loglik", "generate"]
TEMPLATES = ("humaneval", "mbpp", "code", "gsm8k", "math", "mmlu", "arc", "mc")


@dataclass(frozen=True)
class Prompt:
    """The model input ``text``; the item's own render starts at ``target_start``; ``stripped`` was cut off the end."""

    text: str
    target_start: int
    stripped: str
    shot_ids: tuple[str, ...]

    @property
    def target_text(self) -> str:
        """The evaluated item's own render (no shots), as the model sees it."""
        return self.text[self.target_start :]


def _code_desc(ex: Example) -> str:
    tests = "\n".join(ex.visible_tests)
    return f'"""\n{ex.prompt}\n{tests}\n"""\n' if tests else f'"""\n{ex.prompt}\n"""\n'


def _mc_question(ex: Example, mode: MCMode) -> str:
    if mode == "loglik":
        return f"Question: {ex.prompt}\nAnswer:"
    opts = "".join(f" {LETTERS[i]}. {c}\n" for i, c in enumerate(ex.choices))
    return f"Question: {ex.prompt}\n{opts}Answer:"


def render(ex: Example, template: str, *, with_answer: bool, mc_mode: MCMode = "loglik") -> str:
    """One item in the task's format, followed by its gold solution when ``with_answer`` (for shots)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if template in ("humaneval", "mbpp", "code"):
        in_program = template == "humaneval" or (template == "code" and ex.prompt_in_program)
        head = ex.prompt if in_program else _code_desc(ex)
        if not with_answer:
            return head
        if ex.reference is None:
            raise ValueError(f"example {ex.id!r} has no reference solution, so it cannot be an ICL shot")
        sol = ex.reference if ex.reference.endswith("\n") else ex.reference + "\n"
        return head + sol
    if template in ("gsm8k", "math"):
        head = f"Question: {ex.prompt}\nAnswer:" if template == "gsm8k" else f"Problem:\n{ex.prompt}\n\nSolution:"
        if not with_answer:
            return head
        ref = ex.reference if ex.reference is not None else f"The answer is {ex.answer}."
        return f"{head} {ref.strip()}"
    head = _mc_question(ex, mc_mode)
    if not with_answer:
        return head
    assert ex.gold is not None
    return f"{head} {ex.choices[ex.gold] if mc_mode == 'loglik' else LETTERS[ex.gold]}"


def build_prompt(
    ex: Example,
    template: str,
    shots: Sequence[Example] = (),
    *,
    mc_mode: MCMode = "loglik",
    strip_trailing_newline: bool = True,
) -> Prompt:
    """Shots then the target item; a MMLU prompt starts with the usual subject header."""
    header = ""
    if template == "mmlu" and ex.meta.get("subject"):
        subject = str(ex.meta["subject"]).replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    parts = [render(s, template, with_answer=True, mc_mode=mc_mode).rstrip("\n") for s in shots]
    prefix = header + "".join(p + "\n\n" for p in parts)
    target = render(ex, template, with_answer=False, mc_mode=mc_mode)
    text = prefix + target
    stripped = ""
    if strip_trailing_newline:
        kept = text.rstrip("\n")
        if kept.strip():
            stripped, text = text[len(kept) :], kept
    return Prompt(text=text, target_start=len(prefix), stripped=stripped, shot_ids=tuple(s.id for s in shots))


def select_shots(data: TaskData, ex: Example, k: int, seed: int) -> list[Example]:
    """``k`` shots for ``ex``, drawn deterministically from (seed, task, item id).

    The pool is the task's train/dev split (same MMLU subject) when it has at least ``k`` items,
    otherwise the other evaluation items. The evaluated item (same id or same prompt) is never drawn.
    """
    if k < 0:
        raise ValueError(f"shots must be >= 0, got {k}")
    if k == 0:
        return []
    subject = ex.meta.get("subject")
    pool = [s for s in data.shot_pool if subject is None or s.meta.get("subject") == subject]
    if len(pool) < k:
        pool = list(data.examples)
    pool = [s for s in pool if s.id != ex.id and s.prompt != ex.prompt and (s.kind != "code" or s.reference)]
    if len(pool) < k:
        raise ValueError(f"task {data.name!r} has only {len(pool)} possible shots for {ex.id!r}, fewer than {k}")
    rng = random.Random(f"{seed}|{data.name}|{ex.id}")
    return rng.sample(pool, k)
