"""Run generated code in a separate Python process with a timeout, rlimits, a temp cwd and no secrets.

Nothing generated is ever ``exec``'d in-process. Each program runs as ``python -I -B guard.py`` (which runs
``program.py``) in a fresh temporary directory, in its own session (the whole process group is SIGKILLed on timeout and
after exit), with a minimal environment (no inherited variables, so no tokens or keys), and a guard
preamble that sets memory/CPU/file-size rlimits and disables process spawning and destructive
``os``/``shutil`` calls. This contains accidents (loops, memory bombs, ``os.system``, ``rm``) — it is
not a security boundary against adversarial code; run untrusted models inside a container as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "killed"]


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall-clock timeout, address space, CPU seconds, written file size, workers."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    cpu_s: int | None = None  # default: ceil(timeout_s) + 1
    file_size_mb: int = 16
    workers: int = 1
    python: str = sys.executable

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter needs ~30 MB), got {self.memory_mb}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s must be >= 1 or None, got {self.cpu_s}")
        if self.file_size_mb < 1:
            raise ValueError(f"file_size_mb must be >= 1, got {self.file_size_mb}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 2

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("python")
        return d


#: What the sandbox's temporary directory is called in a program's output.
SANDBOX_DIR = "<sandbox>"


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed program; ``passed`` means it exited 0 within its limits."""

    status: Status
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_BLOCKED_OS = (
    "system",
    "popen",
    "fork",
    "forkpty",
    "kill",
    "killpg",
    "putenv",
    "unsetenv",
    "remove",
    "removedirs",
    "rmdir",
    "unlink",
    "rename",
    "renames",
    "replace",
    "truncate",
    "chmod",
    "fchmod",
    "lchmod",
    "chown",
    "fchown",
    "lchown",
    "chroot",
    "fchdir",
    "setuid",
    "setgid",
    "seteuid",
    "setegid",
    "setsid",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
)


def guard_preamble(limits: SandboxLimits) -> str:
    """The launcher ``guard.py``: rlimits first, spawning/destructive calls disabled, then ``program.py`` runs."""
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.file_size_mb * 1024 * 1024
    return f"""\
import resource as _r, os as _os, sys as _sys, builtins as _b, shutil as _sh, subprocess as _sp
for _lim, _val in ((_r.RLIMIT_AS, {mem}), (_r.RLIMIT_DATA, {mem}), (_r.RLIMIT_CPU, {limits.cpu_seconds}),
                   (_r.RLIMIT_FSIZE, {fsize}), (_r.RLIMIT_CORE, 0)):
    _r.setrlimit(_lim, (_val, _val))
def _ttadapt_blocked(*_a, **_k):
    raise PermissionError("disabled in the ttadapt eval sandbox")
for _n in {_BLOCKED_OS!r}:
    if hasattr(_os, _n):
        setattr(_os, _n, _ttadapt_blocked)
_sh.rmtree = _sh.move = _sh.chown = _ttadapt_blocked
for _n in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(_sp, _n, _ttadapt_blocked)
for _m in ("resource", "ctypes", "_ctypes", "psutil", "multiprocessing", "pty"):
    _sys.modules[_m] = None
_b.help = None
del _lim, _val, _n, _m, _r, _os, _sys, _b, _sh, _sp
import runpy as _runpy
_runpy.run_path("program.py", run_name="__main__")
"""


def scrubbed_env(tmp: str) -> dict[str, str]:
    """A minimal environment: nothing inherited from the parent (no tokens, keys or proxies)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": tmp,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
    }


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_program(source: str, limits: SandboxLimits | None = None) -> ExecResult:
    """Run ``source`` in a fresh sandboxed interpreter and classify the outcome (never raises for bad code)."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="ttadapt-sbx-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "program.py").write_text(source, encoding="utf-8")
        guard = tmp_path / "guard.py"
        guard.write_text(guard_preamble(limits), encoding="utf-8")
        out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        start = time.monotonic()
        timed_out = False
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                [limits.python, "-I", "-B", str(guard)],
                cwd=tmp,
                env=scrubbed_env(tmp),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            finally:
                _kill_group(proc.pid)  # anything the program left behind in its session
        duration = time.monotonic() - start
        # The temp dir's random name would make records of the same run differ; tracebacks name "<sandbox>".
        stdout, stderr = (_tail(p).replace(tmp, SANDBOX_DIR) for p in (out_path, err_path))
    status: Status
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == 0:
        status = "passed"
    elif "MemoryError" in stderr:
        status = "memory"
    elif rc is not None and rc < 0:
        status = "killed"
    else:
        status = "failed"
    return ExecResult(status, rc, round(duration, 4), stdout, stderr)


def run_programs(sources: Sequence[str], limits: SandboxLimits | None = None) -> list[ExecResult]:
    """Run several programs (``limits.workers`` at a time); results keep the input order."""
    limits = limits or SandboxLimits()
    if limits.workers == 1 or len(sources) <= 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(max_workers=limits.workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
