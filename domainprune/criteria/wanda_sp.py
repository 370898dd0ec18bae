"""Wanda-sp (FLAP repo's structured Wanda): s_j = mean_i |W_ij|·‖X_j‖ on the o_proj/down_proj inputs; a head sums
its head_dim channels, a KV group its heads. Sequential: each layer is scored on the pruned layers' outputs."""

from __future__ import annotations

from .base import Criterion, LayerScores, per_group, per_head, register


@register("wanda-sp")
class WandaSP(Criterion):
    sequential = True

    def score_layer(self, adapter, i, stats):
        o = adapter.o_proj(i).weight.detach().double().cpu()
        down = adapter.down_proj(i).weight.detach().double().cpu()
        attn = o.abs().mean(0) * stats["attn_in_sqsum"].sqrt()
        mlp = down.abs().mean(0) * stats["mlp_in_sqsum"].sqrt()
        heads = per_head(attn, adapter.head_dim)
        return LayerScores(heads=heads, groups=per_group(heads, adapter.shape(i).num_kv_heads), channels=mlp)
