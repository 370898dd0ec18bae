"""Group L2 norm of every weight a unit owns (no calibration data)."""

from __future__ import annotations

import torch

from .base import Criterion, LayerScores, moe_channel_scores, per_group, register


def _channel_norms(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *_) -> torch.Tensor:
    """‖gate row‖² + ‖up row‖² + ‖down column‖², square-rooted, per channel (leading dims: experts)."""
    return (gate.pow(2).sum(-1) + up.pow(2).sum(-1) + down.pow(2).sum(-2)).sqrt()


@register("magnitude")
class Magnitude(Criterion):
    needs_statistics = False
    scores_moe_channels = True

    def score_layer(self, adapter, i, stats):
        hd = adapter.head_dim
        s = adapter.shape(i)
        q, k, v = (p.weight.detach().double() for p in adapter.attention_in_projs(i))
        o = adapter.o_proj(i).weight.detach().double()
        head_sq = q.pow(2).sum(1).reshape(-1, hd).sum(1) + o.pow(2).sum(0).reshape(-1, hd).sum(1)
        kv_sq = (k.pow(2).sum(1) + v.pow(2).sum(1)).reshape(-1, hd).sum(1)
        if adapter.has_dense_mlp(i):
            gate, up = (p.weight.detach().double() for p in adapter.mlp_in_projs(i))
            channels = _channel_norms(gate, up, adapter.down_proj(i).weight.detach().double())
        else:
            channels = torch.zeros(0, dtype=torch.float64)
        return LayerScores(
            heads=head_sq.sqrt(),
            groups=(per_group(head_sq, s.num_kv_heads) + kv_sq).sqrt(),
            channels=channels,
            **moe_channel_scores(adapter, i, stats, _channel_norms),
        )
