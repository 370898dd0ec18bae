"""GGUF export of BERT-family sentence encoders for llama.cpp's `bert` architecture (embeddings, `embedding=True`).

Tensor names, hyper-parameters and the WordPiece vocabulary follow llama.cpp's own converter for `BertModel`
(convert_hf_to_gguf.py): `token_embd`, `token_types`, `position_embd`, `token_embd_norm`, per block `attn_q/k/v`,
`attn_output`, `attn_output_norm`, `ffn_up`, `ffn_down`, `layer_output_norm`; `bert.attention.causal = false`,
`bert.pooling_type` from the sentence-transformers pooling module (mean or CLS); tokenizer model `bert` with the
"phantom space" vocabulary (a word-initial piece gets "▁", a "##" continuation loses its prefix).

llama.cpp's bert graph (as in llama-cpp-python 0.3.36) loads query/key/value as hidden × hidden and one FFN width
for every layer, so only stock-config encoders are exported (every head kept, one FFN width: `--deploy
transformers`); others are refused before any work. Weights are written in F32 (`quant="f16"`: the 2-D weights in F16).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DomainpruneError
from ..gguf_export import check_out
from .model import BertUnits, encoder_units, load_encoder, resolve

log = logging.getLogger(__name__)
QUANTS = ("f32", "f16")


def _pooling(folder: Path) -> str:
    """The sentence-transformers pooling mode of an encoder folder: "mean" or "cls" (the two llama.cpp runs)."""
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            config = json.loads((folder / m["path"] / "config.json").read_text())
            mode = config.get("pooling_mode")  # sentence-transformers ≥ 5 writes one name; older, one flag per mode
            modes = (
                [mode]
                if isinstance(mode, str)
                else [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
            )
            if modes in (["mean"], ["mean_tokens"]):
                return "mean"
            if modes in (["cls"], ["cls_token"]):
                return "cls"
            raise DomainpruneError(
                f"{folder}: pooling {', '.join(modes) or 'none'} has no llama.cpp equivalent (mean or CLS only)"
            )
    return "mean"  # sentence-transformers' default for a plain BERT folder


def phantom(token: str) -> str:
    """llama.cpp's WordPiece vocabulary: "[CLS]"-style tokens kept, "##piece" -> "piece", "word" -> "▁word"."""
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def write_vocab(writer: Any, tokenizer: Any, folder: Path) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    if "" in tokens:
        raise DomainpruneError(f"{folder}: the tokenizer's vocabulary has gaps; it is not a WordPiece vocabulary")
    special = set(tokenizer.all_special_tokens)
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("bert")
    writer.add_token_list([phantom(t) for t in tokens])
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)


def tensors(units: BertUnits) -> dict[str, Any]:
    bert = units.bert
    e = bert.embeddings
    out = {
        "token_embd.weight": e.word_embeddings.weight,
        "token_types.weight": e.token_type_embeddings.weight,
        "position_embd.weight": e.position_embeddings.weight,
        "token_embd_norm.weight": e.LayerNorm.weight,
        "token_embd_norm.bias": e.LayerNorm.bias,
    }
    for i, layer in enumerate(units.layers):
        a = layer.attention
        parts = {
            "attn_q": a.self.query,
            "attn_k": a.self.key,
            "attn_v": a.self.value,
            "attn_output": a.output.dense,
            "attn_output_norm": a.output.LayerNorm,
            "ffn_up": layer.intermediate.dense,
            "ffn_down": layer.output.dense,
            "layer_output_norm": layer.output.LayerNorm,
        }
        for name, module in parts.items():
            out[f"blk.{i}.{name}.weight"] = module.weight
            out[f"blk.{i}.{name}.bias"] = module.bias
    return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


def write(path: Path, units: BertUnits, tokenizer: Any, folder: Path, pooling: str, quant: str) -> None:
    import gguf

    config = units.bert.config
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(units.channels(0))
    writer.add_block_count(units.num_layers())
    writer.add_head_count(units.heads(0))
    writer.add_key_length(units.head_dim)
    writer.add_value_length(units.head_dim)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN if pooling == "mean" else gguf.PoolingType.CLS)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_token_type_count(config.type_vocab_size)
    write_vocab(writer, tokenizer, folder)
    for name, arr in tensors(units).items():
        half = quant == "f16" and arr.ndim == 2 and not name.startswith(("token_types", "position_embd"))
        writer.add_tensor(name, arr.astype(np.float16) if half else arr.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_encoder_gguf(source: str | Path, out: str | Path, *, quant: str = "f32", force: bool = False) -> Path:
    """Write the encoder at `source` (a preset or folder) as one GGUF file for llama.cpp, moved into place only
    when complete; returns its path."""
    if quant not in QUANTS:
        raise DomainpruneError(f"encoder GGUF export writes {' or '.join(QUANTS)}, not {quant!r}")
    folder = resolve(source)
    out = check_out(Path(out), force, [folder])
    pooling = _pooling(folder)
    model = load_encoder(folder)
    units = encoder_units(model)
    config = units.bert.config
    if config.model_type != "bert":
        raise DomainpruneError(f"{source}: GGUF export writes llama.cpp's bert graph; {config.model_type} is not bert")
    if not units.stock_loadable():
        raise DomainpruneError(
            f"{source}: llama.cpp's bert graph needs every head kept and one FFN width in every layer (a stock "
            "config); prune with --deploy transformers (uniform FFN channels) to export GGUF"
        )
    if config.hidden_act != "gelu" or getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise DomainpruneError(f"{source}: llama.cpp's bert graph needs gelu and absolute positions")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        write(tmp, units, model.tokenizer, folder, pooling, quant)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%s, %s pooling)", out, quant, pooling)
    return out
