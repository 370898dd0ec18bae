"""Execute a plan: physically slice weight matrices (never masks), optionally compensate, update the config."""

from __future__ import annotations

import torch

from .adapters import DecoderAdapter, get_adapter
from .plan import LayerPlan, Plan, validate_plan


def removed_mean_output(weight: torch.Tensor, mean_input: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
    """FLAP bias compensation: W[:, P] · x̄_P, the average contribution of the removed input columns P."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept_cols.to(weight.device)] = False
    mean = mean_input.to(device=weight.device, dtype=torch.float64)
    return (weight.detach().double()[:, removed] @ mean[removed]).to(weight.dtype)


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    base = torch.tensor(sorted(heads), dtype=torch.long)[:, None] * head_dim
    return (base + torch.arange(head_dim)).reshape(-1)


def prune_layer(adapter: DecoderAdapter, lp: LayerPlan, means: dict[str, torch.Tensor] | None = None) -> None:
    """Slice one (still unpruned) layer to `lp`. With `means` (calibration means of the o_proj/down_proj inputs,
    keys "attn_in_mean"/"mlp_in_mean"), removed units are replaced by their mean output as a bias (FLAP); sublayers
    a depth method removed (`lp.skip`) are never compensated."""
    i, s = lp.index, adapter.shape(lp.index)
    if (len(lp.query_heads), len(lp.kv_heads)) != (s.num_heads, s.num_kv_heads):
        bias = None
        if means is not None and "self_attn" not in lp.skip:
            cols = _head_columns(lp.query_heads, adapter.head_dim)
            bias = removed_mean_output(adapter.o_proj(i).weight, means["attn_in_mean"], cols)
        adapter.slice_attention(i, lp.query_heads, lp.kv_heads, bias)
    if len(lp.mlp_channels) != s.intermediate_size:
        bias = None
        if means is not None and "mlp" not in lp.skip:
            cols = torch.tensor(sorted(lp.mlp_channels), dtype=torch.long)
            bias = removed_mean_output(adapter.down_proj(i).weight, means["mlp_in_mean"], cols)
        adapter.slice_mlp(i, lp.mlp_channels, bias)
    if lp.experts is not None and len(lp.experts) != s.num_experts:
        # router rows and expert weights with one index list; top_k capped at the experts left (adapters.moe)
        adapter.slice_experts(i, lp.experts)
    if lp.expert_channels is not None:
        # keyed by the original expert index; the kept experts are now renumbered 0..n-1 in that order. No bias
        # compensation: the fused experts and the MoE block have no output bias to carry it (docs/moe.md)
        kept = sorted(lp.experts) if lp.experts is not None else list(range(s.num_experts))
        per_expert = [lp.expert_channels[e] for e in kept]
        if any(len(c) != s.expert_width for c in per_expert):
            adapter.slice_expert_channels(i, per_expert)
    if lp.shared_channels is not None and len(lp.shared_channels) != s.shared_width:
        adapter.slice_shared_expert(i, lp.shared_channels)


def finish(adapter: DecoderAdapter, plan: Plan, compensated: bool) -> None:
    """After every layer is sliced: uniform bias sets, dropped layers, hidden channels, config."""
    if compensated:
        adapter.ensure_output_biases()
    adapter.keep_layers([lp.index for lp in plan.layers if not lp.drop])
    if plan.hidden_channels is not None:
        adapter.slice_hidden(plan.hidden_channels)  # last: compensation biases were computed at full width
    adapter.sync_config()


def apply_plan(
    model: torch.nn.Module, plan: Plan, means: list[dict[str, torch.Tensor]] | None = None
) -> DecoderAdapter:
    """Prune `model` in place to the plan (see `prune_layer` for `means`). Returns the pruned model's adapter."""
    adapter = get_adapter(model)
    validate_plan(plan, adapter)
    for lp in plan.layers:
        if not lp.drop:
            prune_layer(adapter, lp, means[lp.index] if means is not None else None)
    finish(adapter, plan, means is not None)
    return adapter
