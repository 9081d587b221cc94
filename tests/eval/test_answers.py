"""Final-answer extraction and math-verify equivalence on a fixed table of tricky GSM8K/MATH outputs."""

from __future__ import annotations

import pytest

from ttadapt.eval.answers import answers_equivalent, extract_choice_letter, extract_final_answer, last_boxed

EXTRACT = [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("#### 1,000\nQuestion: next", "1,000"),
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("first \\boxed{1} then corrected: \\boxed{2}", "2"),  # last box wins
    ("x = \\boxed{-2}. Also \\fbox{4}", "4"),
    ("The answer is \\boxed 7", "7"),
    ("The final answer is $[2,5)$. I hope it is correct.", "[2,5)"),
    ("Final Answer: The final answer is $24$. I hope it is correct.", "24"),
    ("The answer is 1,000.", "1,000"),
    ("The answer is $18.00$.", "18.00"),
    ("The answer is 3.5.", "3.5"),
    ("She has 5 apples and 3 pears, so 8 fruits in all.", "8"),  # last-number fallback
    ("It costs $12.50 per item", "12.50"),
    ("No digits at all here", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


EQUIV = [
    ("18", "18.00", True),
    ("1000", "1,000", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{3}{4}", "\\dfrac{3}{4}", True),
    ("\\frac{5}{2}", "2.5", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("[2,5)", "[2,5)", True),
    ("[2,5)", "(2,5)", False),
    ("5", "x = 5", True),
    ("-3", "3", False),
    ("2", "3", False),
    ("18", None, False),
    ("18", "", False),
]


@pytest.mark.parametrize(("gold", "pred", "same"), EQUIV)
def test_answers_equivalent(gold: str, pred: str | None, same: bool) -> None:
    assert answers_equivalent(gold, pred) is same


def test_extract_then_verify_end_to_end() -> None:
    out = "We add them. 1/4 + 1/4 = 1/2, so the final answer is $\\boxed{0.5}$."
    assert answers_equivalent("\\frac{1}{2}", extract_final_answer(out))
    assert not answers_equivalent("\\frac{1}{3}", extract_final_answer(out))


def test_last_boxed_unbalanced_returns_none() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2}") is None


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("B", 4, 1),
        (" (C) because", 4, 2),
        ("Answer: D", 4, 3),
        ("I think the answer is b.", 4, 1),
        ("E", 4, None),
        ("nothing", 4, None),
        ("", 4, None),
        ("C", 2, None),
    ],
)
def test_extract_choice_letter(text: str, n: int, expected: int | None) -> None:
    assert extract_choice_letter(text, n) == expected
