from .base import DecoderAdapter, register


@register("mistral")
class MistralAdapter(DecoderAdapter):
    # No bias flags at all: bias compensation is stored as extra biases that `domainprune.load_pretrained` restores.
    attention_bias_flag = None
    mlp_bias_flag = None
