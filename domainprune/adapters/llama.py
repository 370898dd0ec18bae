from .base import DecoderAdapter, register


@register("llama")
class LlamaAdapter(DecoderAdapter):
    # `attention_bias` adds q/k/v/o biases, `mlp_bias` gate/up/down biases: compensation stays a stock checkpoint.
    attention_bias_flag = "attention_bias"
    mlp_bias_flag = "mlp_bias"
    heads_divide_hidden = True  # LlamaConfig.validate_architecture: hidden_size % num_attention_heads == 0
