from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..adapters import DecoderAdapter
from ..errors import DomainpruneError
from ..registry import Registry
from ..stats import LayerStats

CRITERIA = Registry("method")
register = CRITERIA.register


def get_criterion(name: str) -> "Criterion":
    return CRITERIA.lookup(name)()


@dataclass
class LayerScores:
    heads: torch.Tensor  # (num_heads,) per query head
    groups: torch.Tensor  # (num_kv_heads,) per KV group: its query heads plus its k and v head
    channels: torch.Tensor  # (intermediate_size,) per MLP channel (empty in a mixture-of-experts layer)
    # mixture-of-experts layers: (num_experts, expert_width) per channel of each routed expert, and
    # (shared_width,) per channel of the shared expert (None where there is none)
    expert_channels: torch.Tensor | None = None
    shared_channels: torch.Tensor | None = None


class Criterion:
    name: ClassVar[str]
    needs_statistics: ClassVar[bool] = True
    # Scores already comparable across layers and between attention and MLP (global allocation uses them as is).
    standardized: ClassVar[bool] = False
    # Score layer i on the outputs of the already-pruned layers before it (Wanda/SparseGPT style).
    sequential: ClassVar[bool] = False
    default_allocation: ClassVar[str] = "uniform"
    default_bias_compensation: ClassVar[bool] = False
    # Scores the routed experts of mixture-of-experts layers (`score_experts`) instead of heads and channels.
    scores_experts: ClassVar[bool] = False
    # Scores heads and the channels inside experts of mixture-of-experts layers (`moe_channel_scores`).
    scores_moe_channels: ClassVar[bool] = False
    # Removes whole layers or attention/MLP sublayers (criteria/depth.py) instead of scoring heads and channels.
    depth: ClassVar[bool] = False
    # Back-propagates through the whole model before scoring (criteria/gradient.py: `prepare`).
    needs_gradients: ClassVar[bool] = False
    # Uses domain and general data as two streams (no --general-ratio mixing).
    two_streams: ClassVar[bool] = False
    # Chooses each layer's units itself while refitting it (structured OBS) instead of ranking scores.
    chooses_units: ClassVar[bool] = False
    # The reconstruction it runs with unless --reconstruct says otherwise.
    default_reconstruct: ClassVar[str | None] = None

    def score_layer(self, adapter: DecoderAdapter, i: int, stats: LayerStats | None) -> LayerScores:
        raise NotImplementedError

    def score_experts(self, adapter: DecoderAdapter, i: int, stats: LayerStats) -> torch.Tensor | None:
        """(num_experts,) scores of layer i's routed experts (higher = keep); None for a layer without experts."""
        raise NotImplementedError


def per_head(channel_scores: torch.Tensor, head_dim: int, reduce: str = "sum") -> torch.Tensor:
    """Aggregate o_proj input-channel scores into per-head scores."""
    x = channel_scores.reshape(-1, head_dim)
    return x.sum(1) if reduce == "sum" else x.mean(1)


def per_group(head_scores: torch.Tensor, num_kv_heads: int, reduce: str = "sum") -> torch.Tensor:
    x = head_scores.reshape(num_kv_heads, -1)
    return x.sum(1) if reduce == "sum" else x.mean(1)


def moe_channel_scores(adapter: DecoderAdapter, i: int, stats: LayerStats | None, score) -> dict[str, torch.Tensor]:
    """The `LayerScores` fields of a mixture-of-experts layer's channels ({} for another layer).

    `score(gate, up, down, x_sum, x_sqsum, tokens)` scores the channels of the routed experts at once (gate, up
    (E, I, d), down (E, d, I), sums (E, I)) and of the shared expert (gate, up (I_s, d), down (d, I_s), sums (I_s,)):
    the weights and the statistics of the down projections' inputs as an equivalent dense MLP sees them, the
    activation times the routing (or shared-gate) weight, zero on tokens not routed to the expert (`adapters.moe`);
    sums are None without statistics. A criterion's formula for dense down_proj inputs therefore applies unchanged.
    """
    if not adapter.shape(i).num_experts:
        return {}
    tokens = float(stats["tokens"]) if stats is not None else 0.0

    def get(key: str) -> torch.Tensor | None:
        if stats is None:
            return None
        if key not in stats:
            raise DomainpruneError(
                f"statistics lack {key!r} (written by an older version); clear the statistics cache and rerun"
            )
        return stats[key].double()

    gate, up, down = (w.double().cpu() for w in adapter.expert_mlp_weights(i))
    out = {"expert_channels": score(gate, up, down, get("expert_in_sum"), get("expert_in_sqsum"), tokens)}
    if (shared := adapter.shared_mlp_weights(i)) is not None:
        gate, up, down = (w.double().cpu() for w in shared)
        out["shared_channels"] = score(gate, up, down, get("shared_in_sum"), get("shared_in_sqsum"), tokens)
    return out
