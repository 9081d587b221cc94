"""Shared test fixtures: tiny random models of every registered MoE family.

``TINY_CONFIGS[model_type]()`` returns the config of a tiny fp32 model of that family (2-3 decoder
layers with at least 2 MoE layers, hidden 32, 8 experts, top-2 unless the family requires top-1,
vocab 128; grouped routers get 2 groups). ``build_tiny(model_type, seed)`` builds it in eval mode.
Tests get models through the ``tiny_model`` fixture, which caches one instance per (family, seed) for
the session and unpatches whatever a test left patched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import ttadapt

# Tiny models: one intra-op thread is fastest, and avoids OpenMP oversubscription (100x slowdowns)
# when the 2-core machine is shared with other jobs.
torch.set_num_threads(1)

VOCAB = 128

# Keys set on every config that defines them (probed on the default config).
_COMMON: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, num_experts=8,
    num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=128, shared_expert_intermediate_size=16,
    n_shared_experts=1, moe_num_experts=8, moe_topk=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Multi-head latent attention (DeepSeek-V2/V3 style attention).
_MLA: dict[str, Any] = dict(
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    qk_head_dim=16, head_dim=8, num_key_value_heads=2,  # MLA expands keys to every head, as real configs say
)
_DSA: dict[str, Any] = dict(_MLA, index_topk=4, index_head_dim=16, index_n_heads=2, num_key_value_heads=2)
_LINEAR_ATTN: dict[str, Any] = dict(
    layer_types=["linear_attention", "full_attention", "linear_attention"], linear_key_head_dim=8,
    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
)

_INKLING2: dict[str, Any] = dict(
    unpadded_vocab_size=VOCAB, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
    sliding_window_size=16, n_layers_per_attn_res_block=1,
)

# Per-family overrides (merged over the probed common keys).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(_MLA, topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "deepseek_v3": _MLA,
    "deepseek_v32": _DSA,
    "glm4_moe_lite": _MLA,
    "glm_moe_dsa": _DSA,
    "axk1": _MLA,
    "axk2": dict(_DSA, gated_norm_rank=4),
    "mistral4": dict(
        _MLA, num_key_value_heads=2,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "llama_4_scaling_beta": 0.1, "original_max_position_embeddings": 128,
        },
    ),
    "deepseek_v4": dict(
        mlp_layer_types=["hash_moe", "moe", "moe"], head_dim=16, q_lora_rank=16, o_groups=2, o_lora_rank=16,
        index_n_heads=2, index_head_dim=16, index_topk=8, sliding_window=16, hc_mult=2, hc_sinkhorn_iters=2,
    ),
    "kimi_linear": dict(
        _MLA, num_key_value_heads=2, num_experts_per_token=2, num_expert_group=2, topk_group=1,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"], linear_head_dim=8, linear_num_heads=2,
    ),
    "dbrx": dict(
        d_model=32, n_heads=2, n_layers=3, max_seq_len=128,
        attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2),
    ),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=12),
    "granitemoehybrid": dict(
        layer_types=["linear_attention", "full_attention", "full_attention"], mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, mamba_expand=2, mamba_chunk_size=16, shared_intermediate_size=16,
    ),
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
        mamba_d_state=4, mamba_dt_rank=4, mamba_expand=2,
    ),
    "qwen3_next": _LINEAR_ATTN,
    "qwen3_5_moe_text": _LINEAR_ATTN,
    "qwen4_exp_text": dict(
        _LINEAR_ATTN, layer_types=["linear_attention", "indexed_attention", "linear_attention"], hc_count=2,
        hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
        indexer_compress_ratio=2,
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "nemotron_h": dict(layers_block_type=["full_attention", "moe", "moe"], moe_shared_expert_intermediate_size=16),
    "laguna": dict(moe_router_logit_softcapping=30.0),
    "inkling_text": dict(
        swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16, sliding_window_size=16,
        d_rel=4, rel_extent=16, n_shared_experts=1,
    ),
    "hunyuan_v1_moe": dict(moe_topk=2),
    # Families added after transformers 5.19 (skipped on releases without them).
    "bailing_hybrid": dict(
        _MLA, layer_types=["linear_attention", "full_attention", "linear_attention"], layer_group_size=2,
        mlp_layer_types=["dense", "sparse", "sparse"], num_experts_per_token=2, num_expert_group=2,
        linear_head_dim=8, linear_num_heads=2, num_shared_experts=1, expert_swiglu_limit_list=[0, 0, 0],
        share_expert_swiglu_limit_list=[0, 0, 0], num_nextn_predict_layers=0,
    ),
    "beam": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16,
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    "flint": dict(mlp_only_layers=[0], layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=16),
    "inkling2_text": dict(_INKLING2, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"]),
    "kolibri1_1": dict(
        layer_types=["sliding_attention", "indexed_attention", "sliding_attention"], index_layers=[1],
        kv_source_layers=[0, 1, 2], index_num_heads=2, index_topk=8, index_pool_size=64, index_compression=2,
        index_num_local_tokens=4, index_num_sink_tokens=2, mlp_only_layers=[0], mlp_only_intermediate_size=32,
        sliding_window=16,
    ),
}
# Overrides for transformers releases whose config rejects the ones above (Qwen4-Exp's indexed attention
# layers arrived in 5.18).
_OLDER_RELEASES: dict[str, dict[str, Any]] = {
    "qwen4_exp_text": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
}
# Families whose config must be given exactly (probing the defaults is not possible or misleading).
_EXACT: dict[str, dict[str, Any]] = {
    "gemma4_text": dict(
        hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, global_head_dim=16, vocab_size=VOCAB, enable_moe_block=True, num_experts=8, top_k_experts=2,
        moe_intermediate_size=16, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "longcat_flash": dict(
        _MLA, hidden_size=32, num_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
        ffn_hidden_size=32, expert_ffn_hidden_size=16, n_routed_experts=8, zero_expert_num=2, moe_topk=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}
# Families built from their class because AutoModelForCausalLM does not map them.
_MODEL_CLASS = {"mistral4": "Mistral4ForCausalLM"}


def _config_factory(model_type: str) -> Callable[[], Any]:
    def make() -> Any:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
        if model_type in _EXACT:
            return cls(**_EXACT[model_type])
        base = cls()
        kwargs = {}
        for key, value in _COMMON.items():
            try:
                present = hasattr(base, key)
            except Exception:  # per-layer attributes raise on global access
                present = False
            if present:
                kwargs[key] = value
        kwargs.update(_OVERRIDES.get(model_type, {}))
        try:
            return cls(**kwargs)
        except Exception:  # ValueError, or huggingface_hub's strict-dataclass validation error
            if model_type not in _OLDER_RELEASES:
                raise
            return cls(**{**kwargs, **_OLDER_RELEASES[model_type]})

    return make


#: Every family the tests build (the registry-completeness test demands it equals the registry).
FAMILIES: tuple[str, ...] = (
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "dbrx", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note_text", "ergo", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "flint", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss",
    "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4",
    "inkling_text", "inkling2_text", "jamba", "jetmoe", "kimi_linear", "kolibri1",
    "kolibri1_1", "laguna", "lara_mini", "lfm2_moe", "llama4_text", "longcat_flash", "mellum", "mimo_v2_flash",
    "minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl_text", "mistral4", "mixtral", "nemotron_h", "olmoe",
    "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp_text", "solar_open", "zaya",
)

#: model_type -> zero-argument callable returning the tiny config of that family.
TINY_CONFIGS: dict[str, Callable[[], Any]] = {mt: _config_factory(mt) for mt in FAMILIES}


def build_tiny(model_type: str, seed: int = 0) -> nn.Module:
    """A fresh tiny fp32 eval-mode model of ``model_type`` with weights drawn from ``seed``; skips the test
    when the installed transformers lacks the family or predates the layout its patch binds to."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    try:
        ttadapt.model_info.check_transformers(ttadapt.patches.get_spec(model_type))
    except ttadapt.UnsupportedModelError as exc:
        pytest.skip(str(exc))

    config = TINY_CONFIGS[model_type]()
    torch.manual_seed(seed)
    if model_type in _MODEL_CLASS:
        model = getattr(transformers, _MODEL_CLASS[model_type])(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model = model.float().eval()
    _randomise_routing(model, seed)
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.bos_token_id = None
    return model


def _randomise_routing(model: nn.Module, seed: int) -> None:
    """Give zero-initialised router weights and correction biases small random values.

    Some families initialise their router weight (AFMoE, Ernie) or correction biases to zeros, so a
    random tiny model would route every token identically or never exercise the correction path.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    info = ttadapt.inspect_model(model)
    with torch.no_grad():
        for site in info.sites:
            for p in site.module.parameters():
                if p.dim() == 2 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")) and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)


_CACHE: dict[tuple[str, int], nn.Module] = {}


@pytest.fixture
def tiny_model() -> Iterator[Callable[..., nn.Module]]:
    """Factory ``tiny_model(model_type, seed=0)``; instances are shared per session, never left patched."""
    used: list[nn.Module] = []

    def get(model_type: str, seed: int = 0) -> nn.Module:
        key = (model_type, seed)
        if key not in _CACHE:
            _CACHE[key] = build_tiny(model_type, seed)
        model = _CACHE[key]
        ttadapt.unpatch(model)
        used.append(model)
        return model

    yield get
    for model in used:
        ttadapt.unpatch(model)


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, Callable[[], Any]]:
    """The ``TINY_CONFIGS`` table (for the registry-completeness test)."""
    return TINY_CONFIGS


@pytest.fixture(scope="session")
def fresh_model() -> Callable[..., nn.Module]:
    """``build_tiny`` itself: a new, never-cached instance (for tests that need their own copy)."""
    return build_tiny
