from .base import DecoderAdapter, register


@register("gemma3_text")
class Gemma3Adapter(DecoderAdapter):
    # Text-only Gemma 3 (Gemma3ForCausalLM). q/k norms are per head; sliding-window layers are listed in
    # `config.layer_types`, which the base adapter slices when layers are dropped; the embedding scale
    # (sqrt(hidden_size)) is a buffer and unaffected by head/channel/layer pruning.
    attention_bias_flag = "attention_bias"
    mlp_bias_flag = None
    prunable_hidden = False
    hidden_not_prunable_reason = (
        "Gemma scales embeddings by √hidden_size and normalises every sublayer's output before the residual add"
    )
