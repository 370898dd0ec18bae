"""`domainprune export --to vllm`: DeciLM checkpoints as vLLM's nemotron_nas loader reads them.

vLLM itself pins another transformers and runs in its own environment, so the engine check (same greedy tokens as
transformers) is bench/vllm_check.py's; here: the config loads as the attribute tree vLLM reads, every tensor has the
shape vLLM's DeciLM layer builds from that config and the values of the pruned model, and what vLLM cannot express
is refused in one line before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipeline import cli, smol_tokenizer, tiny_lm
from transformers import AutoConfig

from domainprune.adapters import get_adapter
from domainprune.errors import DomainpruneError
from domainprune.runfolder import save_pruned
from domainprune.vllm_export import export_vllm

D, HD, H = 48, 8, 6  # tiny models: hidden 48, head_dim 8, 6 query heads in 2 KV groups of 3 (tests/tiny_models.py)


def bias(seed: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def run_of(model, root, name="run"):
    return save_pruned(model, smol_tokenizer(), root / name, verify=False)


def vllm_shapes(config) -> dict[str, list[int]]:
    """The tensors vLLM's DeciLMDecoderLayer builds from the config (nemotron_nas.py: query heads are the global
    count, KV heads = num_attention_heads // n_heads_in_group, MLP width = the explicit intermediate_size)."""
    shapes = {}
    for i, block in enumerate(config.block_configs):
        p = f"model.layers.{i}"
        if not block.attention.no_op:
            kv = config.num_attention_heads // block.attention.n_heads_in_group
            shapes |= {
                f"{p}.input_layernorm.weight": [D],
                f"{p}.self_attn.q_proj.weight": [H * HD, D],
                f"{p}.self_attn.k_proj.weight": [kv * HD, D],
                f"{p}.self_attn.v_proj.weight": [kv * HD, D],
                f"{p}.self_attn.o_proj.weight": [D, H * HD],
            }
            if config.attention_bias:
                shapes[f"{p}.self_attn.o_proj.bias"] = [D]
        if not block.ffn.no_op:
            assert not hasattr(block.ffn, "ffn_mult")  # else vLLM rounds the width up to a multiple of 256
            n = block.ffn.intermediate_size
            shapes |= {
                f"{p}.post_attention_layernorm.weight": [D],
                f"{p}.mlp.gate_proj.weight": [n, D],
                f"{p}.mlp.up_proj.weight": [n, D],
                f"{p}.mlp.down_proj.weight": [D, n],
            }
            if config.mlp_bias:
                shapes |= {f"{p}.mlp.gate_proj.bias": [n], f"{p}.mlp.up_proj.bias": [n], f"{p}.mlp.down_proj.bias": [D]}
    return shapes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_layer_widths_and_removed_sublayers_export_as_decilm(arch, tmp_path):
    model = tiny_lm(arch)
    a = get_adapter(model)
    a.slice_mlp(0, list(range(0, 40, 3)))
    a.slice_mlp(1, list(range(17)), bias=bias(1))  # FLAP-style compensation: mlp_bias, zeros for gate/up
    a.slice_attention(2, [], [])  # no-op attention (no compensation bias)
    a.slice_mlp(3, [])  # no-op MLP, attention kept
    a.slice_attention(1, [0, 1, 2, 3, 4, 5], [0, 1], bias=bias(2))
    a.ensure_output_biases()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "vllm"
    r = export_vllm(run_of(model, tmp_path), out)
    assert r.mlp_widths == [14, 17, 40, 0] and r.kv_heads == [2, 2, 0, 2]

    config = AutoConfig.from_pretrained(out, trust_remote_code=True)  # the checkpoint's own config class
    assert type(config).__name__ == "DeciLMConfig" and config.architectures == ["DeciLMForCausalLM"]
    assert [b.attention.no_op for b in config.block_configs] == [False, False, True, False]
    assert [b.ffn.no_op for b in config.block_configs] == [False, False, False, True]
    assert config.num_attention_heads == H and config.head_dim == HD and config.mlp_bias and config.attention_bias
    assert config.qkv_bias  # Qwen2's own; a Llama config with o_proj biases (attention_bias) has q/k/v ones too

    state = load_file(out / "model.safetensors")
    shapes = vllm_shapes(config)
    if config.qkv_bias:
        shapes |= {
            f"model.layers.{i}.self_attn.{n}_proj.bias": [(H if n == "q" else 2) * HD] for i in (0, 1, 3) for n in "qkv"
        }
    layer_state = {k: list(v.shape) for k, v in state.items() if k.startswith("model.layers.")}
    assert layer_state == shapes
    for name, tensor in state.items():  # the pruned model's values; the filled-in biases are zeros
        if name in expected:
            assert torch.equal(tensor, expected[name]), name
        else:
            assert name.endswith(".bias") and not tensor.any(), name
    assert not state["model.layers.1.mlp.down_proj.bias"].eq(0).all()  # the compensation is carried
    assert json.loads((out / "tokenizer_config.json").read_text())  # the tokenizer travels with it


def test_what_vllm_cannot_run_is_refused_in_one_line(capsys, tmp_path):
    model = tiny_lm("llama")
    get_adapter(model).slice_attention(2, [3, 4, 5], [1])  # 3 query heads here, 6 elsewhere
    run = run_of(model, tmp_path, "heads")
    code, _, err = cli(capsys, "export", run, "--to", "vllm", "--out", tmp_path / "x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "same query-head count" in err and "--deploy vllm" in err and not (tmp_path / "x").exists()

    model = tiny_lm("llama")
    get_adapter(model).slice_attention(0, [], [])
    with pytest.raises(DomainpruneError, match="first layer has no attention"):
        export_vllm(run_of(model, tmp_path, "first"), tmp_path / "x")

    model = tiny_lm("llama")
    get_adapter(model).slice_mlp(2, [], bias=bias(3))
    with pytest.raises(DomainpruneError, match="--no-bias-compensation"):
        export_vllm(run_of(model, tmp_path, "removed-bias"), tmp_path / "x")

    with pytest.raises(DomainpruneError, match="not this qwen3 model"):
        export_vllm(run_of(tiny_lm("qwen3"), tmp_path, "qwen3"), tmp_path / "x")
    assert not (tmp_path / "x").exists()

    ok = run_of(tiny_lm("llama"), tmp_path, "ok")
    export_vllm(ok, tmp_path / "x")
    with pytest.raises(DomainpruneError, match="exists; choose another --out or pass --force"):
        export_vllm(ok, tmp_path / "x")
    with pytest.raises(DomainpruneError, match="inputs are never modified"):
        export_vllm(ok, ok, force=True)
