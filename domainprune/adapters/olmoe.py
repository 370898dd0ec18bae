from .base import register
from .moe import MoEAdapter


@register("olmoe")
class OlmoeAdapter(MoEAdapter):
    # OLMoE's q_norm/k_norm are RMSNorms over the whole q (hidden_size) and k projection, all heads at once: the
    # RMS that scales a kept head includes the removed heads' activations, so removing a head changes every other
    # head's output on every token (no weight edit can undo it), and stock loading rebuilds q_norm at hidden_size.
    # Heads are therefore not pruned: validate_plan refuses, and the dense criteria prune only expert channels.
    # `attention_bias` adds q/k/v/o biases; `clip_qkv` clamps q/k/v elementwise. Experts are `intermediate_size` wide.
    attention_bias_flag = "attention_bias"
    mlp_bias_flag = None
    prunable_heads = False
    heads_not_prunable_reason = (
        "q_norm/k_norm normalise all heads together, so removing a head rescales the kept ones on every token"
    )
    prunable_hidden = False
    hidden_not_prunable_reason = (
        "q_norm is built at hidden_size over the whole q projection, which hidden pruning does not shrink"
    )
    experts_config_key = "num_experts"
    expert_width_key = "intermediate_size"
