"""Peak tensor memory of a call on CPU: the analogue of ``torch.cuda.max_memory_allocated``.

Process RSS on CPU mostly measures glibc's allocator history (freed heap is kept, not returned),
so it is a poor measure of what a method needs. The profiler's allocation events give the live
tensor bytes over time; their peak plus the bytes already held (weights) is what a GPU would report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def cpu_tensor_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensors allocated by ``fn`` and alive at once (not counting what existed before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError as e:  # private profiler API moved
        raise RuntimeError(f"this torch ({torch.__version__}) does not expose profiler memory events: {e}; "
                           "measure with --cpu-peak rss") from e
    live = peak = 0
    for _, nbytes in allocs:
        live += nbytes
        peak = max(peak, live)
    return peak
