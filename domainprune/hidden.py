"""Hidden-dimension pruning (Minitron's embedding-channel pruning; LLM-Pruner's channel mode).

A residual-stream channel is removed from the embedding, every RMSNorm, the input columns of q/k/v, gate/up (and a
MoE block's router and experts) and the output rows of o_proj/down_proj, in every layer at once, so the result keeps
one hidden size and exports as a stock config (`DecoderAdapter.slice_hidden`).

Score of channel c (Minitron's activation criterion): Σ over layers of the root-mean-square activation of c at the
outputs of the layer's two norms — the inputs of q/k/v and of the MLP (or MoE block) — on the calibration data,
read from the layer-wise statistics (`qkv_in_sqsum`, `up_in_sqsum`, `moe_in_sqsum`). The norm weights are part of
those outputs, so a channel the model scales up (the massive-activation channels) is kept.

Budget: removing a fraction h of the d channels removes h of every attention and MLP weight, so the width and depth
stages remove the rest of `--sparsity` s from what is left: 1 − (1 − s)/(1 − h) of it (`width_sparsity`).
"""

from __future__ import annotations

import math

import torch

from .adapters import DecoderAdapter
from .allocation import aligned
from .errors import DomainpruneError

NORM_OUTPUT_KEYS = ("qkv_in_sqsum", "up_in_sqsum", "moe_in_sqsum")


def kept_width(hidden_size: int, hidden_sparsity: float, multiple: int = 1) -> int:
    """Residual channels kept when removing `hidden_sparsity` of them (rounded to a multiple, at least one)."""
    return aligned(max(1, round(hidden_size * (1 - hidden_sparsity))), hidden_size, multiple)


def hidden_width(adapter: DecoderAdapter, hidden_sparsity: float, round_to: int | None = None) -> int:
    """Residual channels this model keeps at `hidden_sparsity`: rounded to `round_to` and to what the architecture
    needs (`DecoderAdapter.hidden_multiple`)."""
    return kept_width(adapter.hidden_size, hidden_sparsity, math.lcm(round_to or 1, adapter.hidden_multiple()))


def width_sparsity(sparsity: float, kept_fraction: float) -> float:
    """The attention+MLP sparsity the other stages must reach so the total is `sparsity` after hidden pruning."""
    rest = 1 - (1 - sparsity) / kept_fraction
    if rest < -1e-9:
        raise DomainpruneError(
            f"--hidden-sparsity removes {1 - kept_fraction:.1%} of every attention and MLP weight, more than "
            f"--sparsity {sparsity:.1%}; lower --hidden-sparsity or raise --sparsity"
        )
    return max(rest, 0.0)


def hidden_scores(adapter: DecoderAdapter, stats: list[dict]) -> torch.Tensor:
    """Per residual channel: Σ_layers RMS activation at the norm outputs (module docstring)."""
    score = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    for i, s in enumerate(stats):
        keys = [k for k in NORM_OUTPUT_KEYS if k in s]
        if not keys and not (adapter.attention_removed(i) and adapter.mlp_removed(i)):
            raise DomainpruneError(
                "hidden pruning needs statistics of the norm outputs; clear the statistics cache and rerun"
            )
        for k in keys:
            score += (s[k].double().cpu() / float(s["tokens"])).sqrt()
    return score


def choose_hidden(
    adapter: DecoderAdapter, stats: list[dict], hidden_sparsity: float, round_to: int | None = None
) -> list[int]:
    """The kept residual channels: the highest-scoring `hidden_width` ones (ties to the lower index), sorted."""
    if not adapter.prunable_hidden:
        raise DomainpruneError(
            f"hidden channels of {adapter.model_type!r} models cannot be pruned exactly "
            f"({adapter.hidden_not_prunable_reason}); leave out --hidden-sparsity"
        )
    score = hidden_scores(adapter, stats)
    n = hidden_width(adapter, hidden_sparsity, round_to)
    order = sorted(range(len(score)), key=lambda c: (-float(score[c]), c))
    return sorted(order[:n])
