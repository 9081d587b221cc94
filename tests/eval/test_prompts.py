"""Prompt templates: trailing-newline handling, shots before the item, and reference continuations."""

from __future__ import annotations

import dataclasses

from ttadapt.eval.datasets import Example
from ttadapt.eval.evaluate import _continuation
from ttadapt.eval.methods import truncate_at_stops
from ttadapt.eval.prompts import build_prompt

HE = Example(
    id="h0",
    task="t",
    kind="code",
    prompt='def f(x):\n    """Double."""\n',
    reference="    return 2 * x\n",
    tests="def check(c):\n    assert c(2) == 4\n",
    entry_point="f",
    prompt_in_program=True,
)
HE2 = Example(
    id="h1",
    task="t",
    kind="code",
    prompt='def g(x):\n    """Neg."""\n',
    reference="    return -x\n",
    tests="def check(c):\n    assert c(2) == -2\n",
    entry_point="g",
    prompt_in_program=True,
)
MC = Example(id="q", task="t", kind="mc", prompt="Which is red?", choices=("sky", "blood"), gold=1)


def test_trailing_newline_is_cut_and_kept_for_the_continuation() -> None:
    p = build_prompt(HE, "humaneval")
    assert p.text == HE.prompt.rstrip("\n") and p.stripped == "\n" and p.target_text == p.text
    assert _continuation(HE, "humaneval", p, "loglik") == "\n    return 2 * x"
    kept = build_prompt(HE, "humaneval", strip_trailing_newline=False)
    assert kept.text == HE.prompt and kept.stripped == ""


def test_shots_precede_the_item_with_solutions() -> None:
    p = build_prompt(HE, "humaneval", [HE2])
    assert p.text.startswith(HE2.prompt + HE2.reference.rstrip("\n") + "\n\n")
    assert p.target_text == HE.prompt.rstrip("\n") and p.shot_ids == ("h1",)
    assert "return 2 * x" not in p.text  # never the item's own solution


def test_multiple_choice_formats() -> None:
    ll = build_prompt(MC, "arc", [dataclasses.replace(MC, id="q2", prompt="Which is blue?", gold=0)])
    assert ll.text.endswith("Question: Which is red?\nAnswer:") and "Answer: sky" in ll.text
    gen = build_prompt(MC, "arc", mc_mode="generate")
    assert gen.text == "Question: Which is red?\n A. sky\n B. blood\nAnswer:"
    assert _continuation(MC, "arc", gen, "generate") == " B"
    assert _continuation(MC, "arc", build_prompt(MC, "arc"), "loglik") == " blood"


def test_stop_strings_ignore_leading_whitespace() -> None:
    assert truncate_at_stops("\n    return 1\n\nprint(f(2))", ("\nprint",)) == "\n    return 1\n"
    assert truncate_at_stops("\n# comment\n", ("\n#",)) == "\n# comment\n"  # a stop at the very start is skipped
    assert truncate_at_stops("7 apples.\n\nQuestion: next", ("Question:", "\n\n")) == "7 apples."
