"""Wanda-sp (FLAP repo's structured Wanda): s_j = mean_i |W_ij|·‖X_j‖ on the o_proj/down_proj inputs; a head sums
its head_dim channels, a KV group its heads. Sequential: each layer is scored on the pruned layers' outputs."""

from __future__ import annotations

import torch

from .base import Criterion, LayerScores, moe_channel_scores, per_group, per_head, register


@register("wanda-sp")
class WandaSP(Criterion):
    sequential = True
    scores_moe_channels = True

    def score_layer(self, adapter, i, stats):
        o = adapter.o_proj(i).weight.detach().double().cpu()
        attn = o.abs().mean(0) * stats["attn_in_sqsum"].sqrt()
        if adapter.has_dense_mlp(i):
            down = adapter.down_proj(i).weight.detach().double().cpu()
            mlp = down.abs().mean(0) * stats["mlp_in_sqsum"].sqrt()
        else:
            mlp = torch.zeros(0, dtype=torch.float64)
        heads = per_head(attn, adapter.head_dim)
        return LayerScores(
            heads=heads,
            groups=per_group(heads, adapter.shape(i).num_kv_heads),
            channels=mlp,
            **moe_channel_scores(adapter, i, stats, lambda g, u, down, s, sq, t: down.abs().mean(-2) * sq.sqrt()),
        )
