"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the adapter they share.

In transformers 5.x a sparse MoE block is `layer.mlp` with
- `gate`: the top-k router, a `weight` (num_experts, hidden) whose row e gives expert e's logit, and `top_k`,
- `experts`: every routed expert fused into 3-D parameters, `gate_up_proj` (E, 2·I, hidden) and `down_proj`
  (E, hidden, I), indexed by expert on dim 0, with `num_experts`,
- for Qwen2-MoE also `shared_expert` (a dense MLP) and `shared_expert_gate`, which every token uses.
Prunable units of a MoE layer:
- a routed expert: its router row and its slice of every expert parameter, removed with one index list, so the kept
  experts are renumbered 0..n-1 in their old order (`slice_experts`);
- an MLP channel inside a routed expert: a row of its gate and of its up half of `gate_up_proj` and a column of its
  `down_proj` (`slice_expert_channels`). The fused 3-D tensors give every expert of a layer the same width, so
  every expert keeps the same number of channels (each its own ones);
- an MLP channel of the shared expert (`slice_shared_expert`); the shared expert itself is never removed.
A MoE layer's `LayerShape.intermediate_size` is 0; its widths are `expert_width` and `shared_width`. Attention is the
Llama shape and uses the base adapter. Qwen MoE models may mix in dense layers (`mlp_only_layers`,
`decoder_sparse_step`); those keep the dense MLP machinery.

Statistics (`expert_hooks`) are collected during the layer-wise pass, per routed expert e (float64, shape (E,)):
- `expert_selected`: Σ_t 1[e ∈ topk(t)], the routing count,
- `expert_gate_sum`: Σ_t g_{t,e}, the routing weights the model applied,
- `expert_easyep`: Σ_t 1[e ∈ topk(t)]·g_{t,e}·‖E_e(x_t)‖₂·max(1 − cos(h_t, h_t + Σ_routed g·E(x_t)), 0) with h_t the
  residual stream entering the MoE block (the input of `post_attention_layernorm`) and the sum over routed experts
  only (shared experts excluded), as in EASY-EP,
- `expert_tcess_sum`: Σ_t z_{t,e}·1[e ∈ topk_K(z_t) ∧ softmax(topk_K(z_t))_e ≥ r] on the router logits z, PreMoe's
  TCESS before the 1/T (K = `TCESS_TOP_K`, r = `TCESS_MIN_PROB`; the reference code's K=1 with r disabled),
and for the channel criteria (flap, wanda-sp), the statistics of the down projection inputs of an equivalent dense
MLP: each expert's activation a_{t,e} = act(gate_e·x_t)·(up_e·x_t) weighted by its routing weight g_{t,e}, computed on
the tokens routed to e only and zero on the others (so the sums run over all T tokens):
- `expert_in_sum`, `expert_in_sqsum` (E, I): Σ_t g_{t,e}·a_{t,e,j} and Σ_t (g_{t,e}·a_{t,e,j})²,
- `shared_in_sum`, `shared_in_sqsum` (I_s,): the same for the shared expert, weighted by its gate σ(w·x_t).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DomainpruneError
from .base import DecoderAdapter, LayerShape, _sliced_linear, slice_gated_mlp, slice_gated_mlp_hidden

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


def expert_removals(width: int, multiple: int) -> list[int]:
    """How many channels a routed expert of `width` may lose: 0, or any count leaving a positive multiple of
    `multiple` channels (ascending)."""
    return [0] + [r for r in range(1, width) if (width - r) % multiple == 0]


def _add(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    acc[key] = acc[key] + value if key in acc else value


class MoEAdapter(DecoderAdapter):
    """Adapter for decoders whose `layer.mlp` is a sparse MoE block (module docstring). Subclasses name the config
    key holding the number of routed experts and, for Qwen MoE, the key listing dense layers."""

    experts_config_key: ClassVar[str]  # e.g. "num_local_experts" (Mixtral) or "num_experts" (Qwen2-MoE, OLMoE)
    dense_layers_key: ClassVar[str | None] = None  # "mlp_only_layers" where dense and MoE layers mix
    # transformers' on-disk layout (its conversion mapping): routed experts one tensor each, under
    # `<block>.experts.<j>.<gate>/<up>/<down>.weight`, where the block is `mlp` in memory
    checkpoint_block: ClassVar[str] = "mlp"
    checkpoint_projs: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    expert_width_key: ClassVar[str] = "intermediate_size"  # config key of a routed expert's width
    # A pruned routed expert keeps a multiple of this many channels: transformers' default experts kernel
    # (`grouped_mm`) needs 16-byte aligned rows, i.e. widths divisible by 8 in bf16/fp16 (4 in float32); other
    # widths fail at the first forward with "strides should be multiple of 16 bytes".
    expert_width_multiple: ClassVar[int] = 8
    hidden_width_multiple: ClassVar[int] = 8  # the experts' hidden dimension is a row of the same fused tensors
    hidden_width_reason: ClassVar[str] = "transformers' grouped_mm expert kernel needs 16-byte aligned rows"
    # the shared expert (a dense MLP every token uses, scaled by `shared_gate_weight` of its gate's output): module
    # names in the MoE block and the config key of its width; None where the architecture has none
    shared_expert_name: ClassVar[str | None] = None
    shared_gate_name: ClassVar[str | None] = None
    shared_width_key: ClassVar[str | None] = None

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

    def expert_width(self, i: int) -> int:
        """MLP channels of each routed expert of layer i (`down_proj` is (E, hidden, I)); 0 for a dense layer."""
        return self.experts(i).down_proj.shape[-1] if self.is_moe(i) else 0

    def shared_expert(self, i: int) -> nn.Module | None:
        """Layer i's shared expert (a dense MLP with gate_proj/up_proj/down_proj), or None."""
        if not self.is_moe(i) or not self.shared_expert_name:
            return None
        return getattr(self.mlp(i), self.shared_expert_name, None)

    def shared_width(self, i: int) -> int:
        shared = self.shared_expert(i)
        return shared.down_proj.in_features if shared is not None else 0

    def shared_gate_weight(self, gate_output: torch.Tensor) -> torch.Tensor:
        """The factor the block applies to the shared expert's output, from its gate's output (T, 1)."""
        raise NotImplementedError

    def _check_fused_layout(self, i: int) -> nn.Module:
        """The experts module of layer i, after checking it is the layout this adapter slices: `gate_up_proj` (E, 2I, d)
        = [gates; ups] and `down_proj` (E, d, I), no biases (transformers' `use_experts_implementation` flags)."""
        experts = self.experts(i)
        names = {n for n, _ in experts.named_parameters(recurse=False)}
        flags = (
            getattr(experts, "has_gate", True),
            getattr(experts, "is_concatenated", True),
            getattr(experts, "is_transposed", False),
            getattr(experts, "has_bias", False),
        )
        if names != {"gate_up_proj", "down_proj"} or flags != (True, True, False, False):
            raise DomainpruneError(
                f"layer {i}: the experts' weights {sorted(names)} are not the fused [gate; up] layout this adapter "
                "slices channels of; adapter needs updating"
            )
        return experts

    def expert_mlp_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed experts of layer i as (gate (E, I, d), up (E, I, d), down (E, d, I)), detached."""
        experts = self._check_fused_layout(i)
        w = self.expert_width(i)
        gate_up = experts.gate_up_proj.detach()
        return gate_up[:, :w], gate_up[:, w:], experts.down_proj.detach()

    def shared_mlp_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Layer i's shared expert as (gate (I_s, d), up (I_s, d), down (d, I_s)), detached; None without one."""
        shared = self.shared_expert(i)
        if shared is None:
            return None
        return shared.gate_proj.weight.detach(), shared.up_proj.weight.detach(), shared.down_proj.weight.detach()

    def top_k(self, i: int) -> int:
        return self.router(i).top_k if self.is_moe(i) else 0

    def residual_norm(self, i: int) -> nn.Module:
        """The norm whose input is the residual stream h entering the MoE block."""
        return self.layers[i].post_attention_layernorm

    def _not_moe(self, i: int, what: str) -> None:
        if self.is_moe(i):
            raise DomainpruneError(
                f"layer {i} is a mixture-of-experts layer: it has no {what}; prune its routed experts (plan "
                "`experts`), their channels (`expert_channels`) or its shared expert's channels (`shared_channels`)"
            )

    def down_proj(self, i: int) -> nn.Linear:
        self._not_moe(i, "dense MLP (down_proj)")
        return super().down_proj(i)

    def mlp_in_projs(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        self._not_moe(i, "dense MLP (gate_proj/up_proj)")
        return super().mlp_in_projs(i)

    def shape(self, i: int) -> LayerShape:
        return replace(
            super().shape(i),
            num_experts=self.num_experts(i),
            expert_width=self.expert_width(i),
            shared_width=self.shared_width(i),
        )

    # ----- parameter accounting ----------------------------------------------------------------------------
    def _expert_costs(self) -> tuple[int, int, int, int]:
        """(parameters per channel of a routed expert, per routed expert besides its channels (its router row), per
        channel of the shared expert, of a MoE block that are never pruned (the shared expert's gate)). Read from the
        first MoE layer; every MoE layer has the same costs per unit."""
        i = self.moe_layers()[0]
        e, w, sw = self.num_experts(i), self.expert_width(i), self.shared_width(i)
        count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
        experts, router, shared = count(self.experts(i)), count(self.router(i)), count(self.shared_expert(i))
        fixed = count(self.mlp(i)) - experts - router - shared
        return experts // (e * w), router // e, shared // sw if sw else 0, fixed

    def expert_params(self, num_experts: int, width: int | None = None, shared_width: int | None = None) -> int:
        """Parameters of a MoE block with `num_experts` routed experts of `width` channels each and a shared expert
        of `shared_width` channels (both default to the first MoE layer's); 0 for a layer that is not one."""
        if num_experts == 0:
            return 0
        first = self.moe_layers()[0]
        width = self.expert_width(first) if width is None else width
        shared_width = self.shared_width(first) if shared_width is None else shared_width
        per_channel, per_expert, per_shared, fixed = self._expert_costs()
        return num_experts * (width * per_channel + per_expert) + shared_width * per_shared + fixed

    def layer_params(self, shape: LayerShape) -> int:
        return super().layer_params(shape) + self.expert_params(
            shape.num_experts, shape.expert_width, shape.shared_width
        )

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
                    raise DomainpruneError(
                        f"layer {i}: {name} {tuple(p.shape)} is not indexed by expert; adapter needs updating"
                    )
                index = torch.tensor(keep, dtype=torch.long, device=p.device)
                sliced = p.detach().index_select(0, index).clone()
                setattr(module, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        for module in (block, router, experts):
            if hasattr(module, "num_experts"):
                module.num_experts = len(keep)
            if hasattr(module, "top_k"):
                module.top_k = min(module.top_k, len(keep))

    def slice_expert_channels(self, i: int, keep: list[list[int]]) -> None:
        """Keep, in routed expert e of layer i, the channels `keep[e]` (one list per current expert, all the same
        length: the fused tensors give a layer's experts one width). Router and shared expert are not touched."""
        experts = self._check_fused_layout(i)
        n, w = self.num_experts(i), self.expert_width(i)
        keep = [sorted(k) for k in keep]
        if (
            len(keep) != n
            or len({len(k) for k in keep}) != 1
            or not keep[0]
            or any(len(set(k)) != len(k) or not all(0 <= c < w for c in k) for k in keep)
        ):
            raise DomainpruneError(
                f"layer {i}: give each of the {n} routed experts the same number (≥1) of distinct channels in "
                f"0..{w - 1}"
            )
        gate_up, down = experts.gate_up_proj, experts.down_proj
        idx = torch.tensor(keep, dtype=torch.long, device=gate_up.device)  # (E, c)
        rows = torch.cat([idx, idx + w], dim=1)  # the gate rows, then the same channels' up rows
        new_gate_up = gate_up.detach().gather(1, rows[..., None].expand(-1, -1, gate_up.shape[2])).clone()
        new_down = down.detach().gather(2, idx[:, None, :].expand(-1, down.shape[1], -1)).clone()
        experts.gate_up_proj = nn.Parameter(new_gate_up, requires_grad=gate_up.requires_grad)
        experts.down_proj = nn.Parameter(new_down, requires_grad=down.requires_grad)
        if hasattr(experts, "intermediate_dim"):
            experts.intermediate_dim = idx.shape[1]

    def slice_shared_expert(self, i: int, keep: list[int]) -> None:
        """Keep the given channels of layer i's shared expert (at least one: a shared expert is never removed)."""
        shared = self.shared_expert(i)
        if shared is None:
            raise DomainpruneError(f"layer {i} has no shared expert")
        w = self.shared_width(i)
        if not keep or len(set(keep)) != len(keep) or not all(0 <= c < w for c in keep):
            raise DomainpruneError(f"layer {i}: the shared expert keeps ≥1 distinct channels in 0..{w - 1}")
        slice_gated_mlp(shared, keep)

    def slice_hidden_mlp(self, i: int, idx: torch.Tensor) -> None:
        """Residual channels of a MoE block: router columns, routed experts' input columns and output rows, the
        shared expert like a dense MLP and its gate's input columns."""
        if not self.is_moe(i):
            return super().slice_hidden_mlp(i, idx)
        router, experts = self.router(i), self._check_fused_layout(i)
        dev = router.weight.device
        router.weight = nn.Parameter(router.weight.detach()[:, idx.to(dev)].clone())
        if hasattr(router, "hidden_dim"):
            router.hidden_dim = len(idx)
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[:, :, idx.to(dev)].clone())
        experts.down_proj = nn.Parameter(experts.down_proj.detach()[:, idx.to(dev), :].clone())
        if hasattr(experts, "hidden_dim"):
            experts.hidden_dim = len(idx)
        if (shared := self.shared_expert(i)) is not None:
            slice_gated_mlp_hidden(shared, idx)
            block = self.mlp(i)
            setattr(block, self.shared_gate_name, _sliced_linear(getattr(block, self.shared_gate_name), cols=idx))

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
            self._accumulate_expert_inputs(i, acc, x, top_k_index, top_k_weights)

        handles = [
            self.residual_norm(i).register_forward_pre_hook(on_residual),
            self.router(i).register_forward_hook(on_router),
            self.experts(i).register_forward_hook(on_experts),
        ]
        shared = self.shared_expert(i)
        if shared is not None:  # its down_proj input times the gate factor; whichever hook runs second adds them up

            def shared_part(key: str, value: torch.Tensor) -> None:
                seen[key] = value
                if "shared_in" in seen and "shared_gate" in seen:
                    a = seen.pop("shared_in").reshape(-1, seen["shared_in_width"]).double()
                    x = self.shared_gate_weight(seen.pop("shared_gate")).reshape(-1, 1).double() * a
                    _add(acc, "shared_in_sum", x.sum(0))
                    _add(acc, "shared_in_sqsum", (x * x).sum(0))

            seen["shared_in_width"] = self.shared_width(i)
            handles += [
                shared.down_proj.register_forward_pre_hook(lambda _m, args: shared_part("shared_in", args[0].detach())),
                getattr(self.mlp(i), self.shared_gate_name).register_forward_hook(
                    lambda _m, _args, out: shared_part("shared_gate", out.detach())
                ),
            ]
        return handles

    def _accumulate_expert_inputs(
        self,
        i: int,
        acc: dict[str, torch.Tensor],
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> None:
        """Add Σ_t g·a and Σ_t (g·a)² per routed expert and channel (module docstring), each expert run on the tokens
        routed to it only, with the module's own gating function."""
        experts = self._check_fused_layout(i)
        n, w = self.num_experts(i), self.expert_width(i)
        ids, g = top_k_index.reshape(-1), top_k_weights.reshape(-1)
        token = torch.arange(top_k_index.shape[0], device=ids.device).repeat_interleave(top_k_index.shape[1])
        total = torch.zeros(n, w, dtype=torch.float64, device=x.device)
        squares = torch.zeros_like(total)
        for e in ids.unique().tolist():
            if not 0 <= e < n:  # expert-parallel sentinels
                continue
            pos = (ids == e).nonzero().squeeze(1)
            h = nn.functional.linear(x[token[pos]], experts.gate_up_proj[e])
            if hasattr(experts, "_apply_gate"):
                a = experts._apply_gate(h)
            else:
                gate, up = h.chunk(2, dim=-1)
                a = experts.act_fn(gate) * up
            ga = a.double() * g[pos, None].double()
            total[e] = ga.sum(0)
            squares[e] = (ga * ga).sum(0)
        _add(acc, "expert_in_sum", total)
        _add(acc, "expert_in_sqsum", squares)

    # ----- config ------------------------------------------------------------------------------------------
    def from_checkpoint_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Undo transformers' save-time conversion: per-expert gate/up/down tensors become the fused
        `experts.gate_up_proj` (E, 2·I, d) = [stacked gates; stacked ups] along dim 1 and `experts.down_proj`
        (E, d, I); the block is renamed to `mlp`. Tensors already in the fused layout pass through."""
        gate, up, down = self.checkpoint_projs
        expert_key = re.compile(
            rf"^(.*\.layers\.\d+)\.{re.escape(self.checkpoint_block)}\.experts\.(\d+)\.(\w+)\.weight$"
        )
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
        same number of routed experts, top_k, expert width and shared-expert width in the MoE layers."""
        shapes = self.shapes()
        moe = self.moe_layers()
        heads = {(s.num_heads, s.num_kv_heads) for s in shapes}
        dense = {s.intermediate_size for i, s in enumerate(shapes) if i not in moe}
        experts = {(shapes[i].num_experts, self.top_k(i), shapes[i].expert_width, shapes[i].shared_width) for i in moe}
        return (
            len(heads) == 1 and 0 not in next(iter(heads)) and len(dense) <= 1 and 0 not in dense and len(experts) <= 1
        )

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
            if self.expert_width_key != "intermediate_size" or not dense:  # Mixtral/OLMoE: no dense layers
                setattr(self.config, self.expert_width_key, self.expert_width(moe[0]))
            if self.shared_width_key and self.shared_expert(moe[0]) is not None:
                setattr(self.config, self.shared_width_key, self.shared_width(moe[0]))

    def _layer_overrides(self, i: int, s: LayerShape) -> dict[str, Any]:
        if not self.is_moe(i):
            return super()._layer_overrides(i, s)
        # a MoE layer has no MLP width of its own to record: compare it as if at the global one
        o = super()._layer_overrides(i, replace(s, intermediate_size=self.config.intermediate_size))
        if s.num_experts != getattr(self.config, self.experts_config_key):
            o[self.experts_config_key] = s.num_experts
        if self.top_k(i) != self.config.num_experts_per_tok:
            o["num_experts_per_tok"] = self.top_k(i)
        if s.expert_width != getattr(self.config, self.expert_width_key):
            o[self.expert_width_key] = s.expert_width
        if self.shared_width_key and s.shared_width and s.shared_width != getattr(self.config, self.shared_width_key):
            o[self.shared_width_key] = s.shared_width
        return o

    def _moe_keys(self) -> set[str]:
        return {self.experts_config_key, "num_experts_per_tok", self.expert_width_key, self.shared_width_key or ""}

    def reshape_to(self, per_layer_config: dict[str, dict[str, Any]], extra_biases: list[str]) -> None:
        # a MoE layer's keys are its own (Mixtral's and OLMoE's expert width is `intermediate_size`): not the base's
        moe_keys = self._moe_keys()
        base = {
            key: {k: v for k, v in o.items() if k not in moe_keys} if self.is_moe(int(key)) else o
            for key, o in per_layer_config.items()
        }
        super().reshape_to(base, extra_biases)
        for key, o in per_layer_config.items():
            i = int(key)
            if not self.is_moe(i):
                continue
            if self.experts_config_key in o:
                self.slice_experts(i, list(range(int(o[self.experts_config_key]))))
            if "num_experts_per_tok" in o:
                self.set_top_k(i, int(o["num_experts_per_tok"]))
            if self.expert_width_key in o:
                width = int(o[self.expert_width_key])
                self.slice_expert_channels(i, [list(range(width))] * self.num_experts(i))
            if self.shared_width_key and self.shared_width_key in o:
                self.slice_shared_expert(i, list(range(int(o[self.shared_width_key]))))
