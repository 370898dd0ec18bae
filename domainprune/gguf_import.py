"""GGUF input → float32 safetensors shards, one group of layers at a time (never the whole model in memory).

transformers reads a GGUF file by de-quantising every tensor into one state dict and loading a whole model from it;
for an 8B model that is 32 GB of float32 at once. This converter uses transformers' own pieces for everything it
knows about the format — the config and tokenizer readers, the GGUF → HF tensor-name map and the per-architecture
tensor processors (which undo llama.cpp's Q/K row permutation and split fused experts) — but reads the file through a
memory map and writes a shard whenever about `shard_bytes` of de-quantised tensors are ready, at a layer boundary.
Peak memory is one shard plus one tensor. The weights are those transformers' `from_pretrained(gguf_file=…)`
produces, bit for bit (tests/test_gguf_import.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from .errors import DomainpruneError

log = logging.getLogger(__name__)

SHARD_BYTES = 1 << 30  # a shard is written once this much float32 data is ready (at a layer boundary)
INDEX = "model.safetensors.index.json"


def _block(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def convert_gguf(gguf_path: Path, out: Path, *, shard_bytes: int = SHARD_BYTES, progress: bool = True) -> None:
    """Write config, generation config, tokenizer and float32 safetensors shards of `gguf_path` into the (new,
    empty) folder `out`."""
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
        reader = GGUFReader(gguf_path)  # memory-mapped: tensors are read when de-quantised
        with torch.device("meta"):  # names and shapes only: no memory for the weights
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable/unsupported GGUF
        raise DomainpruneError(f"could not read GGUF file {gguf_path}: {e}".splitlines()[0]) from e
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    wanted = set(skeleton.state_dict())
    del skeleton

    shards: list[list[str]] = []  # per written shard: its tensor names
    pending = {"tensors": {}}  # the processors write split tensors (fused MoE experts) straight into this
    pending_bytes, total_bytes, current_block = 0, 0, None

    def flush() -> None:
        nonlocal pending_bytes, total_bytes
        if pending["tensors"]:
            tensors = {k: v.contiguous() for k, v in pending["tensors"].items()}
            save_file(tensors, str(out / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            shards.append(list(tensors))
            total_bytes += pending_bytes
        pending["tensors"], pending_bytes = {}, 0

    for tensor in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", disable=not progress, unit="tensor"):
        block = _block(tensor.name)
        if block != current_block and pending_bytes >= shard_bytes:
            flush()
        current_block = block
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=pending
        )
        if result.name is not None and result.name in names:
            pending["tensors"][names[result.name]] = torch.from_numpy(np.copy(result.weights)).to(torch.float32)
        pending_bytes = sum(t.numel() * 4 for t in pending["tensors"].values())
    flush()

    # file names as save_pretrained writes them: one file, or numbered shards and their index
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        final = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{n - 1}.tmp").rename(out / final)
        weight_map.update(dict.fromkeys(shard, final))
    if missing := wanted - set(weight_map) - {"lm_head.weight"}:  # a tied head has no tensor of its own
        raise DomainpruneError(f"GGUF file {gguf_path} lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2))
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = torch.float32
    config.name_or_path = str(gguf_path)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
