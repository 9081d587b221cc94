"""The HF trainer adapts a round's sequences in one padded batch, equal to adapting each alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoeConfig

import ttadapt
from ttadapt.generation import Rerouter
from ttadapt.vllm.trainers import AdaptJob, HFTrainer

CFG = ttadapt.RerouteConfig(steps=3, lr=0.5, selection="top_C", ratio=0.5, guard=False, min_tokens=4, interval=4)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _jobs(chunk: int, lengths: list[int], seed: int = 0) -> list[AdaptJob]:
    g = torch.Generator().manual_seed(seed)
    return [AdaptJob(seq=s, context=torch.randint(2, 96, (n,), generator=g).tolist(), prompt_len=n, chunk=chunk)
            for s, n in enumerate(lengths)]


def _batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    adapt = Rerouter.adapt

    def counted(self: Rerouter, ids: torch.Tensor, *a: object, **k: object) -> object:
        sizes.append(ids.shape[0])
        return adapt(self, ids, *a, **k)

    monkeypatch.setattr(Rerouter, "adapt", counted)
    return sizes


def test_a_round_is_one_batch_equal_to_each_sequence_alone(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _batch_sizes(monkeypatch)
    together = HFTrainer(model, CFG)
    first, second = _jobs(0, [9, 14, 11]), _jobs(1, [13, 18, 15], seed=1)
    got = together.adapt(first) + together.adapt(second)
    assert sizes == [3, 3]
    for i in range(3):  # each sequence alone, warm-started from its own first round
        alone = HFTrainer(model, CFG)
        want = alone.adapt([first[i]]) + alone.adapt([second[i]])
        for g, w in zip(got[i::3], want):
            assert g.batch_size is None and w.delta.abs().sum() > 0
            torch.testing.assert_close(g.delta, w.delta, atol=1e-4, rtol=1e-4)
        t = together.traces[(i, 1)]
        assert t.position == len(second[i].context) and t.delta_mean_abs == pytest.approx(float(got[3 + i].delta.abs().mean()))
        assert t.selected_layers == alone.traces[(i, 1)].selected_layers


def test_forks_short_contexts_and_other_loss_masks(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _batch_sizes(monkeypatch)
    tr = HFTrainer(model, CFG)
    (s0,) = tr.adapt(_jobs(0, [12]))
    tr.fork(0, 1)  # sample 1 starts where sample 0 is
    jobs = _jobs(1, [16, 16, 3], seed=2)  # the third is too short to adapt: alone (skipped), not in the batch
    a, b, short = tr.adapt(jobs)
    assert sizes == [1, 2, 1] and tr.traces[(2, 1)].skipped is not None and not short.delta.any()
    alone = HFTrainer(model, CFG)
    alone.adapt(_jobs(0, [12]))
    (want,) = alone.adapt([AdaptJob(seq=0, context=jobs[1].context, prompt_len=16, chunk=1)])
    torch.testing.assert_close(b.delta, want.delta, atol=1e-4, rtol=1e-4)  # warm-started from sample 0's state
    assert s0.delta.any() and not torch.equal(a.delta, b.delta)
    sizes.clear()
    HFTrainer(model, CFG.replace(loss_mask="generated")).adapt(_jobs(1, [16, 16]))
    assert sizes == [1, 1]  # a per-row prompt boundary: one sequence at a time
