"""FLAP fluctuation metric (WIFV): S_j = Var_tokens(X_j)·‖W_:,j‖² on the o_proj/down_proj inputs.

As in the reference code, the attention metric is squared, then every module's channel scores are standardised
within the layer (z-scores), and a head (or KV group) scores the mean z of its channels. The scores are therefore
comparable across layers and modules, which FLAP's global allocation relies on. Bias compensation is on by default.
"""

from __future__ import annotations

import torch

from .base import Criterion, LayerScores, per_group, per_head, register


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1)


@register("flap")
class Flap(Criterion):
    standardized = True
    default_allocation = "global"
    default_bias_compensation = True

    def score_layer(self, adapter, i, stats):
        n = float(stats["tokens"])
        o = adapter.o_proj(i).weight.detach().double().cpu()
        down = adapter.down_proj(i).weight.detach().double().cpu()
        attn_var = stats["attn_in_sqsum"] / n - (stats["attn_in_sum"] / n) ** 2
        mlp_var = stats["mlp_in_sqsum"] / n - (stats["mlp_in_sum"] / n) ** 2
        attn_z = _zscore((attn_var.clamp_min(0) * o.pow(2).sum(0)) ** 2)
        mlp_z = _zscore(mlp_var.clamp_min(0) * down.pow(2).sum(0))
        heads = per_head(attn_z, adapter.head_dim, reduce="mean")
        return LayerScores(
            heads=heads,
            groups=per_group(heads, adapter.shape(i).num_kv_heads, reduce="mean"),
            channels=mlp_z,
        )
