from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..adapters import DecoderAdapter
from ..errors import DomainpruneError
from ..stats import LayerStats

CRITERIA: dict[str, type["Criterion"]] = {}


def register(name: str):
    def wrap(cls):
        CRITERIA[name] = cls
        cls.name = name
        return cls

    return wrap


def get_criterion(name: str) -> "Criterion":
    if name not in CRITERIA:
        raise DomainpruneError(f"unknown method {name!r}; available: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]()


@dataclass
class LayerScores:
    heads: torch.Tensor  # (num_heads,) per query head
    groups: torch.Tensor  # (num_kv_heads,) per KV group: its query heads plus its k and v head
    channels: torch.Tensor  # (intermediate_size,) per MLP channel


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
