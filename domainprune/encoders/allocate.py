"""Allocation for encoders: turn per-unit scores into the heads and FFN channels every layer keeps, removing a given
fraction of attention+FFN parameters. Registered by name (`--allocation`):

- `uniform`: every layer keeps the same widths (heads in the sparsity's proportion, at least one; FFN channels
  make up the rest of the layer's budget); identical layers keep identical widths.
- `global`: FLAP's single threshold over every unit of the model: scores standardised per layer and kind (heads,
  channels), sorted, and removed weakest first, each weighted by its parameter cost, until the budget is met
  (within one unit); every layer keeps at least one head and one channel. Widths then differ per layer. It also
  prunes a model already pruned to per-layer widths (a head or channel costs the same in every layer), e.g. a
  further round on re-computed scores.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import DomainpruneError
from ..registry import Registry
from .criteria import LayerScores
from .model import BertUnits

ALLOCATIONS = Registry("encoder allocation")
Allocation = Callable[[BertUnits, list[LayerScores], float, str], list[dict[str, list[int]]]]


def keep_top(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the `n` highest scores, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:n])


def uniform_widths(units: BertUnits, sparsity: float, which: str) -> tuple[int, int]:
    """(heads, channels) kept in every layer so that each layer loses `sparsity` of its attention+FFN parameters:
    heads in the same proportion (at least one), FFN channels make up the rest; `ffn` keeps every head."""
    i = 0
    heads = units.heads(i) if which == "ffn" else max(1, round(units.heads(i) * (1 - sparsity)))
    target = (1 - sparsity) * units.layer_params(i) - heads * units.head_params() - units.fixed_params()
    channels = round(target / units.channel_params())
    if channels < 1:
        raise DomainpruneError(
            f"--sparsity {sparsity} cannot be met by FFN channels alone with every head kept; "
            "use --encoder-units all or a lower sparsity"
        )
    return heads, min(channels, units.channels(i))


def _check_dense(units: BertUnits, name: str) -> None:
    if len({(units.heads(i), units.channels(i)) for i in range(units.num_layers())}) != 1:
        raise DomainpruneError(f"allocation {name!r} needs a model whose layers have one width; prune the dense model")


@ALLOCATIONS.register("uniform")
def allocate_uniform(units: BertUnits, scores: list[LayerScores], sparsity: float, which: str) -> list[dict]:
    _check_dense(units, "uniform")
    heads, channels = uniform_widths(units, sparsity, which)
    return [{"heads": keep_top(s.heads, heads), "channels": keep_top(s.channels, channels)} for s in scores]


def zscore(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    std = x.std() if len(x) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (x - x.mean()) / (std if std > 0 else 1)


@ALLOCATIONS.register("global")
def allocate_global(units: BertUnits, scores: list[LayerScores], sparsity: float, which: str) -> list[dict]:
    head_cost, channel_cost = units.head_params(), units.channel_params()
    candidates = []  # (standardised score, layer, kind, index, cost)
    for i, s in enumerate(scores):
        if which != "ffn":
            candidates += [(float(z), i, "heads", j, head_cost) for j, z in enumerate(zscore(s.heads))]
        candidates += [(float(z), i, "channels", j, channel_cost) for j, z in enumerate(zscore(s.channels))]
    candidates.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
    target = sparsity * units.attention_mlp_params()
    left = {(i, kind): len(getattr(s, kind)) for i, s in enumerate(scores) for kind in ("heads", "channels")}
    removed: set[tuple[int, str, int]] = set()
    spent = 0
    for _, i, kind, j, cost in candidates:
        if spent + cost > target and abs(spent + cost - target) > abs(spent - target):
            break
        if left[(i, kind)] == 1:  # the last head or channel of a layer stays (a whole layer is `shortgpt`'s unit)
            continue
        removed.add((i, kind, j))
        left[(i, kind)] -= 1
        spent += cost
    return [
        {
            kind: [j for j in range(len(getattr(s, kind))) if (i, kind, j) not in removed]
            for kind in ("heads", "channels")
        }
        for i, s in enumerate(scores)
    ]
