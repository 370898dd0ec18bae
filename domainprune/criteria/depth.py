"""Depth methods (METHODS.md §6), registered by name so `--method shortgpt` / `--method finercut` work like any
criterion. They score no heads or channels: they remove whole layers or attention/MLP sublayers (`domainprune.depth`
holds the algorithms). `--depth NAME --depth-sparsity F` runs one before a width method under one budget."""

from __future__ import annotations

from typing import ClassVar

from ..errors import DomainpruneError
from .base import Criterion, register


class DepthCriterion(Criterion):
    depth: ClassVar[bool] = True
    needs_statistics = False  # the depth stage runs its own pass (ShortGPT: the statistics; FinerCut: forwards)
    default_allocation = None  # nothing to allocate: the recipe records none

    def score_layer(self, adapter, i, stats):
        raise DomainpruneError(f"method {self.name!r} removes layers or sublayers, not heads or channels")


@register("shortgpt")
class ShortGPT(DepthCriterion):
    """Whole layers of lowest Block Influence 1 − E[cos(h_in, h_out)]."""


@register("finercut")
class FinerCutCriterion(DepthCriterion):
    """Attention/MLP sublayers, greedily by the JS divergence of the output their removal causes."""


def is_depth(criterion) -> bool:
    return bool(getattr(criterion, "depth", False))
