"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the adapter they share.

In transformers 5.x a sparse MoE block is `layer.mlp` with
- `gate`: the top-k router, a `weight` (num_experts, hidden) whose row e gives expert e's logit, and `top_k`,
- `experts`: every routed expert fused into 3-D parameters, `gate_up_proj` (E, 2·I, hidden) and `down_proj`
  (E, hidden, I), indexed by expert on dim 0, with `num_experts`,
- for Qwen2-MoE also `shared_expert` (a dense MLP) and `shared_expert_gate`, which every token uses.
The prunable unit is a routed expert: its router row and its slice of every expert parameter, removed with one
index list, so the kept experts are renumbered 0..n-1 in their old order. Shared experts are never pruned, and MLP
channels inside experts are not pruned (a layer's `LayerShape.intermediate_size` is 0). Attention is the Llama
shape and uses the base adapter. Qwen MoE models may mix in dense layers (`mlp_only_layers`,
`decoder_sparse_step`); those keep the dense MLP machinery.

Statistics (`expert_hooks`) are collected during the layer-wise pass, per routed expert e (float64, shape (E,)):
- `expert_selected`: Σ_t 1[e ∈ topk(t)], the routing count,
- `expert_gate_sum`: Σ_t g_{t,e}, the routing weights the model applied,
- `expert_easyep`: Σ_t 1[e ∈ topk(t)]·g_{t,e}·‖E_e(x_t)‖₂·max(1 − cos(h_t, h_t + Σ_routed g·E(x_t)), 0) with h_t the
  residual stream entering the MoE block (the input of `post_attention_layernorm`) and the sum over routed experts
  only (shared experts excluded), as in EASY-EP,
- `expert_tcess_sum`: Σ_t z_{t,e}·1[e ∈ topk_K(z_t) ∧ softmax(topk_K(z_t))_e ≥ r] on the router logits z, PreMoe's
  TCESS before the 1/T (K = `TCESS_TOP_K`, r = `TCESS_MIN_PROB`; the reference code's K=1 with r disabled).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DomainpruneError
from .base import DecoderAdapter, LayerShape

TCESS_TOP_K = 1
TCESS_MIN_PROB: float | None = None  # r; None = disabled (PreMoe's -1)


def accumulate_expert_stats(
    acc: dict[str, torch.Tensor],
    num_experts: int,
    residual: torch.Tensor,
    router_logits: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_outputs: torch.Tensor,
    routed: torch.Tensor,
) -> None:
    """Add one batch's per-expert statistics (module docstring) to `acc`.

    Shapes, T tokens and k routed experts per token: residual (T, d) = h_t, router_logits (T, E), top_k_index and
    top_k_weights (T, k), expert_outputs (T, k, d) = E_e(x_t) unweighted for each selected e, routed (T, d) = the
    experts' weighted sum (shared experts excluded).
    """
    dev = top_k_index.device
    idx = top_k_index.reshape(-1)

    def add(key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        total = torch.zeros(num_experts, dtype=torch.float64, device=dev).index_add_(0, index, values.reshape(-1))
        acc[key] = acc[key] + total if key in acc else total

    g = top_k_weights.double()
    h = residual.reshape(-1, residual.shape[-1]).double()
    cos = nn.functional.cosine_similarity(h, h + routed.double(), dim=-1)
    shift = (1 - cos).clamp_min(0)
    norms = expert_outputs.double().norm(dim=-1)
    add("expert_selected", idx, torch.ones_like(g))
    add("expert_gate_sum", idx, g)
    add("expert_easyep", idx, g * norms * shift[:, None])
    z = router_logits.reshape(-1, num_experts).double()
    top_z, top_i = z.topk(min(TCESS_TOP_K, num_experts), dim=-1)
    keep = torch.ones_like(top_z) if TCESS_MIN_PROB is None else (top_z.softmax(-1) >= TCESS_MIN_PROB).double()
    add("expert_tcess_sum", top_i.reshape(-1), top_z * keep)


class MoEAdapter(DecoderAdapter):
    """Adapter for decoders whose `layer.mlp` is a sparse MoE block (module docstring). Subclasses name the config
    key holding the number of routed experts and, for Qwen MoE, the key listing dense layers."""

    experts_config_key: ClassVar[str]  # e.g. "num_local_experts" (Mixtral) or "num_experts" (Qwen2-MoE, OLMoE)
    dense_layers_key: ClassVar[str | None] = None  # "mlp_only_layers" where dense and MoE layers mix
    # transformers' on-disk layout (its conversion mapping): routed experts one tensor each, under
    # `<block>.experts.<j>.<gate>/<up>/<down>.weight`, where the block is `mlp` in memory
    checkpoint_block: ClassVar[str] = "mlp"
    checkpoint_projs: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")

    # ----- structure -------------------------------------------------------------------------------------
    def is_moe(self, i: int) -> bool:
        m = self.mlp(i)
        return hasattr(m, "experts") and hasattr(m, "gate")

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe(i)]

    def has_experts(self) -> bool:
        return bool(self.moe_layers())

    def has_dense_mlp(self, i: int) -> bool:
        return not self.is_moe(i) and super().has_dense_mlp(i)

    def router(self, i: int) -> nn.Module:
        return self.mlp(i).gate

    def experts(self, i: int) -> nn.Module:
        return self.mlp(i).experts

    def num_experts(self, i: int) -> int:
        return self.router(i).weight.shape[0] if self.is_moe(i) else 0

    def top_k(self, i: int) -> int:
        return self.router(i).top_k if self.is_moe(i) else 0

    def residual_norm(self, i: int) -> nn.Module:
        """The norm whose input is the residual stream h entering the MoE block."""
        return self.layers[i].post_attention_layernorm

    def _not_moe(self, i: int, what: str) -> None:
        if self.is_moe(i):
            raise DomainpruneError(
                f"layer {i} is a mixture-of-experts layer: it has no {what}; its routed experts are pruned whole "
                "(plan `experts`, --experts-keep) and shared experts never"
            )

    def down_proj(self, i: int) -> nn.Linear:
        self._not_moe(i, "dense MLP (down_proj)")
        return super().down_proj(i)

    def mlp_in_projs(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        self._not_moe(i, "dense MLP (gate_proj/up_proj)")
        return super().mlp_in_projs(i)

    def shape(self, i: int) -> LayerShape:
        return replace(super().shape(i), num_experts=self.num_experts(i))

    # ----- parameter accounting ----------------------------------------------------------------------------
    def _expert_costs(self) -> tuple[int, int]:
        """(parameters per routed expert including its router row, parameters of a MoE block that are never
        pruned: shared expert and its gate). Read from the first MoE layer; all MoE layers are alike."""
        i = self.moe_layers()[0]
        e = self.num_experts(i)
        sliced = [*self.router(i).parameters(), *self.experts(i).parameters()]
        per_expert = sum(p.numel() // e for p in sliced)
        fixed = sum(p.numel() for p in self.mlp(i).parameters()) - sum(p.numel() for p in sliced)
        return per_expert, fixed

    def expert_params(self, num_experts: int) -> int:
        """Parameters of a MoE block with `num_experts` routed experts (0 for a layer that is not one)."""
        if num_experts == 0:
            return 0
        per_expert, fixed = self._expert_costs()
        return num_experts * per_expert + fixed

    def layer_params(self, shape: LayerShape) -> int:
        return super().layer_params(shape) + self.expert_params(shape.num_experts)

    # ----- surgery -----------------------------------------------------------------------------------------
    def slice_mlp(self, i: int, keep_channels: list[int], bias: torch.Tensor | None = None) -> None:
        self._not_moe(i, "MLP channels")
        super().slice_mlp(i, keep_channels, bias)

    def slice_experts(self, i: int, keep: list[int]) -> None:
        """Keep the given routed experts of layer i (indices into its current experts), renumbered in order.

        The router rows and every expert parameter are sliced with the same index list; the block's
        `num_experts` and `top_k` follow (top_k capped at the experts left). Shared experts are not touched.
        """
        if not self.is_moe(i):
            raise DomainpruneError(f"layer {i} is not a mixture-of-experts layer; it has no experts to prune")
        n = self.num_experts(i)
        keep = sorted(set(keep))
        if not keep or not all(0 <= e < n for e in keep):
            raise DomainpruneError(f"layer {i}: experts to keep must be ≥1 indices in 0..{n - 1} (routed experts only)")
        block, router, experts = self.mlp(i), self.router(i), self.experts(i)
        for module in (router, experts):
            for name, p in list(module.named_parameters(recurse=False)):
                if p.shape[0] != n:
                    raise DomainpruneError(f"layer {i}: {name} {tuple(p.shape)} is not indexed by expert; adapter needs updating")
                index = torch.tensor(keep, dtype=torch.long, device=p.device)
                sliced = p.detach().index_select(0, index).clone()
                setattr(module, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        for module in (block, router, experts):
            if hasattr(module, "num_experts"):
                module.num_experts = len(keep)
            if hasattr(module, "top_k"):
                module.top_k = min(module.top_k, len(keep))

    def set_top_k(self, i: int, k: int) -> None:
        for module in (self.mlp(i), self.router(i)):
            if hasattr(module, "top_k"):
                module.top_k = k

    def keep_layers(self, keep: list[int]) -> None:
        dropping = sorted(keep) != list(range(self.num_layers))
        super().keep_layers(keep)
        if dropping and self.dense_layers_key:
            # which layers are dense is given by index; say it for the new indices alone
            setattr(self.config, self.dense_layers_key, [i for i in range(self.num_layers) if not self.is_moe(i)])
            self.config.decoder_sparse_step = 1

    # ----- statistics --------------------------------------------------------------------------------------
    def expert_hooks(self, i: int, acc: dict[str, torch.Tensor]) -> list:
        if not self.is_moe(i):
            return []
        seen: dict[str, torch.Tensor] = {}
        n = self.num_experts(i)

        def on_residual(_module, args):
            seen["h"] = args[0]

        def on_router(_module, _args, out):
            seen["logits"] = out[0]

        def on_experts(module, args, routed):
            x, top_k_index, top_k_weights = args[:3]
            t, k = top_k_index.shape
            # every selected expert's own output on its token, unweighted, by the module's own forward (the
            # call bypasses hooks): each (token, slot) pair routed alone to its expert with weight 1
            single = module.forward(
                x.repeat_interleave(k, dim=0), top_k_index.reshape(-1, 1), torch.ones_like(top_k_weights).reshape(-1, 1)
            )
            accumulate_expert_stats(
                acc, n, seen.pop("h"), seen.pop("logits"), top_k_index, top_k_weights, single.reshape(t, k, -1), routed
            )

        return [
            self.residual_norm(i).register_forward_pre_hook(on_residual),
            self.router(i).register_forward_hook(on_router),
            self.experts(i).register_forward_hook(on_experts),
        ]

    # ----- config ------------------------------------------------------------------------------------------
    def from_checkpoint_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Undo transformers' save-time conversion: per-expert gate/up/down tensors become the fused
        `experts.gate_up_proj` (E, 2·I, d) = [stacked gates; stacked ups] along dim 1 and `experts.down_proj`
        (E, d, I); the block is renamed to `mlp`. Tensors already in the fused layout pass through."""
        gate, up, down = self.checkpoint_projs
        expert_key = re.compile(rf"^(.*\.layers\.\d+)\.{re.escape(self.checkpoint_block)}\.experts\.(\d+)\.(\w+)\.weight$")
        out: dict[str, torch.Tensor] = {}
        grouped: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        for key, tensor in state.items():
            if m := expert_key.match(key):
                grouped.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensor
            else:
                out[key.replace(f".{self.checkpoint_block}.", ".mlp.")] = tensor
        for prefix, projs in grouped.items():
            n = len(projs.get(gate, {}))
            if {p: sorted(v) for p, v in projs.items()} != {p: list(range(n)) for p in (gate, up, down)}:
                raise DomainpruneError(f"{prefix}: the checkpoint's experts are incomplete; it is damaged")
            stack = lambda p: torch.stack([projs[p][j] for j in range(n)])  # noqa: E731
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stack(gate), stack(up)], dim=1)
            out[f"{prefix}.mlp.experts.down_proj"] = stack(down)
        return out

    def is_uniform(self) -> bool:
        """One global config describes every layer: same heads everywhere, same dense width in the dense layers,
        same number of routed experts and top_k in the MoE layers."""
        shapes = self.shapes()
        moe = self.moe_layers()
        heads = {(s.num_heads, s.num_kv_heads) for s in shapes}
        dense = {s.intermediate_size for i, s in enumerate(shapes) if i not in moe}
        experts = {(shapes[i].num_experts, self.top_k(i)) for i in moe}
        return len(heads) == 1 and 0 not in next(iter(heads)) and len(dense) <= 1 and 0 not in dense and len(experts) <= 1

    def sync_config(self) -> None:
        self.config.head_dim = self.head_dim
        if not self.is_uniform():
            return
        s = self.shape(0)
        self.config.num_attention_heads = s.num_heads
        self.config.num_key_value_heads = s.num_kv_heads
        moe = self.moe_layers()
        dense = [i for i in range(self.num_layers) if i not in moe]
        if dense:
            self.config.intermediate_size = self.shape(dense[0]).intermediate_size
        if moe:
            setattr(self.config, self.experts_config_key, self.num_experts(moe[0]))
            self.config.num_experts_per_tok = self.top_k(moe[0])

    def _layer_overrides(self, i: int, s: LayerShape) -> dict[str, Any]:
        if not self.is_moe(i):
            return super()._layer_overrides(i, s)
        # a MoE layer has no MLP width of its own to record: compare it as if at the global one
        o = super()._layer_overrides(i, replace(s, intermediate_size=self.config.intermediate_size))
        if s.num_experts != getattr(self.config, self.experts_config_key):
            o[self.experts_config_key] = s.num_experts
        if self.top_k(i) != self.config.num_experts_per_tok:
            o["num_experts_per_tok"] = self.top_k(i)
        return o

    def reshape_to(self, per_layer_config: dict[str, dict[str, Any]], extra_biases: list[str]) -> None:
        super().reshape_to(per_layer_config, extra_biases)
        for key, o in per_layer_config.items():
            i = int(key)
            if self.experts_config_key in o:
                self.slice_experts(i, list(range(int(o[self.experts_config_key]))))
            if "num_experts_per_tok" in o:
                self.set_top_k(i, int(o["num_experts_per_tok"]))
