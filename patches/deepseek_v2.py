"""DeepSeek-V2: fp32 softmax, greedy or group-limited greedy top-k, scaled; dense first layers."""

from .base import FamilySpec

SPECS = (
    FamilySpec(
        model_type="deepseek_v2",
        router_attr="mlp.gate",
        style="softmax_group",
        selection_options=("selection+weights", "selection"),
        notes="softmax (group-limited) top-k x routed_scaling_factor; first_k_dense_replace skipped",
    ),
)
