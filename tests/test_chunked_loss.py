"""Chunked LM-head loss: equal to the full-logits loss (values and gradients), refused where logits are post-processed."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GraniteMoeConfig, OlmoeConfig

import ttadapt
from ttadapt.adapt import token_losses
from ttadapt.chunked_loss import LossHead


def _olmoe() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_chunked_losses_and_gradients_equal_the_full_logits_path() -> None:
    model = _olmoe()
    ids = torch.randint(2, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    head = LossHead.for_model(model, x, chunk=5)  # chunks straddle the two rows
    assert head is not None
    with ttadapt.patch(model) as handle:
        handle.load_state(handle.new_state())
        grads = []
        for chunked in (True, False):
            with torch.enable_grad(), handle.trainable() as delta:
                ce = head(y, input_ids=x).losses if chunked else token_losses(model(input_ids=x).logits, y)
                (ce * torch.linspace(0.5, 1.5, ce.numel()).view_as(ce)).sum().backward()
                grads.append((ce.detach(), delta.grad.clone()))
    (c1, g1), (c0, g0) = grads
    assert c1.shape == (2, 36)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert float(g0.abs().sum()) > 0


def test_models_that_rescale_logits_keep_the_full_path() -> None:
    torch.manual_seed(0)
    cfg = GraniteMoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0, pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert LossHead.for_model(model, torch.randint(2, 128, (1, 9))) is None


class _Fp32Head(torch.nn.Linear):
    """A head that casts its input to its weight's dtype and returns fp32 (as Ergo's does)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype)).float()


def test_heads_with_their_own_forward_are_called_not_bypassed() -> None:
    model = _olmoe()
    old = model.lm_head
    model.lm_head = _Fp32Head(old.in_features, old.out_features, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    head = LossHead.for_model(model, x, chunk=4)  # F.linear(fp32 hidden, bf16 weight) would raise here
    assert head is not None
    with torch.no_grad():
        torch.testing.assert_close(head(y, input_ids=x).losses, token_losses(model(input_ids=x).logits, y))
