"""CFSP's fine step (METHODS.md §8): per MLP channel j, the mean over hidden rows i of its share of each row,
    s_j = mean_i [ |W^d_ij|·a_j / Σ_k |W^d_ik|·a_k + |W^u_ji| / Σ_k |W^u_ki| + |W^g_ji| / Σ_k |W^g_ki| ] · a_j,
with a_j = ‖X_j‖ at the down_proj input (a = b = c = 1). Every share is normalised across the channels of one
hidden row (RIA-style), as the paper states; the reference code normalises over the other dimension, which makes
each term's row mean the constant 1/d and the score collapse to (3/d)·a_j, so weights never affect the ranking.

CFSP prunes MLP channels only; its default allocation `cfsp` leaves attention whole. Under another allocation,
heads are scored as Wanda-sp scores them."""

from __future__ import annotations

import torch

from .base import Criterion, LayerScores, per_group, per_head, register


def row_share(w: torch.Tensor) -> torch.Tensor:
    """|w| divided by its sum along the channel axis (dim 1) of each row."""
    a = w.abs()
    return a / a.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


@register("cfsp")
class CFSP(Criterion):
    default_allocation = "cfsp"

    def score_layer(self, adapter, i, stats):
        a = stats["mlp_in_sqsum"].sqrt()  # (intermediate,)
        down = adapter.down_proj(i).weight.detach().double().cpu()  # (hidden, intermediate)
        gate, up = (p.weight.detach().double().cpu() for p in adapter.mlp_in_projs(i))  # (intermediate, hidden)
        share = row_share(down * a) + row_share(up.T) + row_share(gate.T)  # (hidden, intermediate)
        channels = share.mean(0) * a
        o = adapter.o_proj(i).weight.detach().double().cpu()
        heads = per_head(o.abs().mean(0) * stats["attn_in_sqsum"].sqrt(), adapter.head_dim)
        return LayerScores(heads=heads, groups=per_group(heads, adapter.shape(i).num_kv_heads), channels=channels)
