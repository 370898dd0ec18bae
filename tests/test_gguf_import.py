"""GGUF inputs are converted a few layers at a time (domainprune.gguf_import), with exactly the weights and config
transformers' own whole-model GGUF loader produces: tiny models of every dense architecture written as GGUF by our
exporter and read back, split over several shards, and the real SmolLM2 preset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipeline import FULL_VOCAB, smol_tokenizer, tiny_lm
from transformers import AutoModelForCausalLM

from domainprune.gguf_export import export_gguf
from domainprune.gguf_import import INDEX, convert_gguf


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_like_transformers(gguf_path, folder, tmp_path) -> None:
    """Every tensor equals what `from_pretrained(gguf_file=…)` loads, bit for bit, and config.json is what saving
    that model writes (the previous, whole-model conversion)."""
    want = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    got = folder_tensors(folder)
    tied = want.config.tie_word_embeddings
    state = {k: v for k, v in want.state_dict().items() if not (k == "lm_head.weight" and tied)}
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
    want.hf_quantizer, want.is_quantized = None, False
    del want.config.quantization_config
    want.save_pretrained(tmp_path / "whole")
    configs = [json.loads((f / "config.json").read_text()) for f in (folder, tmp_path / "whole")]
    assert configs[0] == configs[1]
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() == want.num_parameters()


# not qwen3: transformers reads no head_dim from a qwen3 GGUF (its default, 128, is the real models'), so a tiny one
# with head_dim 8 does not load there at all
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_tiny_gguf_converts_shard_by_shard_like_transformers(arch, tmp_path):
    model = tiny_lm(arch, vocab_size=FULL_VOCAB)
    path = export_gguf(model, smol_tokenizer(full=True), tmp_path / "tiny.gguf").path
    out = tmp_path / "converted"
    out.mkdir()
    convert_gguf(path, out, shard_bytes=40_000, progress=False)  # a layer is ~60 kB: one shard per layer or so
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in folder_tensors(out).values())
    assert not list(out.glob("*.tmp"))
    assert_like_transformers(path, out, tmp_path)


def test_unreadable_gguf_is_one_line(tmp_path):
    from domainprune.errors import DomainpruneError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DomainpruneError, match="could not read GGUF file"):
        convert_gguf(bad, out, progress=False)


@pytest.mark.slow
def test_smollm2_preset_converts_like_transformers(tmp_path):
    """The bundled SmolLM2 GGUF (Q4_1), in 64 MB shards."""
    from domainprune.models import preset_gguf

    path = preset_gguf("smollm2-135m")
    out = tmp_path / "smollm2"
    out.mkdir()
    convert_gguf(path, out, shard_bytes=64 << 20, progress=False)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert_like_transformers(path, out, tmp_path)
