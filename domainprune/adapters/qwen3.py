from .base import DecoderAdapter, register


@register("qwen3")
class Qwen3Adapter(DecoderAdapter):
    # q_norm/k_norm act per head on head_dim, so removing whole heads leaves them untouched.
    attention_bias_flag = "attention_bias"
    mlp_bias_flag = None
