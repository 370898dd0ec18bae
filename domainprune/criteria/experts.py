"""Expert criteria for mixture-of-experts models (METHODS.md §9). Each scores the routed experts of every MoE layer
from the per-expert statistics of the layer-wise pass (`adapters.moe`); allocation keeps the top N per layer
(`--experts-keep`). Heads and MLP channels are not scored, and shared experts never.

- `expert-frequency`: how many calibration tokens route to the expert (its top-k count).
- `easy-ep` (EASY-EP): Σ_t Σ_{e∈topk(t)} g_{t,e}·‖E_e(x_t)‖₂·max(1 − cos(h_t, h_t + Σ_routed g·E(x_t)), 0), with h_t the
  residual stream before the MoE block; shared experts excluded.
- `tcess` (PreMoe TCESS): (1/T) Σ_t z_{t,e}·1[e ∈ topk(z_t) ∧ softmax(topk(z_t))_e ≥ r] on the router logits z, with
  the reference code's k=1 and r disabled.
"""

from __future__ import annotations

import torch

from ..errors import DomainpruneError
from .base import Criterion, register


class ExpertCriterion(Criterion):
    scores_experts = True
    key: str

    def score_layer(self, adapter, i, stats):
        raise DomainpruneError(f"method {self.name!r} scores mixture-of-experts experts only, not heads or channels")

    def score_experts(self, adapter, i, stats):
        if not adapter.shape(i).num_experts:
            return None
        return self.from_stats(stats)

    def from_stats(self, stats) -> torch.Tensor:
        return stats[self.key].double()


@register("expert-frequency")
class ExpertFrequency(ExpertCriterion):
    key = "expert_selected"


@register("easy-ep")
class EasyEP(ExpertCriterion):
    key = "expert_easyep"


@register("tcess")
class Tcess(ExpertCriterion):
    key = "expert_tcess_sum"

    def from_stats(self, stats):
        return stats[self.key].double() / float(stats["tokens"])
