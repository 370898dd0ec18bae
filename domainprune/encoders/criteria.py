"""Importance criteria for encoder units, registered by name (higher = keep).

Each criterion returns, per layer, one score per attention head and per FFN channel (`LayerScores`); `shortgpt`
scores whole layers instead. Data: domain texts (queries and passages of the retrieval task's calibration split)
for activation criteria, (query, positive) pairs for gradient criteria, which use the contrastive loss the encoder
is trained with (InfoNCE over in-batch negatives, cosine × 20 as GAPrune's HardNegativeNLLLoss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import DomainpruneError
from ..registry import Registry
from .model import BertUnits, encoder_units
from .train import batches, info_nce

CRITERIA = Registry("encoder method")
register = CRITERIA.register


def get_criterion(name: str) -> "Criterion":
    return CRITERIA.lookup(name)()


@dataclass
class LayerScores:
    heads: torch.Tensor  # (heads,)
    channels: torch.Tensor  # (intermediate,)


@dataclass
class Calibration:
    texts: list[str]  # domain queries and passages
    pairs: list[tuple[str, str]]  # domain (query, positive)
    general_pairs: list[tuple[str, str]]  # general (query, positive): GAPrune's second stream
    batch_size: int = 16
    progress: bool = False


class Criterion:
    name: ClassVar[str]
    scores_layers: ClassVar[bool] = False  # whole layers (depth) instead of heads and channels

    def score(self, model: Any, calib: Calibration) -> list[LayerScores] | torch.Tensor:
        raise NotImplementedError


# --- element-wise quantities -> units ------------------------------------------------------------------------


def unit_sums(units: BertUnits, i: int, values: dict[str, torch.Tensor]) -> LayerScores:
    """Sum a per-parameter quantity (same shapes as layer i's parameters, keyed by their names in the layer) over
    each unit's parameters (the architecture's `unit_sums`)."""
    heads, channels = units.unit_sums(values)
    return LayerScores(heads.float(), channels.float())


def unit_params(units: BertUnits, i: int) -> dict[str, torch.Tensor]:
    names = set(units.unit_names())
    return {n: p.detach().float().cpu() for n, p in units.layers[i].named_parameters() if n in names}


@register("magnitude")
class Magnitude(Criterion):
    """L2 norm of each unit's weights."""

    def score(self, model, calib):
        units = encoder_units(model)
        out = []
        for i in range(units.num_layers()):
            s = unit_sums(units, i, {n: p.square() for n, p in unit_params(units, i).items()})
            out.append(LayerScores(s.heads.sqrt(), s.channels.sqrt()))
        return out


# --- activation statistics -----------------------------------------------------------------------------------


@torch.no_grad()
def activation_stats(model: Any, texts: list[str], batch_size: int, progress: bool) -> list[dict[str, torch.Tensor]]:
    """Per layer, over the real (unpadded) tokens: sums and squared sums of the inputs of attention.output.dense
    ("attn_*") and output.dense ("ffn_*"), and per head how often its contribution to the attention output has the
    largest norm in its layer ("top1", SHRP's Top-1 usage) and its mean contribution norm ("contrib")."""
    units = encoder_units(model)
    stats = [dict(tokens=torch.zeros((), dtype=torch.float64)) for _ in range(units.num_layers())]
    mask: list[torch.Tensor] = []
    hooks = []

    def record(i: int, key: str, heads: bool):
        def hook(module, args):
            x = args[0].detach().float()[mask[0]]  # (tokens, width): padding dropped
            s = stats[i]
            s[f"{key}_sum"] = s.get(f"{key}_sum", 0) + x.double().sum(0)
            s[f"{key}_sqsum"] = s.get(f"{key}_sqsum", 0) + x.double().square().sum(0)
            if heads:
                hd = units.head_dim
                w = module.weight.detach().float().reshape(module.weight.shape[0], -1, hd)  # (d, H, hd)
                contrib = torch.einsum("thk,dhk->thd", x.reshape(len(x), -1, hd), w).norm(dim=-1)  # (tokens, H)
                s["top1"] = s.get("top1", 0) + torch.bincount(contrib.argmax(1), minlength=contrib.shape[1]).double()
                s["contrib"] = s.get("contrib", 0) + contrib.double().sum(0)
                s["tokens"] += len(x)

        return hook

    for i, layer in enumerate(units.layers):
        hooks.append(units.attn_out(i).register_forward_pre_hook(record(i, "attn", True)))
        hooks.append(units.ffn_out(i).register_forward_pre_hook(record(i, "ffn", False)))
    device = next(model.parameters()).device
    try:
        for chunk in batches(texts, batch_size, progress, "activations"):
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(inputs=chunk).items()}
            mask[:] = [features["attention_mask"].bool()]
            model(features)
    finally:
        for h in hooks:
            h.remove()
    return stats


class ActivationCriterion(Criterion):
    def score(self, model, calib):
        units = encoder_units(model)
        stats = activation_stats(model, calib.texts, calib.batch_size, calib.progress)
        return [self.layer(units, i, s) for i, s in enumerate(stats)]

    def layer(self, units: BertUnits, i: int, s: dict) -> LayerScores:
        raise NotImplementedError


def _heads(channel_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    return channel_scores.reshape(-1, head_dim).sum(1)


@register("wanda-sp")
class WandaSP(ActivationCriterion):
    """wanda-sp: s_j = mean_i |W_ij|·‖X_j‖ on the inputs of attention.output.dense / output.dense; heads sum."""

    def layer(self, units, i, s):
        attn = units.attn_out(i).weight.detach().abs().mean(0).cpu().double() * s["attn_sqsum"].sqrt()
        ffn = units.ffn_out(i).weight.detach().abs().mean(0).cpu().double() * s["ffn_sqsum"].sqrt()
        return LayerScores(_heads(attn, units.head_dim).float(), ffn.float())


@register("flap")
class Flap(ActivationCriterion):
    """FLAP's fluctuation metric: the input's variance over tokens × the squared norm of its weight column."""

    def layer(self, units, i, s):
        n = s["tokens"]

        def fluct(key: str, weight: torch.Tensor) -> torch.Tensor:
            var = (s[f"{key}_sqsum"] - s[f"{key}_sum"].square() / n) / max(float(n) - 1, 1.0)
            return var * weight.detach().square().sum(0).cpu().double()

        attn = fluct("attn", units.attn_out(i).weight)
        return LayerScores(_heads(attn, units.head_dim).float(), fluct("ffn", units.ffn_out(i).weight).float())


@register("shrp")
class SHRP(ActivationCriterion):
    """SHRP's deployment-time rule as far as its abstract specifies it: heads ranked by Top-1 usage (the share of
    domain tokens for which the head's contribution to the attention output is the largest in its layer), ties
    broken by the mean contribution norm. No router is trained (its inputs, losses and schedule are unpublished);
    SHRP keeps its FFN ("expander") whole, so FFN channels are ranked by wanda-sp to meet the shared budget."""

    def layer(self, units, i, s):
        usage = s["top1"] / s["tokens"]
        contrib = s["contrib"] / s["contrib"].sum()
        return LayerScores((usage + 1e-3 * contrib).float(), WandaSP().layer(units, i, s).channels)


# --- gradients of the contrastive loss -----------------------------------------------------------------------


def gradient_stats(
    model: Any, pairs: list[tuple[str, str]], batch_size: int, progress: bool, desc: str
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Per layer and unit parameter: the empirical Fisher (1/B)·Σ_batches g² over micro-batches of InfoNCE with
    in-batch negatives, and the summed gradient ḡ (GAPrune's alignment). The model's weights are not changed."""
    units = encoder_units(model)
    names = set(units.unit_names())
    params = [{n: p for n, p in layer.named_parameters() if n in names} for layer in units.layers]
    fisher = [{n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in ps.items()} for ps in params]
    gsum = [{n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in ps.items()} for ps in params]
    was_training = model.training
    model.eval()  # no dropout: deterministic gradients
    steps = 0
    try:
        for chunk in batches(pairs, batch_size, progress, desc):
            if len(chunk) < 2:  # one pair has no in-batch negative
                continue
            model.zero_grad(set_to_none=True)
            info_nce(model, chunk).backward()
            for ps, f, g in zip(params, fisher, gsum):
                for n, p in ps.items():
                    grad = p.grad.detach().float().cpu()
                    f[n] += grad.square()
                    g[n] += grad
            steps += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if steps == 0:
        raise DomainpruneError("gradient criteria need at least 2 calibration pairs; give more retrieval data")
    for f in fisher:
        for n in f:
            f[n] /= steps
    return fisher, gsum


@register("fisher")
class Fisher(Criterion):
    """Diagonal-Fisher saliency of removing a unit: Σ over its parameters of F·θ² (F from the contrastive loss)."""

    def score(self, model, calib):
        units = encoder_units(model)
        fisher, _ = gradient_stats(model, calib.pairs, calib.batch_size, calib.progress, "fisher (domain)")
        return [
            unit_sums(units, i, {n: f[n] * p.square() for n, p in unit_params(units, i).items()})
            for i, f in enumerate(fisher)
        ]


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / std if len(x) > 1 and std > 0 else torch.zeros_like(x)


@register("gaprune")
class GAPrune(Criterion):
    """GAPrune's Domain Alignment Importance, summed per unit (METHODS.md §5, §16):
    DAI = softplus((F_dom − β·F_gen)·|θ| · clip(1 + α·z(cos(ḡ_dom, ḡ_gen)), 0.8, 1.2) + γ·√|θ|), with the Fisher
    and alignment terms from InfoNCE on domain and general (query, positive) pairs. The Fisher term is divided by
    its mean magnitude and the √|θ| term by its mean, per layer, so that γ weighs two quantities of one scale (as
    the decoder criterion does); the per-unit cosine is z-scored within the layer before α (§5 note)."""

    beta, gamma, alpha = 1.0, 0.5, 0.2

    def score(self, model, calib):
        if not calib.general_pairs:
            raise DomainpruneError("gaprune needs general retrieval pairs (its second stream); give --general-data")
        units = encoder_units(model)
        f_dom, g_dom = gradient_stats(model, calib.pairs, calib.batch_size, calib.progress, "fisher (domain)")
        f_gen, g_gen = gradient_stats(model, calib.general_pairs, calib.batch_size, calib.progress, "fisher (general)")
        out = []
        for i in range(units.num_layers()):
            theta = {n: p.abs() for n, p in unit_params(units, i).items()}
            fisher = unit_sums(units, i, {n: (f_dom[i][n] - self.beta * f_gen[i][n]) * t for n, t in theta.items()})
            dot = unit_sums(units, i, {n: g_dom[i][n] * g_gen[i][n] for n in theta})
            dsq = unit_sums(units, i, {n: g_dom[i][n].square() for n in theta})
            gsq = unit_sums(units, i, {n: g_gen[i][n].square() for n in theta})
            mag = unit_sums(units, i, {n: (t + 1e-8).sqrt() for n, t in theta.items()})

            def dai(f, d, a, b, m):
                f = f / (f.abs().mean() if f.abs().mean() > 0 else 1)
                cos = d / (a.sqrt() * b.sqrt()).clamp_min(1e-30)
                align = (1 + self.alpha * _zscore(cos)).clamp(0.8, 1.2)
                m = m / (m.mean() if m.mean() > 0 else 1)
                return torch.nn.functional.softplus(f * align + self.gamma * m)

            out.append(
                LayerScores(
                    dai(fisher.heads, dot.heads, dsq.heads, gsq.heads, mag.heads),
                    dai(fisher.channels, dot.channels, dsq.channels, gsq.channels, mag.channels),
                )
            )
        return out


# --- whole layers --------------------------------------------------------------------------------------------


@register("shortgpt")
class ShortGPT(Criterion):
    """ShortGPT's Block Influence per layer: 1 − cos(layer input, layer output), mean over real tokens."""

    scores_layers = True

    @torch.no_grad()
    def score(self, model, calib):
        units = encoder_units(model)
        total = torch.zeros(units.num_layers(), dtype=torch.float64)
        count = 0
        device = next(model.parameters()).device
        for chunk in batches(calib.texts, calib.batch_size, calib.progress, "block influence"):
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(inputs=chunk).items()}
            mask = features["attention_mask"].bool()
            types = features.get("token_type_ids") if units.token_types else None
            extra = {} if types is None else {"token_type_ids": types}
            out = units.bert(
                input_ids=features["input_ids"],
                attention_mask=features["attention_mask"],
                output_hidden_states=True,
                **extra,
            )
            hidden = out.hidden_states
            for i in range(units.num_layers()):
                cos = torch.nn.functional.cosine_similarity(hidden[i][mask], hidden[i + 1][mask], dim=-1)
                total[i] += (1 - cos).double().sum().cpu()
            count += int(mask.sum())
        return (total / max(count, 1)).float()
