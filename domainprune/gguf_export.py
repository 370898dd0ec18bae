"""Export a pruned model as one GGUF file for llama.cpp (and so Ollama, LM Studio, llama-cpp-python's server).

Written directly with gguf-py's `GGUFWriter`, as llama.cpp's `convert_hf_to_gguf.py` would write it (docs/serve.md
cites the llama.cpp source lines each choice rests on):

- every layer with the same widths and both sublayers → the model's own architecture: `llama` (Llama, Mistral,
  Mixtral), `qwen2`, `qwen3`, `gemma3`, `qwen2moe`, `qwen3moe`, `olmoe`. Qwen3, Gemma 3 and the mixture-of-experts
  models have no per-layer form in llama.cpp (deci has no q/k norms, sandwich norms or experts), so they export only
  with the same widths, expert count and expert width in every layer;
- otherwise (per-layer query heads, KV groups or MLP widths, removed sublayers; Qwen2 with fewer heads than
  hidden_size/head_dim or with compensation biases, which llama.cpp's `qwen2` cannot hold) → `deci`, whose head
  counts and FFN widths are per-layer arrays. Encodings that keep the computation exact there:
  - a removed attention is `head_count = head_count_kv = 0` (the layer's input passes through);
  - a layer that keeps its attention but lost its MLP gets a one-channel MLP with zero weights, because deci's
    `n_ff = 0` path skips the line that carries the attention output forward; its down bias holds the removed
    MLP's compensation bias;
  - a layer with both sublayers removed is left out (it passes its input through);
  - a compensation bias of a removed sublayer is a constant added to the residual stream, so it is added to the
    bias of the nearest earlier sublayer that has one (or to every token embedding row when there is none);
  - llama.cpp takes the head size from layer 0 only when layer 0 has heads, so a layer 0 without attention gets
    a one-head "linear attention" with zero weights (deci's attention-free projection), and `key_length` /
    `value_length` are always written.
- Q and K rows are permuted for llama and deci (their RoPE rotates adjacent pairs, HF's rotates halves).
- Gemma 3: its RMSNorms scale by (1 + weight), so 1 is added to every norm weight (as llama.cpp's converter does);
  llama.cpp scales queries by 1/√head_dim, so a `query_pre_attn_scalar` other than head_dim is folded into the
  q-norm weights; sliding-window layers are written as a per-layer pattern (exact after dropped layers).
- Mixture of experts: the routed experts as 3-D tensors, the router unquantised (llama.cpp never quantises it);
  llama.cpp's graphs renormalise the top-k routing weights for llama/qwen3moe and not for qwen2moe/olmoe, so a
  model whose `norm_topk_prob` says otherwise is refused.
Biases llama.cpp's graph does not read are refused in one line naming the option that avoids them; a bias that is
exactly zero is left out. Quantised types are made by llama.cpp's own quantiser (llama-cpp-python) from F32.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import get_adapter
from .errors import DomainpruneError

log = logging.getLogger(__name__)

# --quant name -> (llama.cpp file type, the tensor types its 2-D weights get when no width forces a fallback)
QUANTS: dict[str, tuple[str, frozenset[str]]] = {
    "f32": ("ALL_F32", frozenset({"F32"})),
    "f16": ("MOSTLY_F16", frozenset({"F16"})),
    "bf16": ("MOSTLY_BF16", frozenset({"BF16"})),
    "q8_0": ("MOSTLY_Q8_0", frozenset({"Q8_0"})),
    "q4_0": ("MOSTLY_Q4_0", frozenset({"Q4_0", "Q6_K"})),
    "q4_k_m": ("MOSTLY_Q4_K_M", frozenset({"Q4_K", "Q6_K"})),
    "q5_k_m": ("MOSTLY_Q5_K_M", frozenset({"Q5_K", "Q6_K"})),
    "q6_k": ("MOSTLY_Q6_K", frozenset({"Q6_K"})),
}
OWN_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
}
# llama.cpp architectures without a per-layer form (see the module docstring); MoE models are uniform-only too
UNIFORM_ONLY = {"qwen3", "gemma3", "qwen2moe", "qwen3moe", "olmoe"}
FULL_WIDTH_Q = {"qwen2", "qwen2moe", "olmoe"}  # llama.cpp sizes q (and o, and OLMoE's q norm) as n_embd
FULL_WIDTH_KV = {"olmoe"}  # ... and OLMoE's k norm too (src/models/olmoe.cpp), so it runs without GQA only
QK_NORM_ARCHS = {"qwen3", "qwen3moe", "olmoe", "gemma3"}
# llama.cpp's `norm_w` argument of build_moe_ffn (src/models/<arch>.cpp): whether top-k weights are renormalised
RENORMALISED_TOP_K = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False}
# Input widths llama.cpp's CPU matrix kernels take on their fast path: tinyBLAS (ggml-cpu/llamafile/sgemm.cpp,
# `tinyBLAS::matmul`: `k % KN`, KN = 16 floats with AVX-512, 8 with AVX2) for F16, and whole blocks of 32 for Q8_0 /
# Q4_0 / Q5_0 (the types llama.cpp's quantiser falls back to). K-quants want 256 (`--round-to 256`). `--deploy
# llamacpp` rounds MLP widths to this unless --round-to is given (bench/results/serve.md).
KERNEL_MULTIPLE = 32
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
PERMUTED_ARCHS = ("llama", "deci")  # RoPE on adjacent pairs in llama.cpp: HF's q/k rows are permuted
DECI_BIASES = {"q", "k", "v", "o", "gate", "up", "down"}
# build_qkv (llama-graph.cpp) adds q/k/v biases for every architecture; only llama and deci read the others
ARCH_BIASES = {arch: {"q", "k", "v"} for arch in set(OWN_ARCH.values())} | {"llama": DECI_BIASES, "deci": DECI_BIASES}
BIAS_FIX = "prune with --no-bias-compensation"


@dataclass
class Layer:
    """One GGUF block: its head counts, FFN width and tensors (names after `blk.N.`)."""

    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Built:
    arch: str
    layers: list[Layer]
    globals: dict[str, torch.Tensor]  # token_embd, output_norm, output, rope_freqs
    head_dim: int
    notes: list[str] = field(default_factory=list)  # encodings used, for the report
    experts: tuple[int, int, int] | None = None  # mixture of experts: (count, used per token, shared expert width)


@dataclass
class GGUFExport:
    path: Path
    arch: str
    quant: str
    layers: int
    bytes: int
    fallbacks: list[tuple[str, str]]  # (tensor, type) of 2-D weights that did not get the quant's own types
    notes: list[str]
    pre_tokenizer: str


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().abs().max() > 0)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (n_head: the tensor's own head count, KV heads for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----- reading the model -----------------------------------------------------------------------------------------


def _check_moe(adapter: Any) -> None:
    """Refuse, in one line, a mixture-of-experts model llama.cpp's graph cannot compute as transformers does."""
    if not adapter.has_experts():
        return
    kind, shapes = adapter.config.model_type, adapter.shapes()
    counts = sorted({s.num_experts for s in shapes})
    if counts[0] == 0:  # some layers dense (Qwen MoE `mlp_only_layers`): no llama.cpp graph mixes them
        raise DomainpruneError(
            "llama.cpp's MoE graphs make every layer a mixture of experts, but this model has dense layers too "
            "(mlp_only_layers / decoder_sparse_step); it cannot be exported to GGUF"
        )
    if len(counts) > 1:
        raise DomainpruneError(
            f"llama.cpp's expert count is one number for the whole model, but the layers keep {counts} experts; "
            "prune experts with --allocation uniform so every layer keeps the same count"
        )
    if len({(s.expert_width, s.shared_width) for s in shapes}) > 1:
        raise DomainpruneError(
            "llama.cpp's experts have one width for the whole model, but this model's layers differ; prune expert "
            "channels with --allocation uniform"
        )
    renormalised = bool(getattr(adapter.config, "norm_topk_prob", True))
    if renormalised != RENORMALISED_TOP_K[kind]:
        raise DomainpruneError(
            f"llama.cpp's {OWN_ARCH[kind]} graph {'renormalises' if not renormalised else 'does not renormalise'} "
            f"the top-k routing weights, but this model's config has norm_topk_prob = {renormalised}; "
            "it cannot run there"
        )


def _biases(adapter: Any) -> dict[str, set[int]]:
    """Nonzero biases per kind (q, k, v, o, gate, up, down, head) -> the layers that carry them."""
    found: dict[str, set[int]] = {}
    for i in range(adapter.num_layers):
        named: dict[str, torch.Tensor | None] = {}
        if adapter.attention_removed(i):
            named["o"] = adapter.attention(i).bias
        else:
            q, k, v = adapter.attention_in_projs(i)
            named.update(q=q.bias, k=k.bias, v=v.bias, o=adapter.o_proj(i).bias)
        if adapter.mlp_removed(i):
            named["down"] = adapter.mlp(i).bias
        elif adapter.has_dense_mlp(i):
            gate, up = adapter.mlp_in_projs(i)
            named.update(gate=gate.bias, up=up.bias, down=adapter.down_proj(i).bias)
        for kind, b in named.items():
            if _nonzero(b):
                found.setdefault(kind, set()).add(i)
    head = adapter.model.get_output_embeddings()
    if head is not None and _nonzero(getattr(head, "bias", None)):
        found["head"] = {-1}
    return found


def choose_arch(adapter: Any) -> str:
    """The llama.cpp architecture this model exports to, or a one-line refusal."""
    kind = adapter.config.model_type
    if kind not in OWN_ARCH:
        raise DomainpruneError(
            f"GGUF export supports {', '.join(OWN_ARCH)} models, not {kind!r}; use the safetensors output "
            "with transformers (domainprune.load_pretrained)"
        )
    _check_moe(adapter)
    own = OWN_ARCH[kind]
    shapes = adapter.shapes()
    removed = any(adapter.attention_removed(i) or adapter.mlp_removed(i) for i in range(adapter.num_layers))
    uniform = len(set(shapes)) == 1 and not removed
    biases = _biases(adapter)
    if "head" in biases and own != "qwen2":
        raise DomainpruneError("the LM head has a bias, which llama.cpp's graph for this model does not read")
    full_width_q = shapes[0].num_heads * adapter.head_dim == adapter.hidden_size
    if own in FULL_WIDTH_KV and shapes[0].num_kv_heads * adapter.head_dim != adapter.hidden_size:
        raise DomainpruneError(
            f"llama.cpp's {own} graph sizes the key norm as the hidden size, so it runs this model only with as many "
            "KV heads as query heads and none pruned; prune experts (--method expert-frequency, easy-ep or tcess)"
        )
    if own in UNIFORM_ONLY or adapter.has_experts():
        if not uniform:
            raise DomainpruneError(
                f"llama.cpp runs {kind} only with the same widths in every layer (it has no per-layer form of this "
                "architecture); prune with --allocation uniform (or --deploy llamacpp) and keep every sublayer"
            )
        if own in FULL_WIDTH_Q and not full_width_q:
            raise DomainpruneError(
                f"llama.cpp's {own} graph sizes the query projection as the hidden size, but this model keeps "
                f"{shapes[0].num_heads} of {adapter.hidden_size // adapter.head_dim} heads; prune MLP channels only "
                "(--attention-sparsity 0) or export with transformers"
            )
        if extra := sorted(set(biases) - ARCH_BIASES[own]):
            raise DomainpruneError(f"llama.cpp's {own} graph reads no {'/'.join(extra)} bias; {BIAS_FIX}")
        if own == "gemma3":
            _check_gemma3(adapter.config)
        return own
    if uniform and not set(biases) - ARCH_BIASES[own] - {"head"} and (own not in FULL_WIDTH_Q or full_width_q):
        return own
    return "deci"


def _check_gemma3(config: Any) -> None:
    if getattr(config, "attn_logit_softcapping", None):
        raise DomainpruneError("llama.cpp's gemma3 graph has no attention logit soft-capping; this model uses it")
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise DomainpruneError(f"llama.cpp's gemma3 MLP is tanh-GELU, not {config.hidden_activation!r}")
    sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
    if (sliding.get("rope_type") or "default") != "default":
        raise DomainpruneError("llama.cpp's gemma3 graph applies no RoPE scaling to sliding-window layers")


def llama_cpp_query_scale(config: Any, n_head: int) -> float:
    """The query scale llama.cpp's gemma3 graph applies (`f_attention_scale`, src/models/gemma3.cpp: 1/√(n_embd /
    n_head) for its 62-layer 27B type, 1/√head_dim otherwise)."""
    if config.num_hidden_layers == 62:
        return (config.hidden_size / n_head) ** -0.5
    return config.head_dim**-0.5


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = params.get("full_attention", params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = (params.get("rope_type") or "default").lower()
    if kind not in ("default", "linear", "llama3"):
        raise DomainpruneError(f"RoPE scaling {kind!r} is not supported by the GGUF export (default, linear, llama3)")
    return float(theta), {**params, "rope_type": kind}


def llama3_rope_factors(params: dict[str, Any], head_dim: int, theta: float) -> torch.Tensor:
    """`generate_extra_tensors` of llama.cpp's LlamaModel/DeciModel: per-frequency factors for llama3 RoPE."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _attention_tensors(adapter: Any, i: int, arch: str) -> dict[str, torch.Tensor]:
    s = adapter.shape(i)
    q, k, v = adapter.attention_in_projs(i)
    o = adapter.o_proj(i)
    out = {"attn_norm.weight": _f32(adapter.layers[i].input_layernorm.weight)}
    for name, proj, heads in (("attn_q", q, s.num_heads), ("attn_k", k, s.num_kv_heads), ("attn_v", v, None)):
        w, b = _f32(proj.weight), (_f32(proj.bias) if _nonzero(proj.bias) else None)
        if heads is not None and arch in PERMUTED_ARCHS:
            w = permute(w, heads)
            b = permute(b, heads) if b is not None else None
        out[f"{name}.weight"] = w
        if b is not None:
            out[f"{name}.bias"] = b
    out["attn_output.weight"] = _f32(o.weight)
    if _nonzero(o.bias):
        out["attn_output.bias"] = _f32(o.bias)
    attn = adapter.attention(i)
    if arch in QK_NORM_ARCHS:
        out["attn_q_norm.weight"], out["attn_k_norm.weight"] = _f32(attn.q_norm.weight), _f32(attn.k_norm.weight)
    if arch == "gemma3":  # sandwich norms: the attention output is normalised before the residual add
        out["post_attention_norm.weight"] = _f32(adapter.layers[i].post_attention_layernorm.weight)
    return out


def _ffn_norm(adapter: Any, i: int, arch: str) -> dict[str, torch.Tensor]:
    layer = adapter.layers[i]
    if arch == "gemma3":
        return {
            "ffn_norm.weight": _f32(layer.pre_feedforward_layernorm.weight),
            "post_ffw_norm.weight": _f32(layer.post_feedforward_layernorm.weight),
        }
    return {"ffn_norm.weight": _f32(layer.post_attention_layernorm.weight)}


def _moe_tensors(adapter: Any, i: int) -> dict[str, torch.Tensor]:
    """Router, routed experts as (E, I, d) / (E, d, I) stacks (ggml's {d, I, E} / {I, d, E}) and the shared expert."""
    gate, up, down = adapter.expert_mlp_weights(i)
    out = {
        "ffn_gate_inp.weight": _f32(adapter.router(i).weight),
        "ffn_gate_exps.weight": _f32(gate),
        "ffn_up_exps.weight": _f32(up),
        "ffn_down_exps.weight": _f32(down),
    }
    shared = adapter.shared_mlp_weights(i)
    if shared is not None:
        shared_gate = getattr(adapter.mlp(i), adapter.shared_gate_name)
        out["ffn_gate_inp_shexp.weight"] = _f32(shared_gate.weight).reshape(-1)  # (1, d) -> {d}
        for name, w in zip(("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"), shared):
            out[f"{name}.weight"] = _f32(w)
    return out


def _mlp_tensors(adapter: Any, i: int, arch: str) -> dict[str, torch.Tensor]:
    if adapter.has_experts():
        return {**_ffn_norm(adapter, i, arch), **_moe_tensors(adapter, i)}
    gate, up = adapter.mlp_in_projs(i)
    down = adapter.down_proj(i)
    out = {
        **_ffn_norm(adapter, i, arch),
        "ffn_gate.weight": _f32(gate.weight),
        "ffn_up.weight": _f32(up.weight),
        "ffn_down.weight": _f32(down.weight),
    }
    for name, lin in (("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)):
        if _nonzero(lin.bias):
            out[f"{name}.bias"] = _f32(lin.bias)
    return out


def build(model: torch.nn.Module) -> Built:
    """Tensors and per-layer widths of the GGUF file, in llama.cpp's names (before the tokenizer and the writer)."""
    adapter = get_adapter(model)
    arch = choose_arch(adapter)
    d, hd = adapter.hidden_size, adapter.head_dim
    embed = _f32(model.get_input_embeddings().weight)
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    built = Built(arch, [], {"token_embd.weight": embed}, hd)
    if adapter.has_experts():
        s = adapter.shape(0)
        built.experts = (s.num_experts, adapter.top_k(0), s.shared_width)
    # The residual-stream bias slot a removed sublayer's constant output is added to: (layer, tensor name) or None
    # for the token embeddings.
    slot: tuple[Layer, str] | None = None
    folded_into_embedding = False

    def add_to_slot(bias: torch.Tensor) -> None:
        nonlocal folded_into_embedding
        if slot is None:
            built.globals["token_embd.weight"] = built.globals["token_embd.weight"] + _f32(bias)[None, :]
            folded_into_embedding = True
            return
        layer, name = slot
        layer.tensors[name] = layer.tensors.get(name, torch.zeros(d)) + _f32(bias)

    for i in range(adapter.num_layers):
        s = adapter.shape(i)
        layer = Layer(s.num_heads, s.num_kv_heads, s.intermediate_size or s.expert_width)
        if adapter.attention_removed(i):
            if _nonzero(adapter.attention(i).bias):
                add_to_slot(adapter.attention(i).bias)
        else:
            layer.tensors.update(_attention_tensors(adapter, i, arch))
            slot = (layer, "attn_output.bias")
        if not adapter.mlp_removed(i):
            layer.tensors.update(_mlp_tensors(adapter, i, arch))
            slot = (layer, "ffn_down.bias")
        elif not adapter.attention_removed(i):
            # deci's n_ff = 0 drops the attention output (see the module docstring): one zero channel instead
            layer.n_ff = 1
            norm = adapter.layers[i].post_attention_layernorm.weight
            layer.tensors.update(
                {
                    "ffn_norm.weight": _f32(norm),
                    "ffn_gate.weight": torch.zeros(1, d),
                    "ffn_up.weight": torch.zeros(1, d),
                    "ffn_down.weight": torch.zeros(d, 1),
                }
            )
            slot = (layer, "ffn_down.bias")
            if _nonzero(adapter.mlp(i).bias):
                add_to_slot(adapter.mlp(i).bias)
            built.notes.append(f"layer {i}: MLP removed, written as one zero channel")
        elif _nonzero(adapter.mlp(i).bias):
            add_to_slot(adapter.mlp(i).bias)
        if layer.n_head == 0 and layer.n_ff == 0:
            built.notes.append(f"layer {i}: both sublayers removed, left out")
            continue
        built.layers.append(layer)
    if not built.layers:
        raise DomainpruneError("every layer of the model is removed; there is nothing for llama.cpp to run")
    first = built.layers[0]
    if first.n_head == 0:
        # llama.cpp derives the head size from layer 0's head count (0 -> 0 for the whole model)
        first.n_head, first.n_head_kv = 1, 0
        first.tensors["attn_norm.weight"] = torch.ones(d)
        first.tensors["attn_output.weight"] = torch.zeros(d, d)
        built.notes.append("first layer has no attention: a zero one-head linear attention keeps the head size")
    if folded_into_embedding:
        built.notes.append("a removed sublayer's bias before any other is added to the token embeddings")
    built.globals["output_norm.weight"] = _f32(adapter.decoder.norm.weight)
    if arch == "gemma3":
        _gemma3_weights(built, model.config)
    if not tied or folded_into_embedding:
        built.globals["output.weight"] = _f32(head.weight if head is not None else model.get_input_embeddings().weight)
    if head is not None and _nonzero(getattr(head, "bias", None)):
        built.globals["output.bias"] = _f32(head.bias)
    theta, rope = _rope(model.config)
    if rope["rope_type"] == "llama3":
        built.globals["rope_freqs.weight"] = llama3_rope_factors(rope, hd, theta)
    return built


def _gemma3_weights(built: Built, config: Any) -> None:
    """Gemma3RMSNorm multiplies by (1 + weight): llama.cpp's RMS norm by the weight, so add 1 (its converter's
    `norm_shift`). Queries: HF scales them by query_pre_attn_scalar^-½, llama.cpp by `llama_cpp_query_scale`; RoPE
    is linear, so the ratio is folded into the q norm's weight."""
    for tensors in [built.globals] + [layer.tensors for layer in built.layers]:
        for name in tensors:
            if name.endswith("norm.weight"):
                tensors[name] = tensors[name] + 1.0
    ratio = config.query_pre_attn_scalar**-0.5 / llama_cpp_query_scale(config, built.layers[0].n_head)
    if ratio != 1.0:
        for layer in built.layers:
            layer.tensors["attn_q_norm.weight"] = layer.tensors["attn_q_norm.weight"] * ratio


# ----- writing ---------------------------------------------------------------------------------------------------


def _write_hparams(writer: Any, built: Built, config: Any) -> None:
    layers = built.layers
    per_layer = built.arch == "deci"
    n_head = [x.n_head for x in layers]
    n_head_kv = [x.n_head_kv for x in layers]
    n_ff = [x.n_ff for x in layers]
    writer.add_block_count(len(layers))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(n_ff if per_layer else n_ff[0])
    writer.add_head_count(n_head if per_layer else n_head[0])
    writer.add_head_count_kv(n_head_kv if per_layer else n_head_kv[0])
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear" and rope.get("factor") is not None:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if built.experts:
        count, used, shared = built.experts
        writer.add_expert_count(count)
        writer.add_expert_used_count(used)
        if built.arch in ("qwen2moe", "qwen3moe"):  # their n_ff_exp; llama and olmoe size experts by n_ff
            writer.add_expert_feed_forward_length(n_ff[0])
        if shared:
            writer.add_expert_shared_feed_forward_length(shared)
    if built.arch == "gemma3":
        swa = [kind == "sliding_attention" for kind in config.layer_types]
        if any(swa):
            writer.add_sliding_window(config.sliding_window)
            writer.add_sliding_window_pattern(swa)  # per layer: exact after dropped layers
            sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
            writer.add_rope_freq_base_swa(float(sliding.get("rope_theta", 10000.0)))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_key_length(built.head_dim)
    writer.add_value_length(built.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if built.arch in PERMUTED_ARCHS:
        writer.add_rope_dimension_count(built.head_dim)


def write_f32_or_f16(model: torch.nn.Module, tokenizer: Any, path: Path, half: bool) -> tuple[Built, str]:
    """Write the whole GGUF file (2-D weights in F16 when `half`, everything else F32); returns what was built."""
    import gguf

    from .gguf_vocab import write_tokenizer

    built = build(model)
    writer = gguf.GGUFWriter(path, built.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(str(getattr(model.config, "name_or_path", "") or "domainprune")).name or "domainprune")
    _write_hparams(writer, built, model.config)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    pre = write_tokenizer(writer, tokenizer, model.config)
    tensors = dict(built.globals)
    for n, layer in enumerate(built.layers):
        tensors.update({f"blk.{n}.{name}": t for name, t in layer.tensors.items()})
    for name, t in tensors.items():
        arr = t.contiguous().numpy().astype(np.float32)
        if half and arr.ndim >= 2 and not name.endswith("ffn_gate_inp.weight"):
            arr = arr.astype(np.float16)
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return built, pre


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise DomainpruneError(
            "quantised GGUF needs llama.cpp's quantiser: pip install 'domainprune[serve]' (or use --quant f32/f16)"
        ) from None
    return llama_cpp


def quantise(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's own quantiser (`llama_model_quantize`), from an F32 file."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANTS[quant][0]}")
    params.nthread = threads or max(1, os.cpu_count() or 1)
    # llama.cpp writes a line per tensor to stderr (not through llama-cpp-python's logger); the fallbacks are
    # reported from the file, so its log is kept only for the error message
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", text)
    if rc != 0:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "no message")
        raise DomainpruneError(f"llama.cpp's quantiser failed on {src.name} ({last.strip()}); try --quant f16")


def tensor_types(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (GGML type name, shape in ggml order)} of a GGUF file, read from its header only (gguf-py's
    reader parses every metadata value, which takes half a minute for a 49k-token vocabulary)."""
    import struct

    import gguf

    with open(path, "rb") as f:

        def read(fmt: str) -> tuple:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        def skip_value(vtype: int) -> None:
            if vtype == gguf.GGUFValueType.STRING:
                f.seek(read("Q")[0], 1)
            elif vtype == gguf.GGUFValueType.ARRAY:
                sub, count = read("IQ")
                if sub == gguf.GGUFValueType.STRING or sub == gguf.GGUFValueType.ARRAY:
                    for _ in range(count):
                        skip_value(sub)
                else:
                    f.seek(count * SCALAR_SIZES[sub], 1)
            else:
                f.seek(SCALAR_SIZES[vtype], 1)

        magic, _version, n_tensors, n_kv = read("IIQQ")
        if magic != gguf.GGUF_MAGIC:
            raise DomainpruneError(f"{path} is not a GGUF file")
        for _ in range(n_kv):
            f.seek(read("Q")[0], 1)  # key
            skip_value(read("I")[0])
        types = {}
        for _ in range(n_tensors):
            name = f.read(read("Q")[0]).decode()
            dims = list(read(f"{read('I')[0]}Q"))
            kind, _offset = read("IQ")
            types[name] = (gguf.GGMLQuantizationType(kind).name, dims)
    return types


def fallbacks(path: Path, quant: str) -> list[tuple[str, str]]:
    """Weights whose type is not one the quant type gives (llama.cpp demoted them: width not a block multiple);
    the MoE router, which llama.cpp never quantises, is not one of them."""
    expected = QUANTS[quant][1]
    found = tensor_types(path).items()
    return [
        (n, t)
        for n, (t, shape) in found
        if sum(x > 1 for x in shape) >= 2 and t not in expected and not n.endswith("ffn_gate_inp.weight")
    ]


def check_out(out: Path, force: bool, inputs: list[Path] | tuple = ()) -> Path:
    """A .gguf file name that may be written: not an input, not inside an input folder, replaced only with force."""
    from .outputs import check_output

    out = check_output(Path(out), force=force, inputs=inputs, kind="file")
    if out.suffix != ".gguf":
        raise DomainpruneError(f"--out {out} must name a .gguf file")
    return out


def export_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    quant: str = "f32",
    force: bool = False,
    threads: int | None = None,
) -> GGUFExport:
    """Write `out` (a .gguf file) from an in-memory model and its tokenizer; moved into place only when complete."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise DomainpruneError(f"--quant {quant!r} is not supported; use one of {', '.join(QUANTS)}")
    if quant not in ("f32", "f16"):
        llama_cpp_module()  # refuse before the work, not after it
    out = check_out(Path(out), force)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent / f".{out.name}.{os.getpid()}"
    stage, final = Path(f"{base}.f32.tmp"), Path(f"{base}.tmp")
    try:
        if quant in ("f32", "f16"):
            built, pre = write_f32_or_f16(model, tokenizer, final, half=quant == "f16")
        else:
            built, pre = write_f32_or_f16(model, tokenizer, stage, half=False)
            quantise(stage, final, quant, threads)
        demoted = fallbacks(final, quant) if quant not in ("f32", "f16") else []
        os.replace(final, out)
    finally:
        for tmp in (stage, final):
            tmp.unlink(missing_ok=True)
    for name, kind in demoted:
        log.debug("%s: %s (width not a multiple of %s's block)", name, kind, quant)
    return GGUFExport(out, built.arch, quant, len(built.layers), out.stat().st_size, demoted, built.notes, pre)


def export_run(run: str | Path, out: str | Path, *, quant: str = "f32", force: bool = False) -> GGUFExport:
    """`domainprune export RUN --to gguf`: load a run folder (any domainprune output) and write it as GGUF."""
    from .models import load_model

    run = Path(run)
    if not (run / "config.json").is_file():
        raise DomainpruneError(f"{run} is not a model folder (no config.json); give a `domainprune prune` output")
    out = check_out(Path(out), force, inputs=[run.resolve()])  # never over or inside the input run
    loaded = load_model(run, dtype="float32", device="cpu")
    return export_gguf(loaded.model, loaded.tokenizer, out, quant=quant, force=force)
