"""Gradient criteria (METHODS.md §2, §4, §5, §7); exact formulas in docs/criteria.md.

Every score is built from per-projection, per-unit sums (`gradients.accumulate`) and aggregated into the structured
units: a query head = its q rows + its o_proj columns; a KV group = its query heads + its k and v rows; an MLP
channel = its gate row + up row + down column.

- `taylor` (LLM-Pruner): `taylor_mode` vector |Σ_slice W·ḡ| (default), element Σ_slice |W·ḡ|, or param_mix
  Σ_slice |W·ḡ − ½W²·F|; the |·| is taken per projection slice, then slices are summed over the unit.
- `fisher`: Σ_unit W²·F with F = mean over micro-batches of g_m² (empirical Fisher).
- `dpruner`: z(log D_u) + ½·z(log G_u), G = SparseGPT W²/diag(U)² on GENERAL data, D = Σ|g′W + ½(g′W)²| on domain data.
- `gaprune`: softplus of the Domain Alignment Importance with the per-unit gradient cosine z-scored.
- `nirvana`: Σ_unit |W·∂f/∂W|, f = mean over batch and vocabulary of the max-over-positions logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import gradients as gr
from ..errors import DomainpruneError
from .base import Criterion, LayerScores, per_group, register

log = logging.getLogger(__name__)
TAYLOR_MODES = ("vector", "element", "param_mix")


@dataclass
class GradientContext:
    """What a gradient criterion needs to compute its statistics."""

    model: torch.nn.Module
    adapter: Any
    domain: torch.Tensor  # (n, seq_len) domain calibration ids (mixed with general data for one-stream criteria)
    general: Callable[[], torch.Tensor]  # general calibration ids (loaded on demand; two-stream criteria)
    micro_batch: int = 1
    gradient_checkpointing: bool = False
    batch_size: int = 8
    taylor_mode: str | None = None
    use_cache: bool = True
    progress: bool = True


def aggregate(per_proj: dict[str, torch.Tensor], num_kv_heads: int) -> LayerScores:
    """Per-projection unit sums -> LayerScores (heads: q+o, groups: own heads + k + v, channels: gate+up+down)."""
    heads = per_proj["q"] + per_proj["o"]
    kv = per_proj["k"] + per_proj["v"]
    return LayerScores(
        heads=heads,
        groups=per_group(heads, num_kv_heads) + kv,
        channels=per_proj["gate"] + per_proj["up"] + per_proj["down"],
    )


class GradientCriterion(Criterion):
    needs_statistics = False
    needs_gradients = True

    def __init__(self):
        self.units: list[dict] | None = None

    def prepare(self, ctx: GradientContext) -> None:
        gr.check_backprop(ctx.model, ctx.adapter, self.name)
        self.units = self.compute(ctx)

    def compute(self, ctx: GradientContext) -> list[dict]:
        raise NotImplementedError

    def layer_units(self, i: int) -> dict:
        if self.units is None:
            raise DomainpruneError(
                f"method {self.name!r} needs gradient statistics: call prepare() first (make_plan does)"
            )
        return self.units[i]

    def _one_stream(
        self, ctx: GradientContext, quantities: set[str], objective: str = "loss", extra: tuple = ()
    ) -> list[dict]:
        def compute():
            units, _ = gr.accumulate(
                ctx.model,
                ctx.adapter,
                ctx.domain,
                quantities=quantities,
                micro_batch=ctx.micro_batch,
                objective=objective,
                gradient_checkpointing=ctx.gradient_checkpointing,
                progress=ctx.progress,
            )
            return units

        parts = [*gr.fingerprints(ctx.model, ctx.domain), sorted(quantities), objective, ctx.micro_batch, *extra]
        return gr.cached(self.name, parts, compute, ctx.use_cache)


@register("taylor")
class Taylor(GradientCriterion):
    QUANTITY = {"vector": "wg", "element": "abs_wgbar", "param_mix": "mix"}
    mode = "vector"  # --taylor-mode, set by `compute`

    def compute(self, ctx):
        mode = ctx.taylor_mode or "vector"
        if mode not in TAYLOR_MODES:
            raise DomainpruneError(f"--taylor-mode must be one of {', '.join(TAYLOR_MODES)}, not {mode!r}")
        self.mode = mode
        return self._one_stream(ctx, {self.QUANTITY[mode]})

    def score_layer(self, adapter, i, stats):
        q = self.QUANTITY[self.mode]
        per = {p: v.abs() for p, v in self.layer_units(i)[q].items()}
        return aggregate(per, adapter.shape(i).num_kv_heads)


@register("fisher")
class Fisher(GradientCriterion):
    def compute(self, ctx):
        return self._one_stream(ctx, {"w2g2"})

    def score_layer(self, adapter, i, stats):
        return aggregate(self.layer_units(i)["w2g2"], adapter.shape(i).num_kv_heads)


@register("nirvana")
class Nirvana(GradientCriterion):
    default_allocation = "nirvana-ratio"

    def compute(self, ctx):
        return self._one_stream(ctx, {"abs_wgbar"}, objective="nirvana")

    def score_layer(self, adapter, i, stats):
        return aggregate(self.layer_units(i)["abs_wgbar"], adapter.shape(i).num_kv_heads)


def _log_z(x: torch.Tensor) -> torch.Tensor:
    return gr.zscore(torch.log(x.double().clamp_min(0) + 1e-30))


@register("dpruner")
class DPruner(GradientCriterion):
    two_streams = True
    reg_lambda = 0.1  # λ of the refined loss (reference code's default)
    step = 0.03  # η: W′ − W = −η·g (one SGD step at the reference's LOMO learning rate)
    damping = 0.01
    general_weight = 0.5  # weight of the general-importance z-score in the combined unit score

    def compute(self, ctx):
        general = ctx.general()

        def run():
            G = gr.general_importance(ctx.model, ctx.adapter, general, ctx.batch_size, self.damping, ctx.progress)
            g_units = [{p: gr.per_unit(t, p, gr.unit_width(ctx.adapter, p)) for p, t in layer.items()} for layer in G]
            units, _ = gr.accumulate(
                ctx.model,
                ctx.adapter,
                ctx.domain,
                quantities={"dpruner"},
                micro_batch=ctx.micro_batch,
                gradient_checkpointing=ctx.gradient_checkpointing,
                general_importance=G,
                dpruner_lambda=self.reg_lambda,
                dpruner_step=self.step,
                progress=ctx.progress,
            )
            for u, g in zip(units, g_units):
                u["general"] = g
            return units

        parts = [
            *gr.fingerprints(ctx.model, ctx.domain, general),
            ctx.micro_batch,
            self.reg_lambda,
            self.step,
            self.damping,
        ]
        return gr.cached(self.name, parts, run, ctx.use_cache)

    def score_layer(self, adapter, i, stats):
        u = self.layer_units(i)
        k = adapter.shape(i).num_kv_heads
        dom, gen = aggregate(u["dpruner"], k), aggregate(u["general"], k)
        w = self.general_weight
        return LayerScores(
            heads=_log_z(dom.heads) + w * _log_z(gen.heads),
            groups=_log_z(dom.groups) + w * _log_z(gen.groups),
            channels=_log_z(dom.channels) + w * _log_z(gen.channels),
        )


@register("gaprune")
class GAPrune(GradientCriterion):
    two_streams = True
    beta = 1.0  # weight of the general Fisher
    gamma = 0.5  # weight of the magnitude term (compression_weight)
    alpha = 0.2  # alignment strength: factor = clip(1 + α·z(cos), 0.8, 1.2)

    def compute(self, ctx):
        general = ctx.general()

        def run():
            gen, ref = gr.accumulate(
                ctx.model,
                ctx.adapter,
                general,
                quantities={"absw_g2"},
                micro_batch=ctx.micro_batch,
                gradient_checkpointing=ctx.gradient_checkpointing,
                keep_mean_gradient=True,
                progress=ctx.progress,
            )
            dom, _ = gr.accumulate(
                ctx.model,
                ctx.adapter,
                ctx.domain,
                quantities={"absw_g2", "gbar_dot_ref", "gbar_sq", "ref_sq"},
                micro_batch=ctx.micro_batch,
                gradient_checkpointing=ctx.gradient_checkpointing,
                reference=ref,
                progress=ctx.progress,
            )
            for d, g in zip(dom, gen):
                d["absw_g2_general"] = g["absw_g2"]
            return dom

        parts = [*gr.fingerprints(ctx.model, ctx.domain, general), ctx.micro_batch]
        return gr.cached(self.name, parts, run, ctx.use_cache)

    def score_layer(self, adapter, i, stats):
        u = self.layer_units(i)
        k = adapter.shape(i).num_kv_heads
        w = gr.target_weights(adapter, i)
        sqrt_w = {p: gr.per_unit(t.detach().float().abs().sqrt(), p, gr.unit_width(adapter, p)) for p, t in w.items()}
        fisher = aggregate({p: u["absw_g2"][p] - self.beta * u["absw_g2_general"][p] for p in gr.PROJS}, k)
        dot, dsq, rsq = (aggregate(u[q], k) for q in ("gbar_dot_ref", "gbar_sq", "ref_sq"))
        mag = aggregate(sqrt_w, k)

        def dai(f: torch.Tensor, d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            scale = f.abs().mean()
            f = f / (scale if scale > 0 else 1)
            align = (1 + self.alpha * gr.zscore(gr.cosine(d, a, b))).clamp(0.8, 1.2)
            m = m / (m.mean() if m.mean() > 0 else 1)
            return torch.nn.functional.softplus(f * align + self.gamma * m)

        return LayerScores(
            heads=dai(fisher.heads, dot.heads, dsq.heads, rsq.heads, mag.heads),
            groups=dai(fisher.groups, dot.groups, dsq.groups, rsq.groups, mag.groups),
            channels=dai(fisher.channels, dot.channels, dsq.channels, rsq.channels, mag.channels),
        )
