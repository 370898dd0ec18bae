import torch

from .base import register
from .moe import MoEAdapter


@register("qwen2_moe")
class Qwen2MoeAdapter(MoEAdapter):
    # Qwen2 attention (q/k/v biases from `qkv_bias`, none on o_proj, so compensation biases there are extra
    # tensors). MoE layers have a shared expert and `shared_expert_gate` beside the routed experts; the shared expert
    # is never removed (its channels may be pruned), its gate never touched. Layers in `mlp_only_layers` (or off the
    # `decoder_sparse_step` grid) are dense MLPs. Routed experts are `moe_intermediate_size` wide.
    attention_bias_flag = None
    mlp_bias_flag = None
    experts_config_key = "num_experts"
    dense_layers_key = "mlp_only_layers"
    expert_width_key = "moe_intermediate_size"
    shared_expert_name = "shared_expert"
    shared_gate_name = "shared_expert_gate"
    shared_width_key = "shared_expert_intermediate_size"

    def shared_gate_weight(self, gate_output):
        return torch.sigmoid(gate_output)  # Qwen2MoeSparseMoeBlock: sigmoid(shared_expert_gate(x)) * shared_expert(x)
