"""Depth methods (METHODS.md §6), registered by name so `--method shortgpt` / `--method finercut` work like any
criterion. They score no heads or channels: they remove whole layers or attention/MLP sublayers (`domainprune.depth`
holds the algorithms; a depth method's `remove` runs its own). `--depth NAME --depth-sparsity F` runs one before a
width method under one budget; the depth stage of a prune is here too (its recipe checks: domainprune.stages)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapters import DecoderAdapter
from ..depth import DepthRemoval, finercut, shortgpt, zero_removed
from ..errors import DomainpruneError
from .base import CRITERIA, Criterion, register


class DepthCriterion(Criterion):
    depth = True
    needs_statistics = False  # the depth stage runs its own pass (ShortGPT: the statistics; FinerCut: forwards)
    default_allocation = None  # nothing to allocate: the recipe records none

    def score_layer(self, adapter, i, stats):
        raise DomainpruneError(f"method {self.name!r} removes layers or sublayers, not heads or channels")

    def remove(
        self, model: torch.nn.Module, adapter: DecoderAdapter, sequences: torch.Tensor, target: float, **kw
    ) -> DepthRemoval:
        """Remove layers or sublayers worth `target` attention+MLP parameters (`kw`: batch_size, progress)."""
        raise NotImplementedError


@register("shortgpt")
class ShortGPT(DepthCriterion):
    """Whole layers of lowest Block Influence 1 − E[cos(h_in, h_out)]."""

    def remove(self, model, adapter, sequences, target, **kw):
        return shortgpt(model, adapter, sequences, target, **kw)


@register("finercut")
class FinerCutCriterion(DepthCriterion):
    """Attention/MLP sublayers, greedily by the JS divergence of the output their removal causes."""

    def remove(self, model, adapter, sequences, target, **kw):
        return finercut(model, adapter, sequences, target, **kw)


def remove_depth(
    method: str,
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    sparsity: float,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> DepthRemoval:
    """Run depth method `method` for `sparsity` (a fraction of the model's attention+MLP parameters)."""
    total = sum(adapter.layer_params(s) for s in adapter.shapes())
    depth_method = CRITERIA.lookup(method)()
    return depth_method.remove(model, adapter, sequences, sparsity * total, batch_size=batch_size, progress=progress)


def depth_stage(
    loaded,
    recipe,
    criterion,
    adapter: DecoderAdapter,
    sparsity: float,
    sequences: Callable[[], torch.Tensor],
    progress: bool = True,
) -> DepthRemoval | None:
    """The depth part of a recipe on the dense model: `--method shortgpt|finercut` spends the whole budget,
    `--depth NAME --depth-sparsity F` spends F of it and zeroes what it removed (`domainprune.depth`) so the width
    method that follows sees the depth-pruned model. None when the recipe prunes no depth. `sequences()` gives the
    run's calibration sequences (built only when depth is pruned)."""
    alone = criterion.depth
    if not alone and recipe.depth is None:
        return None
    method = recipe.method if alone else recipe.depth
    part = sparsity if alone else recipe.depth_sparsity
    if not alone and part > sparsity + 1e-12:
        raise DomainpruneError(
            f"--depth-sparsity {part} is more than the whole budget ({sparsity:.4f} of attention+MLP); lower it"
        )
    removal = remove_depth(
        method, loaded.model, adapter, sequences(), part, batch_size=recipe.batch_size, progress=progress
    )
    if not alone:
        zero_removed(adapter, removal.frozen())
    return removal
