from .base import register
from .moe import MoEAdapter


@register("qwen3_moe")
class Qwen3MoeAdapter(MoEAdapter):
    # Qwen3 attention (per-head q/k norms; `attention_bias` adds q/k/v/o biases). No shared expert. The config
    # writes its expert count as `num_local_experts` (`num_experts` is an alias). Layers in `mlp_only_layers` (or
    # off the `decoder_sparse_step` grid) are dense MLPs.
    attention_bias_flag = "attention_bias"
    mlp_bias_flag = None
    experts_config_key = "num_local_experts"
    dense_layers_key = "mlp_only_layers"
    expert_width_key = "moe_intermediate_size"
