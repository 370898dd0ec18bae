from .base import register
from .moe import MoEAdapter


@register("olmoe")
class OlmoeAdapter(MoEAdapter):
    # OLMoE's q_norm/k_norm normalise the whole q (hidden_size) and k projection across all heads at once, so
    # removing a head changes the others and stock loading rebuilds q_norm at hidden_size: heads are not pruned
    # (validate_plan refuses). `attention_bias` adds q/k/v/o biases; `clip_qkv` clamps q/k/v elementwise.
    attention_bias_flag = "attention_bias"
    mlp_bias_flag = None
    prunable_heads = False
    experts_config_key = "num_experts"
