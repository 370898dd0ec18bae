from .base import register
from .moe import MoEAdapter


@register("qwen2_moe")
class Qwen2MoeAdapter(MoEAdapter):
    # Qwen2 attention (q/k/v biases from `qkv_bias`, none on o_proj, so compensation biases there are extra
    # tensors). MoE layers have a shared expert and `shared_expert_gate` beside the routed experts; those are never
    # pruned. Layers in `mlp_only_layers` (or off the `decoder_sparse_step` grid) are dense MLPs.
    attention_bias_flag = None
    mlp_bias_flag = None
    experts_config_key = "num_experts"
    dense_layers_key = "mlp_only_layers"
