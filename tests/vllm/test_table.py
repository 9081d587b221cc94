"""The worker-side router table without an engine: row bookkeeping and the hook's arithmetic.

Only the last test needs vLLM (for its BatchUpdate types); the rest run anywhere.
"""

from __future__ import annotations

import random
import types
from typing import Any

import numpy as np
import pytest
import torch

from ttadapt.patches.logit_edit import LogitEdit
from ttadapt.vllm.payload import Layout, decode, encode, steer_payload
from ttadapt.vllm.plugin import RouterTable

LAYOUT = Layout(layer_ids=(0, 2, 3), num_experts=6)
R = 5  # max_num_reqs


def _table(dynamic: bool = True, margin: float = 0.01) -> RouterTable:
    return RouterTable(
        layout=LAYOUT,
        bias=torch.zeros(R + 1, 3, 6),
        force=torch.zeros(R + 1, 3, 6, dtype=torch.int8),
        rows=torch.zeros(64, dtype=torch.long),
        margin=margin,
        dynamic=dynamic,
    )


def _params(values: Any) -> Any:
    return types.SimpleNamespace(extra_args=None if values is None else {"ttadapt": values})


def _rand_payload(rng: np.random.Generator, force: bool = False) -> list[float | int]:
    ids = sorted(rng.choice([0, 2, 3], size=int(rng.integers(1, 4)), replace=False).tolist())
    bias = rng.normal(size=(len(ids), 6)).astype(np.float32)
    f = rng.integers(-1, 2, size=bias.shape) if force else None
    return encode(ids, bias, f)


def _dense(values: list[float | int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    bias, force = torch.zeros(3, 6), torch.zeros(3, 6, dtype=torch.int8)
    if values is not None:
        p = decode(values, LAYOUT)
        for i, lid in enumerate(p.layer_ids):
            s = LAYOUT.layer_ids.index(lid) if lid != -1 else slice(None)
            bias[s] = torch.from_numpy(p.bias[i])
            if p.force is not None:
                force[s] = torch.from_numpy(p.force[i])
    return bias, force


def test_rows_follow_removed_added_moved_swapped() -> None:
    rng = np.random.default_rng(0)
    pyrng = random.Random(0)
    t = _table()
    expect: dict[int, list[float | int] | None] = {}
    for _ in range(300):
        op = pyrng.choice(["add", "add", "remove", "move", "swap"])
        a, b = pyrng.randrange(R), pyrng.randrange(R)
        if op == "add":
            v = None if pyrng.random() < 0.3 else _rand_payload(rng, force=pyrng.random() < 0.5)
            t.set_from_params(a, _params(v))
            expect[a] = v
        elif op == "remove":
            t.clear(a)
            expect.pop(a, None)
        elif op == "move" and a != b:
            t.move(a, b)
            expect[b] = expect.pop(a, None)
        elif op == "swap" and a != b:
            t.swap(a, b)
            expect[a], expect[b] = expect.get(b), expect.get(a)
        for row in range(R + 1):
            bias, force = _dense(expect.get(row))
            assert torch.equal(t.bias[row], bias), (op, row)
            assert torch.equal(t.force[row], force), (op, row)
            assert t.row_active[row] == (expect.get(row) is not None and not decode(expect[row]).is_zero())
    assert not t.bias[R].any()  # the spare row is never written


def test_all_layers_payload_and_bad_payload_ignored() -> None:
    t = _table()
    t.set_from_params(1, _params(steer_payload(promote=[4], num_experts=6, bias=2.0)))
    assert t.bias[1, :, 4].tolist() == [2.0, 2.0, 2.0]
    t.set_from_params(1, _params([1, 1, 6, 0, 7] + [0.0] * 6))  # unknown layer slipped past admission
    assert t.rejected == 1 and not t.bias[1].any() and not t.row_active[1]


@pytest.mark.parametrize("dynamic", [True, False])
def test_hook_equals_hf_logit_edit(dynamic: bool) -> None:
    """Per token: logits + bias[row], then forcing, exactly as the HF patch's LogitEdit."""
    rng = np.random.default_rng(1)
    t = _table(dynamic=dynamic, margin=0.5)
    payloads = {0: _rand_payload(rng, force=True), 2: _rand_payload(rng), 3: None}
    for row, v in payloads.items():
        t.set_from_params(row, _params(v))
    rows = torch.tensor([0, 0, 2, 3, 3, 3, 2, 0])
    t.rows[: len(rows)] = rows
    t.rows[len(rows) :] = 4  # stale entries past the real tokens must not matter
    for slot in range(3):
        hook = t.make_hook(slot)
        logits = torch.randn(len(rows), 6)
        out = hook(None, (None,), (logits, None))
        new = out[0] if out is not None else logits
        for i, row in enumerate(rows.tolist()):
            bias, force = _dense(payloads[row])
            edit = LogitEdit(
                bias=bias[slot],
                force_in=force[slot].eq(1) if force[slot].any() else None,
                force_out=force[slot].eq(-1) if force[slot].any() else None,
                margin=0.5,
            )
            assert torch.equal(new[i], edit(logits[i : i + 1])[0]), (slot, i)


def test_eager_hook_is_a_no_op_without_active_rows() -> None:
    t = _table(dynamic=True)
    assert t.make_hook(0)(None, (None,), (torch.randn(3, 6), None)) is None
    assert t.calls == 0


def test_update_state_order() -> None:
    pytest.importorskip("vllm")
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from ttadapt.vllm import plugin
    from ttadapt.vllm.logits_processor import TTAdaptLogitsProcessor

    cfg = object()
    t = _table()
    plugin._runtimes[id(cfg)] = t
    try:
        proc = TTAdaptLogitsProcessor(cfg, torch.device("cpu"), False)
        a = steer_payload(promote=[1], num_experts=6, bias=1.0)
        b = steer_payload(promote=[2], num_experts=6, bias=1.0)
        added = [(0, _params(a), [], []), (1, _params(b), [], [])]
        proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
        # Row 0 finishes; a new request lands in row 0; then rows 0 and 1 swap.
        proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[(0, _params(None), [], [])],
                                      moved=[(0, 1, MoveDirectionality.SWAP)]))
        assert t.bias[0, 0, 2] == 1.0 and not t.bias[1].any()
        # Row 0 finishes and row 1 is condensed into it.
        moved = [(1, 0, MoveDirectionality.UNIDIRECTIONAL)]
        proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=moved))
        assert not t.bias.any()
        assert proc.apply(torch.ones(2, 3)).sum() == 6 and proc.is_argmax_invariant()
    finally:
        plugin._runtimes.pop(id(cfg), None)
