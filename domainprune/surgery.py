"""Execute a plan: physically slice weight matrices (never masks), optionally compensate, update the config."""

from __future__ import annotations

import torch

from .adapters import DecoderAdapter, get_adapter
from .plan import Plan, validate_plan


def removed_mean_output(weight: torch.Tensor, mean_input: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
    """FLAP bias compensation: W[:, P] · x̄_P, the average contribution of the removed input columns P."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept_cols.to(weight.device)] = False
    mean = mean_input.to(device=weight.device, dtype=torch.float64)
    return (weight.detach().double()[:, removed] @ mean[removed]).to(weight.dtype)


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    base = torch.tensor(sorted(heads), dtype=torch.long)[:, None] * head_dim
    return (base + torch.arange(head_dim)).reshape(-1)


def apply_plan(model: torch.nn.Module, plan: Plan, means: list[dict[str, torch.Tensor]] | None = None) -> DecoderAdapter:
    """Prune `model` in place to the plan. `means[i]` holds the calibration means of layer i's o_proj and
    down_proj inputs (keys "attn_in_mean", "mlp_in_mean"); when given, removed units are replaced by their mean
    output as a bias (FLAP). Returns the adapter of the pruned model."""
    adapter = get_adapter(model)
    validate_plan(plan, adapter)
    shapes = adapter.shapes()
    for lp in plan.layers:
        i, s = lp.index, shapes[lp.index]
        if lp.drop:
            continue
        if (len(lp.query_heads), len(lp.kv_heads)) != (s.num_heads, s.num_kv_heads):
            bias = None
            if means is not None:
                cols = _head_columns(lp.query_heads, adapter.head_dim)
                bias = removed_mean_output(adapter.o_proj(i).weight, means[i]["attn_in_mean"], cols)
            adapter.slice_attention(i, lp.query_heads, lp.kv_heads, bias)
        if len(lp.mlp_channels) != s.intermediate_size:
            bias = None
            if means is not None:
                cols = torch.tensor(sorted(lp.mlp_channels), dtype=torch.long)
                bias = removed_mean_output(adapter.down_proj(i).weight, means[i]["mlp_in_mean"], cols)
            adapter.slice_mlp(i, lp.mlp_channels, bias)
    if means is not None:
        adapter.ensure_output_biases()
    adapter.keep_layers([lp.index for lp in plan.layers if not lp.drop])
    adapter.sync_config()
    return adapter
