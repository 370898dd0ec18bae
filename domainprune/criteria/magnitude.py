"""Group L2 norm of every weight a unit owns (no calibration data)."""

from __future__ import annotations

import torch

from .base import Criterion, LayerScores, per_group, register


@register("magnitude")
class Magnitude(Criterion):
    needs_statistics = False

    def score_layer(self, adapter, i, stats):
        hd = adapter.head_dim
        s = adapter.shape(i)
        q, k, v = (p.weight.detach().double() for p in adapter.attention_in_projs(i))
        o = adapter.o_proj(i).weight.detach().double()
        head_sq = q.pow(2).sum(1).reshape(-1, hd).sum(1) + o.pow(2).sum(0).reshape(-1, hd).sum(1)
        kv_sq = (k.pow(2).sum(1) + v.pow(2).sum(1)).reshape(-1, hd).sum(1)
        gate, up = (p.weight.detach().double() for p in adapter.mlp_in_projs(i))
        down = adapter.down_proj(i).weight.detach().double()
        channels = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
        return LayerScores(
            heads=head_sq.sqrt(),
            groups=(per_group(head_sq, s.num_kv_heads) + kv_sq).sqrt(),
            channels=channels.sqrt(),
        )
