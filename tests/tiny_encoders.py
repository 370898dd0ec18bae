"""A sentence-transformers folder around a tiny random encoder: the bundled MiniLM's tokenizer and mean pooling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from domainprune.encoders.model import preset_folder


def sentence_folder(model: torch.nn.Module, folder: Path, hidden: int) -> Path:
    """Save `model` (weights redrawn larger than the init, so that differences show) with MiniLM's tokenizer,
    modules.json and pooling, as SentenceTransformer loads it."""
    source = preset_folder("all-minilm-l6-v2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        shutil.copy(source / name, folder / name)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": hidden}))
    return folder
