"""FLAP fluctuation metric (WIFV): S_j = Var_tokens(X_j)·‖W_:,j‖² on the o_proj/down_proj inputs.

As in the reference code, the attention metric is squared, then every module's channel scores are standardised
within the layer (z-scores), and a head (or KV group) scores the mean z of its channels. The scores are therefore
comparable across layers and modules, which FLAP's global allocation relies on. Bias compensation is on by default.
"""

from __future__ import annotations

import torch

from .base import Criterion, LayerScores, moe_channel_scores, per_group, per_head, register


def _fluctuation(down: torch.Tensor, x_sum: torch.Tensor, x_sqsum: torch.Tensor, n: float) -> torch.Tensor:
    """Var(X_j)·‖W_:,j‖² for the input channels of `down` (..., hidden, channels)."""
    var = x_sqsum / n - (x_sum / n) ** 2
    return var.clamp_min(0) * down.pow(2).sum(-2)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1)


@register("flap")
class Flap(Criterion):
    standardized = True
    default_allocation = "global"
    default_bias_compensation = True
    scores_moe_channels = True

    def score_layer(self, adapter, i, stats):
        n = float(stats["tokens"])
        o = adapter.o_proj(i).weight.detach().double().cpu()
        attn_var = stats["attn_in_sqsum"] / n - (stats["attn_in_sum"] / n) ** 2
        attn_z = _zscore((attn_var.clamp_min(0) * o.pow(2).sum(0)) ** 2)
        if adapter.has_dense_mlp(i):
            down = adapter.down_proj(i).weight.detach().double().cpu()
            mlp_z = _zscore(_fluctuation(down, stats["mlp_in_sum"], stats["mlp_in_sqsum"], n))
        else:  # mixture of experts: the routed experts' channels z-scored together, the shared expert's apart
            mlp_z = torch.zeros(0, dtype=torch.float64)
        heads = per_head(attn_z, adapter.head_dim, reduce="mean")
        return LayerScores(
            heads=heads,
            groups=per_group(heads, adapter.shape(i).num_kv_heads, reduce="mean"),
            channels=mlp_z,
            **moe_channel_scores(adapter, i, stats, lambda g, u, down, s, sq, t: _zscore(_fluctuation(down, s, sq, t))),
        )
