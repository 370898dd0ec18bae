"""Compensation for removed units, applied while a plan is carried out, layer by layer (`--compensation`):

Removing heads or FFN channels deletes input columns of the layer's output projections (attention.output.dense,
output.dense), both of which have a bias. With x the projection's input on calibration tokens (padding excluded),
K the kept columns and R the removed ones:

- `none`: drop the columns.
- `bias`: FLAP's bias compensation: b += W_R·E[x_R], the removed columns' mean contribution.
- `refit`: least-squares refit of the kept columns and the bias (structured OBS, as domainprune/obs.py does for
  decoders): with z = (x_K, 1), [W_K, b] += W_R·E[x_R zᵀ]·(E[z zᵀ] + λI)⁻¹, λ = 1 % of the mean diagonal. It
  minimises the projection's output error on the calibration tokens; `bias` is its special case with z = 1.

The statistics of layer i are collected on the model whose layers before i (and, for output.dense, whose attention
in layer i) are already pruned and compensated, so later layers correct for the error of earlier ones. Units whose
columns or inputs are zero are removed exactly under every compensation (the correction term is zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..registry import Registry
from .model import BertUnits
from .train import batches

COMPENSATIONS = Registry("encoder compensation")
DAMP = 0.01


class _Stop(Exception):
    """Raised by a hook once what it needs is recorded: the rest of the forward pass is not needed."""


@dataclass
class LayerInputs:
    """One calibration batch at the input of the layer being pruned: the layer's positional and keyword arguments
    (hidden states first, then the attention mask as the encoder passes it) and the padding mask."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor


@torch.no_grad()
def first_layer_inputs(model: Any, texts: list[str], batch_size: int) -> list[LayerInputs]:
    """The calibration texts embedded once and captured at the first encoder layer; later layers are fed from here
    (each layer runs once per stage instead of the whole model)."""
    layer = BertUnits(model).layers[0]
    captured: list[LayerInputs] = []
    mask: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(LayerInputs(tuple(args), dict(kwargs), mask[0]))
        raise _Stop

    device = next(model.parameters()).device
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in batches(texts, batch_size, False, "compensation"):
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(inputs=chunk).items()}
            mask[:] = [features["attention_mask"].bool()]
            try:
                model(features)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run(layer: torch.nn.Module, x: LayerInputs) -> torch.Tensor:
    out = layer(*x.args, **x.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def input_gram(layer: torch.nn.Module, linear: torch.nn.Linear, inputs: list[LayerInputs]) -> tuple[torch.Tensor, int]:
    """Σ z zᵀ over the calibration tokens (padding excluded) of z = (input of `linear`, 1), in float64, and the
    token count; `linear` belongs to `layer`, which is run on `inputs`."""
    width = linear.in_features + 1
    gram = torch.zeros(width, width, dtype=torch.float64)
    count = [0]
    mask: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0].detach()[mask[0]].double().cpu()
        z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        gram.add_(z.T @ z)
        count[0] += len(x)
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            mask[:] = [x.mask]
            try:
                _run(layer, x)
            except _Stop:
                pass
    finally:
        handle.remove()
    return gram, count[0]


@COMPENSATIONS.register("none")
def no_compensation(w: torch.Tensor, b: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, gone: torch.Tensor):
    return w[:, kept].clone(), b.clone()


@COMPENSATIONS.register("bias")
def bias_compensation(w: torch.Tensor, b: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, gone: torch.Tensor):
    n = w.shape[1]
    return w[:, kept].clone(), b + w[:, gone] @ g[gone, n]


@COMPENSATIONS.register("refit")
def refit(w: torch.Tensor, b: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, gone: torch.Tensor):
    n = w.shape[1]
    rows = torch.cat([kept, torch.tensor([n])])
    a = g[rows][:, rows]
    a = a + DAMP * a.diagonal().mean() * torch.eye(len(rows), dtype=torch.float64)
    delta = torch.linalg.solve(a, (w[:, gone] @ g[gone][:, rows]).T).T  # W_R E[x_R zᵀ] (E[z zᵀ] + λI)⁻¹
    return w[:, kept] + delta[:, :-1], b + delta[:, -1]


def correction(weight: torch.Tensor, bias: torch.Tensor, gram: torch.Tensor, keep: list[int], how: str) -> tuple:
    """The compensated (W_K, b), in float64, of a projection whose input columns outside `keep` are removed;
    `gram` is Σ z zᵀ of z = (input, 1) over the calibration tokens (None for `none`)."""
    n = weight.shape[1]
    kept = torch.tensor(keep, dtype=torch.long)
    gone = torch.tensor(sorted(set(range(n)) - set(keep)), dtype=torch.long)
    w, b = weight.detach().double().cpu(), bias.detach().double().cpu()
    if gram is None or len(gone) == 0:
        return no_compensation(w, b, gram, kept, gone)
    return COMPENSATIONS.lookup(how)(w, b, gram / gram[n, n], kept, gone)  # scaled: the corner is 1, E[x] beside


def _set(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    ref = linear.weight
    linear.weight = torch.nn.Parameter(weight.to(device=ref.device, dtype=ref.dtype).contiguous())
    linear.bias = torch.nn.Parameter(bias.to(device=ref.device, dtype=ref.dtype))
    linear.in_features = weight.shape[1]


@torch.no_grad()
def apply_compensated(units: BertUnits, plans: list[dict], how: str, texts: list[str], batch_size: int) -> None:
    """Keep each layer's plan["heads"] / plan["channels"], compensating its output projections as `how` says on
    statistics of the already pruned and compensated model, layer by layer."""
    COMPENSATIONS.lookup(how)
    inputs = first_layer_inputs(units.model, texts, batch_size)
    for i, plan in enumerate(plans):
        layer = units.layers[i]
        heads, channels = plan["heads"], plan["channels"]
        if len(heads) < units.heads(i):
            dense = layer.attention.output.dense
            w, b = dense.weight.data.clone(), dense.bias.data.clone()
            gram = input_gram(layer, dense, inputs)[0]
            units.keep_heads(i, heads)
            cols = [h * units.head_dim + k for h in heads for k in range(units.head_dim)]
            _set(dense, *correction(w, b, gram, cols, how))
        if len(channels) < units.channels(i):
            out = layer.output.dense
            w, b = out.weight.data.clone(), out.bias.data.clone()
            gram = input_gram(layer, out, inputs)[0]
            units.keep_channels(i, channels)
            _set(out, *correction(w, b, gram, channels, how))
        if i + 1 < len(plans):
            inputs = [LayerInputs((_run(layer, x), *x.args[1:]), x.kwargs, x.mask) for x in inputs]
