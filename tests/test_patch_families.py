"""The router patch, proven on a tiny random model of every registered MoE family.

Each test is parametrised over ``ttadapt.supported_model_types()``; the models come from the
``tiny_model`` fixture (tests/conftest.py). What is proven per family: exactness of the zero state
(logits and greedy generation, also with the edit path forced on), that a large bias forces and bans an
expert, hard forcing, gradients reaching ``delta`` only, KV-cache consistency under a non-zero state,
per-row independence, clean and complete unpatching, equality of hand-written styles with the generic
interception, ``bias_affects="selection"``, state files, and the routing recorder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ttadapt
import ttadapt.patches as patches_pkg
from ttadapt.hf_compat import CACHE_KW, output_cache
from ttadapt import (
    AlreadyPatchedError,
    RouterState,
    StateFileError,
    StateMismatchError,
    UnsupportedModelError,
)

FAMILIES = ttadapt.supported_model_types()
SPECS = patches_pkg.registered_specs()
HANDWRITTEN = [mt for mt in FAMILIES if SPECS[mt].style != "generic"]
SELECTION_ONLY = [mt for mt in FAMILIES if "selection" in SPECS[mt].selection_options]
SOFTMAX = [mt for mt in FAMILIES if SPECS[mt].scoring == "softmax"]

#: Hard forcing is best-effort where a group vote or a correction bias is applied after the edit:
#: a forced-in expert can lose its group (sum of the top-2 per group) or be outranked by corrected
#: scores. Everywhere else it is exact and asserted for every token.
GROUP_VOTE = {mt for mt in FAMILIES if SPECS[mt].style == "sigmoid_group"} | {"axk2", "beam", "minicpm5_moe", "mistral4"}
CORRECTION_BIAS = {
    "afmoe", "deepseek_v4", "ernie4_5_moe", "ergo", "hy_v3", "inkling_text", "inkling2_text",
    "kolibri1", "kolibri1_1", "laguna", "lfm2_moe", "longcat_flash", "minicpm5_moe", "minimax_m2",
    "minimax_m3_vl_text",
}
BEST_EFFORT_FORCING = GROUP_VOTE | CORRECTION_BIAS

#: PhiMoE's sparsemixer gives ``delta`` a gradient only from tokens with a near-tie (internals A.7).
WEAK_GRADIENT = {"phimoe"}

#: Experts in these families are plain per-expert loops over the tokens routed to each expert (no
#: ``set_experts_implementation``), so a change in one row's routing regroups the other rows' tokens and
#: can move their logits by float rounding (~1e-7).
ROW_COUPLED_EXPERTS = {"dbrx", "jetmoe", "longcat_flash"}

#: Families whose router returns no [T, k] indices (the block or a sorted tuple carries the choice);
#: the test reads the experts module's ``top_k_index`` argument instead.
EXPERTS_ARG_INDICES = {"dbrx": "ffn.experts", "jamba": "feed_forward.experts"}

SLOW = settings(
    max_examples=2,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------- helpers
def _ids(seed: int, batch: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _greedy(model: torch.nn.Module, ids: torch.Tensor, new: int = 3, **kw: object) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new, do_sample=False, **kw)


def _selectable(h: ttadapt.PatchHandle) -> int:
    """Classes a token can select (Inkling's last columns are always-on shared-expert gates)."""
    if h.model_type == "inkling_text":
        return h.info.sites[0].module.num_experts
    return h.num_experts


def _random_state(h: ttadapt.PatchHandle, seed: int, scale: float = 1.0, batch_size: int | None = None) -> RouterState:
    return _fill(h.new_state(batch_size), seed, scale)


def _fill(state: RouterState, seed: int, scale: float = 1.0) -> RouterState:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state.delta.copy_(torch.randn(state.delta.shape, generator=g) * scale)
    state.refresh()
    return state


def _selection_masks(h: ttadapt.PatchHandle, model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer, a bool [T, E] mask of the experts each token selected (from the recorder)."""
    with h.record() as rec:
        _logits(model, ids)
    sets = rec.selection_sets()
    return dict(zip(h.moe_layers, sets))


@contextlib.contextmanager
def _generic_spec(model_type: str) -> Iterator[None]:
    """Temporarily register ``model_type`` with the generic interception instead of its style."""
    registry = patches_pkg._REGISTRY
    original = registry[model_type]
    registry[model_type] = dataclasses.replace(original, style="generic", selection_options=("selection+weights",),
                                               bias_affects="selection+weights")
    try:
        yield
    finally:
        registry[model_type] = original


def _dense_weights(out: tuple, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[T, E] routing weights (0 where not selected) from a hand-written-style router output.

    The weights are always its second element, in the order of ``idx``.
    """
    w = out[1].reshape(idx.shape).float()
    return torch.zeros(idx.shape[0], num_classes).scatter_(1, idx.long(), w)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("model_type", FAMILIES)
@SLOW
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), length=st.integers(2, 8))
def test_zero_state_is_exact(tiny_model, model_type: str, seed: int, batch: int, length: int) -> None:
    model = tiny_model(model_type)
    ids = _ids(seed, batch, length)
    ref, ref_gen = _logits(model, ids), _greedy(model, ids)
    with ttadapt.patch(model) as h:
        assert torch.equal(_logits(model, ids), ref)
        assert torch.equal(_greedy(model, ids), ref_gen)
        h.state.mark_active()  # run every router through the edit path with all-zero vectors
        assert h.state.active_slots() == list(range(len(h.moe_layers)))
        assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_patch_covers_at_least_two_moe_layers(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    with ttadapt.patch(model) as h:
        assert len(h.moe_layers) >= 2
        assert h.state.delta.shape == (len(h.moe_layers), h.num_experts)
        for site in h.info.sites:
            assert site.module.__dict__["forward"].__ttadapt__


# ---------------------------------------------------------------------------------------------- forcing
@pytest.mark.parametrize("model_type", FAMILIES)
@SLOW
@given(data=st.data())
def test_large_bias_forces_and_bans_an_expert(tiny_model, model_type: str, data: st.DataObject) -> None:
    model = tiny_model(model_type)
    ids = _ids(0)
    with ttadapt.patch(model) as h:
        base = _selection_masks(h, model, ids)
        lid = data.draw(st.sampled_from(h.moe_layers), label="layer")
        counts = base[lid][:, : _selectable(h)].sum(0)
        # non-vacuous: the unpatched model selects e for some tokens but not all
        candidates = [e for e in range(_selectable(h)) if 0 < int(counts[e]) < ids.numel()]
        assert candidates, f"layer {lid}: every expert is selected by all or no tokens"
        e = data.draw(st.sampled_from(candidates), label="expert")
        slot = h.state.slot(lid)
        for sign in (1.0, -1.0):
            h.reset()
            with torch.no_grad():
                h.state.delta[slot, e] = sign * 1e4
            h.state.refresh()
            chosen = _selection_masks(h, model, ids)[lid][:, e]
            if sign > 0:
                assert chosen.all(), f"+1e4 on expert {e}: chosen by {int(chosen.sum())}/{chosen.numel()} tokens"
            else:
                assert not chosen.any(), f"-1e4 on expert {e}: still chosen by {int(chosen.sum())} tokens"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hard_forcing(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(1)
    with ttadapt.patch(model) as h:
        base = _selection_masks(h, model, ids)
        lid = h.moe_layers[-1]
        e = int(base[lid][:, : _selectable(h)].sum(0).argmin())  # the least used expert there
        e2 = int(base[lid][:, : _selectable(h)].sum(0).argmax())  # the most used one
        h.steer(promote=e, layers=[lid], hard=True)
        forced = _selection_masks(h, model, ids)
        rate, base_rate = forced[lid][:, e].float().mean(), base[lid][:, e].float().mean()
        assert base_rate < 1  # non-vacuous
        if model_type in BEST_EFFORT_FORCING:
            assert rate > base_rate
        else:
            assert forced[lid][:, e].all()
        for other in h.moe_layers[:-1]:  # earlier layers untouched
            assert torch.equal(forced[other], base[other])
        h.clear_steer()
        h.steer(suppress=e2, layers=[lid], hard=True)
        banned = _selection_masks(h, model, ids)
        assert base[lid][:, e2].any()
        assert not banned[lid][:, e2].any()
        h.clear_steer()
        assert h.state.is_zero()


# ---------------------------------------------------------------------------------------------- gradient
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradient_reaches_delta_only(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(2)
    params = list(model.parameters())
    flags = [i % 3 != 0 for i in range(len(params))]  # a non-trivial pattern to be restored
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    try:
        with ttadapt.patch(model) as h:
            with h.trainable() as delta:
                assert not any(p.requires_grad for p in params)
                assert delta.requires_grad and delta is h.state.delta
                loss = model(ids, labels=ids).loss
                loss.backward()
            assert [p.requires_grad for p in params] == flags
            assert all(p.grad is None for p in params)
            grad = delta.grad
            assert grad is not None and torch.isfinite(grad).all()
            per_layer = grad.abs().sum(dim=-1)
            if model_type in WEAK_GRADIENT:
                assert per_layer.shape == (len(h.moe_layers),)
            else:
                assert (per_layer > 0).all(), f"zero gradient on MoE layers {per_layer.tolist()}"
            assert not h.state.delta.requires_grad  # detached again after the block
    finally:
        for p in params:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------- caching
@pytest.mark.parametrize("model_type", FAMILIES)
def test_kv_cache_matches_no_cache_under_nonzero_state(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(3, batch=2, length=6)
    unbiased = _logits(model, ids)
    with ttadapt.patch(model) as h:
        h.load_state(_random_state(h, seed=7, scale=2.0))
        assert not torch.equal(_logits(model, ids), unbiased)  # the state is not a no-op
        with_cache = _greedy(model, ids, new=4, use_cache=True)
        without = _greedy(model, ids, new=4, use_cache=False)
        assert torch.equal(with_cache, without)


# ---------------------------------------------------------------------------------------------- per row
@pytest.mark.parametrize("model_type", FAMILIES)
@settings(max_examples=2, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 3), row=st.integers(0, 2))
def test_per_row_states_are_independent(fresh_model, model_type: str, seed: int, batch: int, row: int) -> None:
    row = row % batch
    model = fresh_model(model_type)
    # batched_mm computes every token-slot on its own; grouped_mm/eager regroup tokens per expert, so a
    # routing change in one row could move other rows by float rounding.
    with contextlib.suppress(Exception):
        model.set_experts_implementation("batched_mm")
    ids = _ids(seed, batch=batch, length=5)
    with ttadapt.patch(model) as h:
        state = h.load_state(_fill(RouterState.zeros(model, batch_size=batch), seed))
        before = _logits(model, ids)
        for i in range(batch):  # each row equals that row alone under the shared state of that row
            with h.use_state(state.row(i)):
                alone = _logits(model, ids[i : i + 1])
            torch.testing.assert_close(alone[0], before[i], rtol=0, atol=1e-5)
        changed = state.clone()
        with torch.no_grad():
            changed.delta[:, row] += 3.0 * torch.randn(changed.delta[:, row].shape, generator=torch.Generator().manual_seed(seed))
        changed.refresh()
        h.load_state(changed)
        after = _logits(model, ids)
        assert not torch.equal(after[row], before[row])
        for j in range(batch):
            if j == row:
                continue
            if model_type in ROW_COUPLED_EXPERTS:
                torch.testing.assert_close(after[j], before[j], rtol=0, atol=1e-5)
            else:
                assert torch.equal(after[j], before[j]), f"row {j} changed when only row {row}'s vector did"


def test_per_row_state_rejects_a_wrong_batch(tiny_model) -> None:
    model = tiny_model("olmoe")
    with ttadapt.patch(model) as h:
        h.load_state(_random_state(h, 0, batch_size=2))
        with pytest.raises(RuntimeError, match="rows"):
            _logits(model, _ids(0, batch=3, length=4))


# ---------------------------------------------------------------------------------------------- unpatch
def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_unpatch_restores_everything(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(4)
    ref = _logits(model, ids)
    keys = set(model.state_dict())
    model_attrs = set(model.__dict__)
    info = ttadapt.inspect_model(model)
    router_attrs = [set(s.module.__dict__) for s in info.sites]
    hooks = _hook_count(model)
    h = ttadapt.patch(model)
    assert ttadapt.get_handle(model) is h
    assert set(model.state_dict()) == keys  # the patch adds no parameters or buffers
    with pytest.raises(AlreadyPatchedError):
        ttadapt.patch(model)
    h.load_state(_random_state(h, 1))
    assert not torch.equal(_logits(model, ids), ref)
    h.unpatch()
    h.unpatch()  # idempotent
    assert ttadapt.get_handle(model) is None
    assert torch.equal(_logits(model, ids), ref)
    assert set(model.state_dict()) == keys
    assert set(model.__dict__) == model_attrs
    assert _hook_count(model) == hooks
    for site, attrs in zip(info.sites, router_attrs):
        assert "forward" not in site.module.__dict__
        assert set(site.module.__dict__) == attrs
    with pytest.raises(ttadapt.NotPatchedError):
        h.steer(promote=0)
    ttadapt.patch(model).unpatch()  # patchable again


@pytest.mark.parametrize("model_type", FAMILIES)
def test_two_instances_do_not_interfere(tiny_model, model_type: str) -> None:
    a, b = tiny_model(model_type, 0), tiny_model(model_type, 1)
    assert type(a) is type(b)
    ids = _ids(5)
    ref_b = _logits(b, ids)
    with ttadapt.patch(a) as ha:
        ha.load_state(_random_state(ha, 3))
        biased_a = _logits(a, ids)
        with ttadapt.patch(b) as hb:
            hb.steer(promote=0, hard=True)
            assert torch.equal(_logits(a, ids), biased_a)
            assert not torch.equal(_logits(b, ids), ref_b)
            hb.clear_steer()
            assert torch.equal(_logits(b, ids), ref_b)
    assert torch.equal(_logits(b, ids), ref_b)


# ---------------------------------------------------------------------------------------------- styles
@pytest.mark.parametrize("model_type", HANDWRITTEN)
@SLOW
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 3.0]))
def test_handwritten_style_equals_generic_interception(tiny_model, model_type: str, seed: int, scale: float) -> None:
    model = tiny_model(model_type)
    ids = _ids(seed, batch=2, length=5)
    hidden = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    results = []
    for generic in (False, True):
        ctx = _generic_spec(model_type) if generic else contextlib.nullcontext()
        with ctx, ttadapt.patch(model) as h:
            assert (h.info.spec.style == "generic") is generic
            state = _random_state(h, seed, scale)
            state.force[0, 1] = 1  # hard forcing too
            state.refresh()
            h.load_state(state)
            router = h.info.sites[0].module
            with torch.no_grad():
                results.append((_logits(model, ids), router(hidden)))
    (lg_style, out_style), (lg_generic, out_generic) = results
    torch.testing.assert_close(lg_style, lg_generic, rtol=0, atol=1e-6)
    assert len(out_style) == len(out_generic)
    for x, y in zip(out_style, out_generic):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        else:
            assert torch.equal(x.sort(-1).values, y.sort(-1).values)


# ---------------------------------------------------------------------------------------------- selection only
@pytest.mark.parametrize("model_type", SELECTION_ONLY)
def test_bias_affects_selection_only(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(6)
    hidden = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    info = ttadapt.inspect_model(model)
    router = info.sites[0].module
    with torch.no_grad():
        plain = router(hidden)
    reader = info.spec.reader
    _, plain_idx = reader(plain, info.top_k)

    def run(mode: str, bias: torch.Tensor) -> tuple:
        with ttadapt.patch(model, bias_affects=mode) as h:
            assert h.bias_affects == mode
            with torch.no_grad():
                h.state.delta[0] = bias
            h.state.refresh()
            with torch.no_grad():
                return router(hidden)

    # A small bias: on every token whose selection it leaves unchanged, the weights stay exactly the
    # unedited ones in "selection" mode, and move in "selection+weights" mode.
    small = torch.randn(info.num_experts, generator=torch.Generator().manual_seed(1)) * 1e-4
    sel_out, both_out = run("selection", small), run("selection+weights", small)
    E = info.num_experts
    dense_plain = _dense_weights(plain, plain_idx, E)
    sel_idx, both_idx = reader(sel_out, info.top_k)[1], reader(both_out, info.top_k)[1]
    same = (sel_idx.sort(-1).values == plain_idx.sort(-1).values).all(-1)
    same &= (both_idx.sort(-1).values == plain_idx.sort(-1).values).all(-1)
    assert same.float().mean() > 0.5
    assert torch.equal(_dense_weights(sel_out, sel_idx, E)[same], dense_plain[same])
    assert not torch.equal(_dense_weights(both_out, both_idx, E)[same], dense_plain[same])

    # A large bias moves the choice.
    e = int(torch.bincount(plain_idx.flatten(), minlength=info.num_experts).argmin())
    big = torch.zeros(info.num_experts)
    big[e] = 1e4
    _, idx = reader(run("selection", big), info.top_k)
    assert (idx == e).any(-1).all()

    with ttadapt.patch(model, bias_affects="selection") as h:
        h.load_state(_random_state(h, 2))
        _logits(model, ids)
        with pytest.raises(RuntimeError, match="no gradient"), h.trainable():
            pass


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - set(SELECTION_ONLY))[:3])
def test_selection_only_is_refused_where_unsupported(tiny_model, model_type: str) -> None:
    with pytest.raises(ValueError, match="bias_affects"):
        ttadapt.patch(tiny_model(model_type), bias_affects="selection")


# ---------------------------------------------------------------------------------------------- registry
def test_registry_is_complete(tiny_configs) -> None:
    pkg_dir = Path(patches_pkg.__file__).parent
    infrastructure = {"__init__", "base", "styles", "logit_edit", "_generic", "verify"}
    modules = {p.stem for p in pkg_dir.glob("*.py")} - infrastructure
    assert modules == set(patches_pkg.FAMILY_MODULES)
    assert set(tiny_configs) == set(FAMILIES)
    for name in patches_pkg.FAMILY_MODULES:
        mod = __import__(f"ttadapt.patches.{name}", fromlist=["SPECS"])
        assert mod.SPECS and all(isinstance(s, patches_pkg.FamilySpec) for s in mod.SPECS)
    for spec in SPECS.values():
        assert spec.style == "generic" or spec.style in __import__("ttadapt.patches.styles", fromlist=["STYLES"]).STYLES


def test_unsupported_model_is_refused_clearly() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError) as err:
        ttadapt.patch(model)
    message = str(err.value)
    assert "'llama'" in message
    for mt in FAMILIES:
        assert mt in message
    assert ttadapt.get_handle(model) is None


def test_patches_is_only_importable_inside_ttadapt(tmp_path) -> None:
    import subprocess
    import sys

    assert Path(patches_pkg.__file__).as_posix().endswith("patches/__init__.py")
    assert patches_pkg.__name__ == "ttadapt.patches"
    code = "import importlib.util; print(importlib.util.find_spec('patches'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


# ---------------------------------------------------------------------------------------------- state files
@pytest.mark.parametrize("model_type", FAMILIES)
def test_state_save_load_round_trip(tiny_model, tmp_path, model_type: str) -> None:
    model = tiny_model(model_type)
    with ttadapt.patch(model) as h:
        for batch in (None, 3):
            state = _random_state(h, 4, batch_size=batch)
            state.steer[0, 1] = 0.5
            state.force[-1, 0] = -1
            state.refresh()
            path = state.save(tmp_path / f"s{batch}.safetensors")
            loaded = RouterState.load(path, model)
            for name in ("delta", "steer", "force"):
                assert torch.equal(getattr(loaded, name), getattr(state, name)), name
            assert loaded.layer_ids == state.layer_ids and loaded.batch_size == batch
            assert loaded.content_hash() == state.content_hash()
            h.load_state(loaded)


def _safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_state_file_is_plain_safetensors(tiny_model, tmp_path) -> None:
    model = tiny_model("olmoe")
    state = RouterState.zeros(model)
    path = state.save(tmp_path / "s.safetensors")
    header = _safetensors_header(path)
    assert set(header) == {"__metadata__", "delta", "steer", "force"}
    assert header["__metadata__"]["format"] == "ttadapt.router_state"
    src = Path(ttadapt.__file__).parent
    for f in [src / "state.py", src / "handle.py", src / "recording.py", src / "model_info.py",
              *Path(patches_pkg.__file__).parent.glob("*.py")]:
        text = f.read_text()
        for banned in ("import pickle", "torch.load(", "torch.save(", "weights_only=False"):
            assert banned not in text, f"{f.name} uses {banned}"


def test_corrupted_state_files_are_refused(tiny_model, tmp_path) -> None:
    model = tiny_model("olmoe")
    path = RouterState.zeros(model).save(tmp_path / "ok.safetensors")
    raw = path.read_bytes()
    bad = {
        "truncated": raw[: len(raw) // 2],
        "header_only": raw[:8],
        "garbage_header": struct.pack("<Q", 40) + b"{not json at all" + b"\x00" * 64,
        "huge_length": struct.pack("<Q", 10**12) + raw[8:],
        "empty": b"",
        "text": b"hello, I am not a state file\n" * 4,
    }
    for name, blob in bad.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(StateFileError):
            RouterState.load(p)
    # a valid safetensors file that is not a router state
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"delta": torch.zeros(2, 2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(StateFileError, match="not a ttadapt router-state"):
        RouterState.load(other)
    with pytest.raises(FileNotFoundError):
        RouterState.load(tmp_path / "missing.safetensors")


def test_mismatched_state_files_are_refused(tiny_model, tiny_configs, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    olmoe, olmoe_b, qwen = tiny_model("olmoe", 0), tiny_model("olmoe", 1), tiny_model("qwen3_moe", 0)
    path = RouterState.zeros(olmoe).save(tmp_path / "olmoe.safetensors")
    with pytest.raises(StateMismatchError, match="model_type 'olmoe'"):
        RouterState.load(path, qwen)
    cfg = tiny_configs["olmoe"]()
    cfg.num_hidden_layers = 2
    two_layers = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(StateMismatchError, match="MoE layers"):
        RouterState.load(path, two_layers)
    with pytest.raises(StateMismatchError, match="router weights differ"):
        RouterState.load(path, olmoe_b, strict=True)
    assert RouterState.load(path, olmoe_b, strict=False).is_zero()
    with ttadapt.patch(olmoe_b) as h:
        with pytest.raises(StateMismatchError):
            h.load_state(RouterState.load(path))
        h.load_state(RouterState.load(path), strict=False)


# ---------------------------------------------------------------------------------------------- recorder
def _own_selection(model_type: str, out: object, num_classes: int) -> torch.Tensor | None:
    """Bool [T, E] mask of the experts a router's own output says it selected."""
    if isinstance(out, torch.Tensor):
        return None
    if model_type in ("granitemoe", "granitemoeshared", "granitemoehybrid", "aria_text"):
        idx = out[0] if not out[0].is_floating_point() else out[2]  # index-first up to transformers 5.19
    elif model_type == "llama4_text":
        return out[0] != 0  # dense sigmoid scores, 0 where not selected
    elif model_type == "jetmoe":
        return None  # sorted tuple; checked through expert_size below
    else:
        idx = out[2]
    idx = idx.reshape(-1, idx.shape[-1]).long()
    return torch.zeros(idx.shape[0], num_classes, dtype=torch.bool).scatter_(1, idx, True)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_recorder_matches_the_routers(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(8)
    with ttadapt.patch(model) as h:
        h.load_state(_random_state(h, 8))
        outs: dict[int, list] = {lid: [] for lid in h.moe_layers}
        hooks = []
        for site in h.info.sites:
            if model_type in EXPERTS_ARG_INDICES:
                layer = model.get_submodule(h.info.spec.layers_path)[site.layer_id]
                experts = layer.get_submodule(EXPERTS_ARG_INDICES[model_type])
                hooks.append(experts.register_forward_pre_hook(
                    lambda m, args, lid=site.layer_id: outs[lid].append((None, None, args[1]))))
            else:
                hooks.append(site.module.register_forward_hook(
                    lambda m, args, out, lid=site.layer_id: outs[lid].append(out)))
        try:
            with h.record() as rec:
                _logits(model, ids)
        finally:
            for hook in hooks:
                hook.remove()
        T = ids.numel()
        for lid, mask in zip(h.moe_layers, rec.selection_sets()):
            assert rec.selected(lid).shape == (T, h.top_k)
            assert rec.logits(lid).shape[0] == T
            (out,) = outs[lid]
            own = _own_selection(model_type, out, h.num_experts)
            if model_type == "zaya":  # the router reports a chosen skip class as index 0
                skip = h.num_experts - 1
                mask = mask.clone()
                mask[:, 0] |= mask[:, skip]
                mask[:, skip] = False
            if model_type == "jetmoe":
                assert rec.expert_counts(lid).tolist() == list(out[3])
            else:
                assert own is not None
                assert torch.equal(mask, own), f"layer {lid}: recorder and router disagree"
            probs = rec.probs(lid)
            if model_type in SOFTMAX:
                torch.testing.assert_close(probs.sum(-1), torch.ones(T), rtol=0, atol=1e-5)
            assert ((probs >= 0) & (probs <= 1)).all()
        conf = rec.confidence()
        assert conf.shape == (len(h.moe_layers),) and torch.isfinite(conf).all()
        assert rec.num_calls == 1


# ---------------------------------------------------------------------------------------------- adaptation
#: Upper half of the MoE layers, no guard, large steps: the round changes ``delta`` and adapts above layer 0,
#: where the optimised path replays the layers below and refreshes only the adapted layers' cache.
_UPPER = ttadapt.RerouteConfig(lr=2.0, steps=2, interval=None, selection="last_n", ratio=0.5, guard=False, min_tokens=4)
_STRAIGHT = {"prefix_reuse": False, "share_first_forward": False, "kv_policy": "full"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adaptation_optimised_path_equals_straightforward(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(12, length=12)
    ref = ttadapt.Rerouter(model, _UPPER.replace(**_STRAIGHT)).adapt(ids)
    fast, trace = ttadapt.Rerouter(model, _UPPER).adapt(ids, return_trace=True)
    adapted = [i for i, lid in enumerate(ref.layer_ids) if lid >= trace.rounds[0].selected_layers[0]]
    assert ref.layer_ids[adapted[0]] > ref.layer_ids[0]  # non-vacuous: layers below the adapted ones exist
    assert ref.delta[adapted].abs().sum() > 0 and not ref.delta[: adapted[0]].any()
    torch.testing.assert_close(fast.delta, ref.delta, rtol=1e-4, atol=1e-6)
    outs = [
        ttadapt.generate(model, ids, reroute=_UPPER.replace(interval=3, **kw), max_new_tokens=5, do_sample=False)
        for kw in (_STRAIGHT, {})
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_samples_share_the_prompt_round(tiny_model, model_type: str) -> None:
    """``num_return_sequences``: the prompt is adapted once and its cache repeated per sample, or, for caches
    that cannot repeat their rows (linear attention, model-specific layers), re-prefilled: same tokens."""
    model = tiny_model(model_type)
    ids = _ids(14, length=12)
    cfg = _UPPER.replace(selection="all")
    kw = {"max_new_tokens": 4, "do_sample": True, "top_k": 1}  # sampling from the top token only: greedy
    one = ttadapt.generate(model, ids, reroute=cfg, **kw)
    two = ttadapt.generate(model, ids, reroute=cfg, num_return_sequences=2, **kw)
    assert torch.equal(two, one.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_beam_search_after_the_prompt_round(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(18, length=12)
    kw = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    assert torch.equal(ttadapt.generate(model, ids, reroute=_UPPER.replace(steps=0), **kw), model.generate(ids, **kw))
    adapted = ttadapt.generate(model, ids, reroute=_UPPER, **kw)
    state = ttadapt.Rerouter(model, _UPPER).adapt(ids)
    with ttadapt.patch(model) as h:  # the same state, each row's copied to its beams, decoded from scratch
        h.load_state(state.select_rows(torch.arange(2).repeat_interleave(2)) if state.batch_size else state)
        assert torch.equal(adapted, model.generate(ids, **kw))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_static_decode_equals_dynamic_or_names_the_fix(tiny_model, model_type: str) -> None:
    model = tiny_model(model_type)
    ids = _ids(15, length=12)
    cfg = _UPPER.replace(interval=3)
    dynamic = ttadapt.generate(model, ids, reroute=cfg, max_new_tokens=5, do_sample=False)
    try:
        static = ttadapt.generate(model, ids, reroute=cfg, max_new_tokens=5, do_sample=False, cache_implementation="static")
    except ValueError as exc:  # sliding-window, linear-attention, ... layers: refused before anything is patched
        assert "leave cache_implementation unset" in str(exc)
        assert ttadapt.get_handle(model) is None
        return
    assert torch.equal(static, dynamic)


def test_layers_that_cannot_be_replayed_are_recomputed(tiny_model) -> None:
    from ttadapt.layer_skip import ReplayCheck, check_replay

    model = tiny_model("zaya")  # its decoder layers return (hidden, router state) tuples
    assert check_replay(model, model.model.layers, 0, 1) == ReplayCheck(True, True)
    assert check_replay(model, model.model.layers, 2, 2) == ReplayCheck(False, False)
    olmoe = tiny_model("olmoe")
    assert check_replay(olmoe, olmoe.model.layers, 2, 2) == ReplayCheck(True, True)
    longcat = tiny_model("longcat_flash")  # two cache entries per decoder layer
    assert check_replay(longcat, longcat.model.layers, 1, 2) == ReplayCheck(True, False)
    _, trace = ttadapt.Rerouter(model, _UPPER).adapt(_ids(13, length=12), return_trace=True)
    assert any("recomputed" in e for e in trace.events)


def test_straight_through_on_generic_routers_is_reported(tiny_model) -> None:
    cfg = _UPPER.replace(straight_through=True)
    _, generic = ttadapt.Rerouter(tiny_model("afmoe"), cfg).adapt(_ids(17, length=12), return_trace=True)
    _, styled = ttadapt.Rerouter(tiny_model("olmoe"), cfg).adapt(_ids(17, length=12), return_trace=True)
    assert any("straight_through ignored" in e for e in generic.events)
    assert not any("straight_through" in e for e in styled.events)


def test_recorder_confidence_rows_over_a_prefill_and_decode_steps(tiny_model) -> None:
    """Rows stay rows across several recorded forwards (a prefill of ``[B, S]`` then decode steps of ``[B, 1]``)."""
    model = tiny_model("olmoe")
    ids = _ids(16, batch=2, length=9)

    def record(rows: torch.Tensor, h: ttadapt.PatchHandle) -> ttadapt.RoutingRecorder:
        with h.record() as rec, torch.no_grad():
            out = model(rows[:, :6], use_cache=True)
            for t in range(6, 9):
                out = model(rows[:, t : t + 1], use_cache=True, **{CACHE_KW: output_cache(out)})
        assert rec.num_calls == 4
        return rec

    with ttadapt.patch(model) as h:
        h.load_state(_random_state(h, 16))
        both = record(ids, h).confidence_rows(2)
        alone = torch.cat([record(ids[b : b + 1], h).confidence_rows(1) for b in range(2)], dim=1)
        torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(both[:, 0], both[:, 1])  # the rows differ: a mixed-up split would show


# ---------------------------------------------------------------------------------------------- real model
_TINY_OLMOE = Path(__file__).resolve().parents[2] / "shared/models/tiny-olmoe"
_SNIPPET = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a'''


@pytest.fixture(scope="module")
def trained_olmoe():
    if not (_TINY_OLMOE / "config.json").is_file():
        pytest.skip(f"trained tiny-olmoe not found at {_TINY_OLMOE}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_TINY_OLMOE)
    model = AutoModelForCausalLM.from_pretrained(_TINY_OLMOE, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.eos_token_id, *tok(_SNIPPET)["input_ids"]]])
    yield model, ids
    ttadapt.unpatch(model)


def test_trained_olmoe_patch_is_exact(trained_olmoe) -> None:
    model, ids = trained_olmoe
    ref = _logits(model, ids)
    keys = set(model.state_dict())
    with ttadapt.patch(model) as h:
        assert h.moe_layers == list(range(6)) and h.num_experts == 16 and h.top_k == 2
        assert torch.equal(_logits(model, ids), ref)
        h.state.mark_active()
        assert torch.equal(_logits(model, ids), ref)
        base = _selection_masks(h, model, ids)
        lid = 3
        counts = base[lid].sum(0)
        e_up = int(counts.argmin())
        e_down = int(counts.argmax())
        assert counts[e_up] < ids.numel() and counts[e_down] > 0
        h.steer(promote=e_up, suppress=e_down, layers=[lid], bias=1e4)
        forced = _selection_masks(h, model, ids)
        assert forced[lid][:, e_up].all() and not forced[lid][:, e_down].any()
        assert torch.equal(forced[0], base[0])  # earlier layers untouched
        h.clear_steer()
        with h.trainable() as delta:
            model(ids, labels=ids).loss.backward()
        assert (delta.grad.abs().sum(-1) > 0).all()
        assert all(p.grad is None for p in model.parameters())
    assert torch.equal(_logits(model, ids), ref)
    assert set(model.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in model.modules())
