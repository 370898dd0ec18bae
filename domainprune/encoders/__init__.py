"""Sentence encoders (BERT family, with sentence-transformers pooling): pruning for a domain's retrieval, retrieval
evaluation and contrastive recovery (`encoders.pipeline`: prune_encoder, evaluate_encoder, recover_encoder). See
docs/embeddings.md. Only the model layer is imported with the package: `load_pretrained` reads encoder checkpoints
through it, and the pipeline, which loads models and writes checkpoints, sits above both."""

from .model import PRESETS, BertUnits, encoder_units, is_encoder, load_encoder

__all__ = ["PRESETS", "BertUnits", "encoder_units", "is_encoder", "load_encoder"]
