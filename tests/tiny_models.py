"""Tiny random-initialised models of every supported architecture (real transformers classes)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]

COMMON = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
EXTRA = {
    # a sliding window shorter than the test sequences, so sliding layers really differ from global ones
    "gemma3_text": dict(
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=8
    ),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(),
    "llama": dict(),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**COMMON, **EXTRA[arch], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init makes near-zero logits; larger weights make differences visible in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def input_ids(batch: int = 2, length: int = 12, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@torch.inference_mode()
def logits(model, ids=None) -> torch.Tensor:
    return model(input_ids=input_ids() if ids is None else ids).logits
