from .base import DecoderAdapter, register


@register("qwen2")
class Qwen2Adapter(DecoderAdapter):
    # q/k/v always carry biases (sliced with their rows); o_proj and the MLP never do, so compensation biases are
    # extra tensors restored by `domainprune.load_pretrained`.
    attention_bias_flag = None
    mlp_bias_flag = None
