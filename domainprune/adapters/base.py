"""The decoder-only transformer shape shared by Llama, Mistral, Qwen2/3 and Gemma 3, and its surgery.

Units an adapter exposes per layer:
- query heads (head_dim rows of q_proj and columns of o_proj),
- KV groups (one k head, one v head and the query heads that share them),
- MLP channels (a row of gate_proj and up_proj and a column of down_proj),
- the whole decoder layer,
- in mixture-of-experts layers, routed experts, and MLP channels inside the routed experts and the shared expert
  instead of dense MLP channels (`adapters.moe`),
- residual-stream (hidden) channels, the same ones in every layer (`slice_hidden`).
Heads are never split and head_dim is never touched. Under GQA the query heads kept in a layer are ordered by
KV group with the same count in every group, which is what `repeat_kv` in transformers assumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DomainpruneError
from ..registry import Registry

ADAPTERS = Registry("architecture", attribute="model_type")
register = ADAPTERS.register


@dataclass(frozen=True)
class LayerShape:
    num_heads: int  # query heads
    num_kv_heads: int
    intermediate_size: int  # dense MLP channels (0 for a mixture-of-experts layer: see the fields below)
    num_experts: int = 0  # routed experts (0: not a mixture-of-experts layer)
    expert_width: int = 0  # MLP channels of each routed expert (one fused tensor: the same for all of a layer's)
    shared_width: int = 0  # MLP channels of the layer's shared expert (0: none)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


class RemovedAttention(nn.Module):
    """A self-attention block whose every head was pruned. Adds only its compensation bias (zeros if none).

    It still appends empty keys/values to the KV cache so that the cache's sequence length (read from any layer)
    stays right during generation.
    """

    def __init__(self, hidden_size: int, head_dim: int, layer_idx: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.hidden_size, self.head_dim, self.layer_idx = hidden_size, head_dim, layer_idx
        self.bias = nn.Parameter(torch.zeros(hidden_size) if bias is None else bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values=None, **kwargs: Any):
        if past_key_values is not None:
            b, s = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, s, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states).clone(), None


class RemovedMLP(nn.Module):
    """An MLP whose every channel was pruned. Adds only its compensation bias (zeros if none)."""

    def __init__(self, hidden_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.bias = nn.Parameter(torch.zeros(hidden_size) if bias is None else bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states).clone()


def slice_gated_mlp(mlp: nn.Module, keep: list[int]) -> None:
    """Keep channels `keep` of a gate/up/down MLP (a dense layer's, or a shared expert's)."""
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def _slice_removed(block: RemovedAttention | RemovedMLP, idx: torch.Tensor) -> None:
    """Residual channels of a removed sublayer: its compensation bias."""
    block.bias = nn.Parameter(block.bias.detach()[idx.to(block.bias.device)].clone())
    block.hidden_size = len(idx)


def slice_gated_mlp_hidden(mlp: nn.Module, idx: torch.Tensor) -> None:
    """Keep residual channels `idx` of a gate/up/down MLP: gate/up input columns, down output rows."""
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, cols=idx)
    mlp.up_proj = _sliced_linear(mlp.up_proj, cols=idx)
    mlp.down_proj = _sliced_linear(mlp.down_proj, rows=idx)
    if hasattr(mlp, "hidden_size"):
        mlp.hidden_size = len(idx)


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(weight.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _add_bias(linear: nn.Linear, bias: torch.Tensor | None = None) -> None:
    """Give `linear` a bias parameter (zeros unless given) if it has none; add `bias` to it otherwise."""
    w = linear.weight
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
    if bias is not None:
        with torch.no_grad():
            linear.bias.add_(bias.to(device=w.device, dtype=w.dtype))


def _channel_index(units: list[int], width: int) -> torch.Tensor:
    """Indices of the `width` consecutive columns of each unit (a head is head_dim columns)."""
    if not units:
        return torch.empty(0, dtype=torch.long)
    base = torch.tensor(units, dtype=torch.long)[:, None] * width
    return (base + torch.arange(width)).reshape(-1)


class DecoderAdapter:
    """Adapter for the Llama-style decoder: `model.model.layers[i].self_attn.{q,k,v,o}_proj` and
    `.mlp.{gate,up,down}_proj`. Subclasses state which config flags, if any, give o_proj/down_proj a bias."""

    model_type: ClassVar[str]
    attention_bias_flag: ClassVar[str | None] = None  # config key that adds q/k/v/o biases
    mlp_bias_flag: ClassVar[str | None] = None  # config key that adds gate/up/down biases
    prunable_heads: ClassVar[bool] = True  # False where heads cannot be removed exactly (validate_plan refuses)
    heads_not_prunable_reason: ClassVar[str] = ""  # why, for the error message
    prunable_hidden: ClassVar[bool] = True  # False where residual channels cannot be removed exactly
    hidden_not_prunable_reason: ClassVar[str] = ""
    norm_eps_key: ClassVar[str] = "rms_norm_eps"  # config key of the RMSNorm epsilon
    hidden_width_multiple: ClassVar[int] = 1  # a pruned hidden size must be a multiple of this
    hidden_width_reason: ClassVar[str] = ""
    # the config class refuses a hidden size its global attention-head count does not divide (LlamaConfig)
    heads_divide_hidden: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ----- structure -------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def attention(self, i: int) -> nn.Module:
        return self.layers[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp

    @contextmanager
    def swapped(self, i: int, attention: nn.Module | None = None, mlp: nn.Module | None = None) -> Iterator[None]:
        """Layer i runs with these stand-ins for its attention and/or MLP block (e.g. replaying outputs already
        computed), its own blocks back afterwards."""
        layer = self.layers[i]
        saved = layer.self_attn, layer.mlp
        try:
            layer.self_attn = attention if attention is not None else saved[0]
            layer.mlp = mlp if mlp is not None else saved[1]
            yield
        finally:
            layer.self_attn, layer.mlp = saved

    def attention_removed(self, i: int) -> bool:
        return isinstance(self.attention(i), RemovedAttention)

    def mlp_removed(self, i: int) -> bool:
        return isinstance(self.mlp(i), RemovedMLP)

    def has_dense_mlp(self, i: int) -> bool:
        """Layer i has MLP channels (gate/up/down_proj): not removed, and not a mixture-of-experts block."""
        return not self.mlp_removed(i)

    def has_experts(self) -> bool:
        """Whether any layer is a mixture-of-experts block (see `adapters.moe.MoEAdapter`)."""
        return False

    def expert_hooks(self, i: int, acc: dict[str, torch.Tensor]) -> list:
        """Register hooks that add layer i's per-expert routing statistics to `acc` during the layer-wise pass;
        returns their handles. Dense layers have none."""
        return []

    def o_proj(self, i: int) -> nn.Linear:
        return self.attention(i).o_proj

    def down_proj(self, i: int) -> nn.Linear:
        return self.mlp(i).down_proj

    def attention_in_projs(self, i: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        a = self.attention(i)
        return a.q_proj, a.k_proj, a.v_proj

    def mlp_in_projs(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        m = self.mlp(i)
        return m.gate_proj, m.up_proj

    def shape(self, i: int) -> LayerShape:
        """Current widths of layer i, read from the weights (so it is right for heterogeneous models)."""
        if self.attention_removed(i):
            nq = nkv = 0
        else:
            q, k, _ = self.attention_in_projs(i)
            nq, nkv = q.out_features // self.head_dim, k.out_features // self.head_dim
        nch = self.down_proj(i).in_features if self.has_dense_mlp(i) else 0
        return LayerShape(nq, nkv, nch)

    def shapes(self) -> list[LayerShape]:
        return [self.shape(i) for i in range(self.num_layers)]

    # ----- parameter accounting ----------------------------------------------------------------------------
    def attention_params(self, num_heads: int, num_kv_heads: int) -> int:
        """Parameters of an attention block with these head counts (q/k/v biases counted where the arch has them)."""
        if num_heads == 0:
            return 0
        d, hd = self.hidden_size, self.head_dim
        rows = (num_heads + 2 * num_kv_heads) * hd
        return rows * d + (rows if self._qkv_bias() else 0) + num_heads * hd * d

    def _qkv_bias(self) -> bool:
        return any(
            self.attention_in_projs(i)[0].bias is not None
            for i in range(self.num_layers)
            if not self.attention_removed(i)
        )

    def mlp_params(self, channels: int) -> int:
        return 3 * self.hidden_size * channels

    def layer_params(self, shape: LayerShape) -> int:
        return self.attention_params(shape.num_heads, shape.num_kv_heads) + self.mlp_params(shape.intermediate_size)

    # ----- surgery -----------------------------------------------------------------------------------------
    def slice_attention(
        self, i: int, keep_heads: list[int], keep_kv_heads: list[int], bias: torch.Tensor | None = None
    ) -> None:
        """Keep the given query heads and KV heads of layer i (indices into its current heads).

        `bias` (hidden_size,) is added to o_proj's output: FLAP's compensation for the removed heads' mean output.
        """
        shape = self.shape(i)
        attn = self.attention(i)
        group = shape.group_size
        keep_kv_heads = sorted(keep_kv_heads)
        by_group = {g: sorted(h for h in keep_heads if h // group == g) for g in keep_kv_heads}
        counts = {len(v) for v in by_group.values()}
        if any(h // group not in by_group for h in keep_heads) or len(counts) > 1 or 0 in counts:
            raise DomainpruneError(
                f"layer {i}: kept query heads {sorted(keep_heads)} do not fill kept KV groups {keep_kv_heads} equally "
                f"(group size {group}); every kept KV group needs the same number of its own query heads"
            )
        if not keep_kv_heads:
            self.layers[i].self_attn = RemovedAttention(self.hidden_size, self.head_dim, attn.layer_idx, bias)
            return
        heads = [h for g in keep_kv_heads for h in by_group[g]]
        q_rows, kv_rows = _channel_index(heads, self.head_dim), _channel_index(keep_kv_heads, self.head_dim)
        attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)
        attn.num_key_value_groups = len(heads) // len(keep_kv_heads)
        for name, value in (("num_heads", len(heads)), ("num_key_value_heads", len(keep_kv_heads))):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if bias is not None:
            _add_bias(attn.o_proj, bias)

    def slice_mlp(self, i: int, keep_channels: list[int], bias: torch.Tensor | None = None) -> None:
        """Keep the given intermediate channels of layer i; `bias` is added to down_proj's output."""
        mlp = self.mlp(i)
        if not keep_channels:
            self.layers[i].mlp = RemovedMLP(self.hidden_size, bias)
            return
        slice_gated_mlp(mlp, keep_channels)
        if bias is not None:
            _add_bias(mlp.down_proj, bias)

    def residual_norms(self) -> list[nn.Module]:
        """The RMSNorms over the residual stream: each layer's two and the final one."""
        return [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [
            self.decoder.norm
        ]

    def hidden_multiple(self) -> int:
        """What a pruned hidden size of this (unpruned) model must be a multiple of: the experts kernel's alignment,
        and where the config demands it, every attention-head count a uniform head plan can leave (K KV groups of G
        query heads: g·G or K·q heads), or the original head count alone when that least common multiple is over
        hidden_size/8 (then a uniform head plan whose count does not divide is refused at surgery)."""
        multiple = self.hidden_width_multiple
        if self.heads_divide_hidden:
            s = self.shape(0)
            groups, size = s.num_kv_heads, s.group_size
            heads = math.lcm(*{g * size for g in range(1, groups + 1)}, *{groups * q for q in range(1, size + 1)})
            multiple = math.lcm(multiple, heads if heads <= self.hidden_size // 8 else s.num_heads)
        return multiple

    def slice_hidden(self, keep: list[int]) -> None:
        """Keep residual-stream channels `keep` (of hidden_size d) everywhere: embedding columns, LM head input
        columns, every residual RMSNorm, q/k/v and gate/up input columns, o_proj/down_proj output rows (and biases).

        An RMSNorm over d′ < d channels divides by the mean square over d′ channels; scaling its weight by √(d/d′)
        and its epsilon by d/d′ makes it compute exactly what it did over d channels when the removed channels are
        zero, so removing channels the residual stream never carries leaves the model's function unchanged.
        """
        d = self.hidden_size
        if not self.prunable_hidden:
            raise DomainpruneError(
                f"hidden channels of {self.model_type!r} models cannot be pruned exactly "
                f"({self.hidden_not_prunable_reason})"
            )
        keep = sorted(set(keep))
        if not keep or not all(0 <= c < d for c in keep):
            raise DomainpruneError(f"hidden channels to keep must be ≥1 distinct indices in 0..{d - 1}")
        if len(keep) == d:
            return
        if len(keep) % self.hidden_width_multiple:
            raise DomainpruneError(
                f"keep a multiple of {self.hidden_width_multiple} hidden channels on {self.model_type!r} models, not "
                f"{len(keep)}: {self.hidden_width_reason}"
            )
        heads = self.shape(0).num_heads if self.is_uniform() else self.config.num_attention_heads
        if self.heads_divide_hidden and len(keep) % heads:
            raise DomainpruneError(
                f"{self.model_type!r} configs need the hidden size divisible by the attention-head count: {len(keep)} "
                f"hidden channels with {heads} heads per layer; choose another --hidden-sparsity or --allocation global"
            )
        idx = torch.tensor(keep, dtype=torch.long)
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        embed.weight = nn.Parameter(embed.weight.detach()[:, idx.to(embed.weight.device)].clone())
        embed.embedding_dim = len(keep)
        if tied:
            head.weight, head.in_features = embed.weight, len(keep)
        elif head is not None:
            self.model.set_output_embeddings(_sliced_linear(head, cols=idx))
        scale = math.sqrt(d / len(keep))
        for norm in self.residual_norms():
            w = norm.weight.detach()
            norm.weight = nn.Parameter((w[idx.to(w.device)].double() * scale).to(w.dtype))
        for i in range(self.num_layers):
            self.slice_hidden_attention(i, idx)
            self.slice_hidden_mlp(i, idx)
        old_eps = getattr(self.config, self.norm_eps_key)
        new_eps = old_eps * d / len(keep)
        setattr(self.config, self.norm_eps_key, new_eps)
        for module in self.model.modules():  # every norm reading the config's epsilon, as a reload will build them
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(module, attr, None), float) and getattr(module, attr) == old_eps:
                    setattr(module, attr, new_eps)
        self.config.hidden_size = len(keep)

    def slice_hidden_attention(self, i: int, idx: torch.Tensor) -> None:
        attn = self.attention(i)
        if isinstance(attn, RemovedAttention):
            return _slice_removed(attn, idx)
        attn.q_proj = _sliced_linear(attn.q_proj, cols=idx)
        attn.k_proj = _sliced_linear(attn.k_proj, cols=idx)
        attn.v_proj = _sliced_linear(attn.v_proj, cols=idx)
        attn.o_proj = _sliced_linear(attn.o_proj, rows=idx)

    def slice_hidden_mlp(self, i: int, idx: torch.Tensor) -> None:
        mlp = self.mlp(i)
        if isinstance(mlp, RemovedMLP):
            return _slice_removed(mlp, idx)
        slice_gated_mlp_hidden(mlp, idx)

    def keep_layers(self, keep: list[int]) -> None:
        """Drop every decoder layer not in `keep`, renumbering the kept ones for the KV cache."""
        keep = sorted(keep)
        if not keep:
            raise DomainpruneError("the plan drops every decoder layer; keep at least one")
        self.decoder.layers = nn.ModuleList(self.layers[i] for i in keep)
        for new_idx, layer in enumerate(self.layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        if getattr(self.config, "layer_types", None) is not None:
            self.config.layer_types = [self.config.layer_types[i] for i in keep]
        self.config.num_hidden_layers = len(keep)

    def ensure_output_biases(self) -> None:
        """Give every layer's o_proj and down_proj a bias (zeros), plus whatever else the config flag implies.

        Called after bias compensation so all layers have the same parameter set, which stock loading needs.
        """
        attn_bias = any(
            not self.attention_removed(i) and self.o_proj(i).bias is not None for i in range(self.num_layers)
        )
        mlp_bias = any(self.has_dense_mlp(i) and self.down_proj(i).bias is not None for i in range(self.num_layers))
        for i in range(self.num_layers):
            if attn_bias and not self.attention_removed(i):
                _add_bias(self.o_proj(i))
                if self.attention_bias_flag:
                    for proj in self.attention_in_projs(i):
                        _add_bias(proj)
            if mlp_bias and self.has_dense_mlp(i):
                _add_bias(self.down_proj(i))
                if self.mlp_bias_flag:
                    for proj in self.mlp_in_projs(i):
                        _add_bias(proj)
        if attn_bias and self.attention_bias_flag:
            setattr(self.config, self.attention_bias_flag, True)
        if mlp_bias and self.mlp_bias_flag:
            setattr(self.config, self.mlp_bias_flag, True)

    # ----- config ------------------------------------------------------------------------------------------
    def extra_biases(self) -> list[str]:
        """Module suffixes carrying a bias that the stock config of this architecture cannot express."""
        extra = []
        if not self.attention_bias_flag and any(
            not self.attention_removed(i) and self.o_proj(i).bias is not None for i in range(self.num_layers)
        ):
            extra.append("self_attn.o_proj")
        if not self.mlp_bias_flag and any(
            self.has_dense_mlp(i) and self.down_proj(i).bias is not None for i in range(self.num_layers)
        ):
            extra.append("mlp.down_proj")
        return extra

    def is_uniform(self) -> bool:
        shapes = set(self.shapes())
        return len(shapes) == 1 and 0 not in (next(iter(shapes)).num_heads, next(iter(shapes)).intermediate_size)

    def sync_config(self) -> None:
        """Make the in-memory config describe the weights where one global value can (all layers alike)."""
        self.config.head_dim = self.head_dim  # explicit, since hidden_size // num_heads no longer holds
        if self.is_uniform():
            s = self.shape(0)
            self.config.num_attention_heads = s.num_heads
            self.config.num_key_value_heads = s.num_kv_heads
            self.config.intermediate_size = s.intermediate_size

    def per_layer_config(self) -> dict[str, dict[str, Any]]:
        """transformers' `per_layer_config` overrides for the layers whose widths differ from the global config."""
        if self.is_uniform():
            return {}
        overrides: dict[str, dict[str, Any]] = {}
        for i, s in enumerate(self.shapes()):
            if o := self._layer_overrides(i, s):
                overrides[str(i)] = o
        return overrides

    def _layer_overrides(self, i: int, s: LayerShape) -> dict[str, Any]:
        """The `per_layer_config` entry of layer i (empty if it matches the global config)."""
        o: dict[str, Any] = {}
        if s.num_heads == 0:
            o["skip"] = ["self_attn"]
        else:
            if s.num_heads != self.config.num_attention_heads:
                o["num_attention_heads"] = s.num_heads
            if s.num_kv_heads != self.config.num_key_value_heads:
                o["num_key_value_heads"] = s.num_kv_heads
        if s.intermediate_size == 0:
            o["skip"] = [*o.get("skip", []), "mlp"]
        elif s.intermediate_size != self.config.intermediate_size:
            o["intermediate_size"] = s.intermediate_size
        return o

    def from_checkpoint_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors as `save_pretrained` wrote them -> named as this model's modules (the same for dense models)."""
        return state

    def reshape_to(self, per_layer_config: dict[str, dict[str, Any]], extra_biases: list[str]) -> None:
        """Turn a freshly built full-width model into the shapes a saved checkpoint describes (before loading it)."""
        for key, o in per_layer_config.items():
            i = int(key)
            s = self.shape(i)
            skip = set(o.get("skip", []))
            nq = 0 if "self_attn" in skip else o.get("num_attention_heads", s.num_heads)
            nkv = 0 if "self_attn" in skip else o.get("num_key_value_heads", s.num_kv_heads)
            nch = 0 if "mlp" in skip else o.get("intermediate_size", s.intermediate_size)
            if nkv and (nq % nkv or nq // nkv > s.group_size or nkv > s.num_kv_heads):
                raise DomainpruneError(f"per_layer_config layer {i}: {nq} query heads cannot share {nkv} KV heads")
            heads = [g * s.group_size + j for g in range(nkv) for j in range(nq // nkv)] if nkv else []
            if (nq, nkv) != (s.num_heads, s.num_kv_heads):
                self.slice_attention(i, heads, list(range(nkv)))
            if nch != s.intermediate_size:
                self.slice_mlp(i, list(range(nch)))
        for i in range(self.num_layers):
            if "self_attn.o_proj" in extra_biases and not self.attention_removed(i):
                _add_bias(self.o_proj(i))
            if "mlp.down_proj" in extra_biases and self.has_dense_mlp(i):
                _add_bias(self.down_proj(i))
