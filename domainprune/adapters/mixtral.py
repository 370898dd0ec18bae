from .base import register
from .moe import MoEAdapter


@register("mixtral")
class MixtralAdapter(MoEAdapter):
    # Mistral attention (no biases); every layer is a sparse MoE block, `num_local_experts` routed experts, top-k
    # weights always renormalised over the selected experts (MixtralTopKRouter).
    attention_bias_flag = None
    mlp_bias_flag = None
    experts_config_key = "num_local_experts"
    # on disk (transformers' conversion mapping): `block_sparse_moe.experts.<j>.w1/w3/w2` = gate/up/down
    checkpoint_block = "block_sparse_moe"
    checkpoint_projs = ("w1", "w3", "w2")
    expert_width_key = "intermediate_size"
