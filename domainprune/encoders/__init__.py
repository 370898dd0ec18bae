"""Sentence encoders (BERT family, with sentence-transformers pooling): pruning for a domain's retrieval, retrieval
evaluation and contrastive recovery. See docs/embeddings.md."""

from .model import PRESETS, BertUnits, is_encoder, load_encoder
from .pipeline import EncoderRecipe, evaluate_encoder, prune_encoder, recover_encoder

__all__ = [
    "PRESETS",
    "BertUnits",
    "EncoderRecipe",
    "evaluate_encoder",
    "is_encoder",
    "load_encoder",
    "prune_encoder",
    "recover_encoder",
]
