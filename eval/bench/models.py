"""Models for benchmarks: the embedded trained tiny OLMoE, or random weights at a real shape."""

from __future__ import annotations

from typing import Any

import torch

#: Real configurations (speed does not depend on the weights): OLMoE-1B-7B = transformers' OlmoeConfig defaults.
SHAPES: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304),
    "tiny": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=256),
}


def build(name: str, *, device: str, dtype: torch.dtype, layers: int | None = None, seed: int = 0) -> tuple[Any, int]:
    """Return (model in eval mode, vocab size). ``name`` is ``embedded``, a local path, or a key of SHAPES."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    if name in SHAPES:
        kw = dict(SHAPES[name])
        if layers:
            kw["num_hidden_layers"] = layers
        cfg = OlmoeConfig(**kw, max_position_embeddings=8192, eos_token_id=None, bos_token_id=None, pad_token_id=0)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        from ttadapt.demo import embedded_model_path

        path = embedded_model_path() if name == "embedded" else name
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, model.config.vocab_size
