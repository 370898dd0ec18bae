"""`obs`: greedy structured OBS (ZipLM, SlimGPT; METHODS.md §11). Layer by layer, on the outputs of the already
pruned and reconstructed layers, the KV groups / query heads (o_proj columns) and then the MLP channels (down_proj
columns) whose removal with optimal least-squares reconstruction of the rest costs least are removed one at a time,
with H⁻¹ updates, up to the uniform allocation's per-layer counts; the kept columns are then refitted (`--reconstruct
obs` is implied). The algorithm is in `domainprune.obs`; there are no per-unit scores for other allocations."""

from __future__ import annotations

from ..errors import DomainpruneError
from .base import Criterion, register


@register("obs")
class StructuredOBS(Criterion):
    sequential = True
    # chooses its units itself during the layer-sequential reconstruction pass (`obs.GreedyOBS`)
    chooses_units = True
    default_reconstruct = "obs"

    def score_layer(self, adapter, i, stats):
        raise DomainpruneError(
            "method 'obs' chooses units greedily by OBS error during the layer-sequential pass and has no per-unit "
            "scores; use it with --allocation uniform"
        )
