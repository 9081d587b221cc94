"""What ttadapt needs to know about a MoE model: its family spec, routers and a fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from ttadapt.patches import FamilySpec, RouterSite, UnsupportedModelError, find_sites, get_spec


@dataclass(frozen=True)
class MoEInfo:
    """Routers of one model instance and identifiers used to match saved states to it."""

    model_type: str
    spec: FamilySpec
    sites: tuple[RouterSite, ...]

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(s.layer_id for s in self.sites)

    @property
    def num_experts(self) -> int:
        return self.sites[0].num_experts

    @property
    def top_k(self) -> int:
        return self.sites[0].top_k

    @property
    def device(self) -> torch.device:
        for p in self.sites[0].module.parameters():
            return p.device
        return torch.device("cpu")

    def fingerprint(self) -> str:
        """Structural fingerprint: family, MoE layer ids, experts and top-k."""
        blob = json.dumps(
            {"model_type": self.model_type, "layers": self.layer_ids, "E": self.num_experts, "k": self.top_k},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weights_digest(self) -> str:
        """Digest of the router weights rounded to bf16 (so fp32/bf16 loads of one checkpoint match)."""
        h = hashlib.sha256()
        for site in self.sites:
            for name, p in sorted(site.module.named_parameters(), key=lambda kv: kv[0]):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model (unwraps PEFT's ``PeftModel``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def inspect_model(model: nn.Module) -> MoEInfo:
    """Find the family spec and routers of ``model``; raises a clear error when unsupported."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"{type(model).__name__} has no config.model_type; pass a transformers MoE causal LM "
            "(e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    spec = get_spec(model_type)
    check_transformers(spec)
    sites = tuple(find_sites(model, spec))
    if not sites:
        raise ValueError(
            f"no MoE router found under {spec.layers_path}[i].{spec.router_attr} of this {model_type} "
            "model; is it a MoE checkpoint (num_experts > 0)?"
        )
    sizes = {s.num_experts for s in sites}
    if len(sizes) != 1:
        raise ValueError(f"{model_type}: layers have different expert counts {sorted(sizes)}; unsupported")
    return MoEInfo(model_type=model_type, spec=spec, sites=sites)


def check_transformers(spec: FamilySpec) -> None:
    """Raise a clear error when the installed transformers predates ``spec``'s router layout."""
    if not spec.min_transformers:
        return
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__)
    if installed < Version(spec.min_transformers):
        raise UnsupportedModelError(
            f"ttadapt's {spec.model_type} patch needs transformers >= {spec.min_transformers} (the router layout it "
            f"binds to); this is {transformers.__version__}: pip install -U 'transformers>={spec.min_transformers}'"
        )
