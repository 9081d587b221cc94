"""Generic interception: add the edit to the first E-wide linear-like op a router runs.

Exact for any router whose logits are its first matmul with ``E`` outputs (42 transformers model
types were checked, see the internals notes). Costs ~40-60 us per router call, so hand-written
styles are preferred where they exist; this is the fallback and the cross-check in tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .logit_edit import LogitEdit

_LINEAR_LIKE = frozenset(
    {
        F.linear,
        torch.matmul,
        torch.mm,
        torch.addmm,
        torch.bmm,
        torch.einsum,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch._C.TensorBase.matmul,
        torch._C.TensorBase.__matmul__,
    }
)


class _EditFirstLogits(TorchFunctionMode):
    def __init__(self, edit: LogitEdit, num_classes: int) -> None:
        super().__init__()
        self.edit = edit
        self.num_classes = num_classes
        self.hit = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if (
            not self.hit
            and func in _LINEAR_LIKE
            and isinstance(out, torch.Tensor)
            and out.dim() >= 1
            and out.shape[-1] == self.num_classes
        ):
            self.hit = True
            out = self.edit(out)
        return out


def generic_forward(router: nn.Module, orig_forward: Any, num_classes: int, edit: LogitEdit, args, kwargs):
    """Run ``orig_forward`` with ``edit`` applied to the router logits; fail loudly on a miss."""
    mode = _EditFirstLogits(edit, num_classes)
    with mode:
        out = orig_forward(*args, **kwargs)
    if not mode.hit:
        raise RuntimeError(
            f"ttadapt: no {num_classes}-wide linear op ran inside {type(router).__name__}; the router "
            "bias was not applied. This transformers version changed the router: please report it."
        )
    return out
