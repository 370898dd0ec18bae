"""Compensation for removed units, applied while a plan is carried out, layer by layer (`--compensation`):

Removing heads or FFN channels deletes input columns of the layer's output projections (attention.output.dense,
output.dense), both of which have a bias. With x the projection's input on calibration tokens (padding excluded),
K the kept columns and R the removed ones:

- `none`: drop the columns.
- `bias`: FLAP's bias compensation: b += W_R·E[x_R], the removed columns' mean contribution.
- `refit`: least-squares refit of the kept columns and the bias (structured OBS, as domainprune/obs.py does for
  decoders): with z = (x_K, 1), [W_K, b] += W_R·E[x_R zᵀ]·(E[z zᵀ] + λI)⁻¹, λ = 1 % of the mean diagonal. It
  minimises the projection's output error on the calibration tokens; `bias` is its special case with z = 1.
- `refit-dense`: the same least squares, but towards the dense model's projection output on the same tokens
  (its own, unpruned inputs): it also corrects the error that earlier pruned layers left in this projection's
  input. Every output projection is refitted, also where the layer itself removes nothing.

The statistics of layer i are collected on the model whose layers before i (and, for output.dense, whose attention
in layer i) are already pruned and compensated, so later layers correct for the error of earlier ones. Units whose
columns or inputs are zero are removed exactly under every compensation (the correction term is zero).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import Registry
from .model import BertUnits, encoder_units
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
    layer = encoder_units(model).layers[0]
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
def input_gram(
    layer: torch.nn.Module,
    linear: torch.nn.Linear,
    inputs: list[LayerInputs],
    dense: tuple[torch.nn.Module, torch.nn.Linear, list[LayerInputs]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Σ z zᵀ over the calibration tokens (padding excluded) of z = (input of `linear`, 1), in float64, the token
    count, and with `dense` = (the dense layer, its projection, its inputs), the cross term Σ z_dense zᵀ of the
    dense model's projection input on the same tokens; `linear` belongs to `layer`, which is run on `inputs`."""
    width = linear.in_features + 1
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, width, dtype=torch.float64) if dense is not None else None
    count = [0]
    seen: list[torch.Tensor] = []

    def capture(target: list[torch.Tensor], mask: torch.Tensor):
        def hook(module, args):
            x = args[0].detach()[mask].double().cpu()
            target.append(torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1))
            raise _Stop

        return hook

    def run(module: torch.nn.Module, proj: torch.nn.Linear, x: LayerInputs) -> torch.Tensor:
        seen.clear()
        handle = proj.register_forward_pre_hook(capture(seen, x.mask))
        try:
            _run(module, x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0]

    for k, x in enumerate(inputs):
        z = run(layer, linear, x)
        gram.add_(z.T @ z)
        count[0] += len(z)
        if dense is not None:
            cross.add_(run(dense[0], dense[1], dense[2][k]).T @ z)
    return gram, cross, count[0]


@COMPENSATIONS.register("none")
def no_compensation(w, b, g, c, kept, gone):
    return w[:, kept].clone(), b.clone()


@COMPENSATIONS.register("bias")
def bias_compensation(w, b, g, c, kept, gone):
    n = w.shape[1]
    return w[:, kept].clone(), b + w[:, gone] @ g[gone, n]


def _least_squares(w, b, g, c, kept):
    """[W_K, b] + ([W, b]·C[:, K+] − [W_K, b]·G[K+, K+])·(G[K+, K+] + λI)⁻¹, K+ = K and the bias: the least-squares
    fit of the target [W, b]·z_target from the kept inputs, written as a correction so that it is exactly zero when
    the removed part contributes nothing (whatever λ)."""
    n = w.shape[1]
    rows = torch.cat([kept, torch.tensor([n])])
    full = torch.cat([w, b[:, None]], 1)
    a = g[rows][:, rows]
    residual = full @ c[:, rows] - full[:, rows] @ a
    a = a + DAMP * a.diagonal().mean() * torch.eye(len(rows), dtype=torch.float64)
    delta = torch.linalg.solve(a, residual.T).T
    return w[:, kept] + delta[:, :-1], b + delta[:, -1]


@COMPENSATIONS.register("refit")
def refit(w, b, g, c, kept, gone):
    return _least_squares(w, b, g, g, kept)  # the target: the dense projection on the pruned model's own input


@COMPENSATIONS.register("refit-dense", dense_target=True)
def refit_dense(w, b, g, c, kept, gone):
    return _least_squares(w, b, g, c, kept)  # the target: the dense model's projection output on the same tokens


def correction(
    weight: torch.Tensor,
    bias: torch.Tensor,
    gram: torch.Tensor | None,
    keep: list[int],
    how: str,
    cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compensated (W_K, b), in float64, of a projection whose input columns outside `keep` are removed;
    `gram` is Σ z zᵀ of z = (input, 1) over the calibration tokens (None for `none`), `cross` Σ z_dense zᵀ with
    the dense model's input (`refit-dense` only)."""
    n = weight.shape[1]
    kept = torch.tensor(keep, dtype=torch.long)
    gone = torch.tensor(sorted(set(range(n)) - set(keep)), dtype=torch.long)
    w, b = weight.detach().double().cpu(), bias.detach().double().cpu()
    if gram is None or (len(gone) == 0 and cross is None):
        return no_compensation(w, b, gram, cross, kept, gone)
    scale = gram[n, n]  # the token count: the corner of E[z zᵀ] is 1, E[x] beside it
    return COMPENSATIONS.lookup(how)(w, b, gram / scale, None if cross is None else cross / scale, kept, gone)


def _set(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    ref = linear.weight
    linear.weight = torch.nn.Parameter(weight.to(device=ref.device, dtype=ref.dtype).contiguous())
    linear.bias = torch.nn.Parameter(bias.to(device=ref.device, dtype=ref.dtype))
    linear.in_features = weight.shape[1]


@torch.no_grad()
def apply_compensated(units: BertUnits, plans: list[dict], how: str, texts: list[str], batch_size: int) -> None:
    """Keep each layer's plan["heads"] / plan["channels"], compensating its output projections as `how` says on
    statistics of the already pruned and compensated model, layer by layer."""
    dense_target = getattr(COMPENSATIONS.lookup(how), "dense_target", False)
    inputs = first_layer_inputs(units.model, texts, batch_size)
    dense_inputs = inputs
    for i, plan in enumerate(plans):
        layer = units.layers[i]
        original = copy.deepcopy(layer) if dense_target else None
        heads, channels = plan["heads"], plan["channels"]
        stages = (
            ("attention.output.dense", len(heads) < units.heads(i), lambda: units.keep_heads(i, heads)),
            ("output.dense", len(channels) < units.channels(i), lambda: units.keep_channels(i, channels)),
        )
        for proj, removes, remove in stages:
            if not removes and not dense_target:  # nothing removed, nothing to correct towards
                continue
            linear = layer.get_submodule(proj)
            dense = (original, original.get_submodule(proj), dense_inputs) if dense_target else None
            w, b = linear.weight.data.clone(), linear.bias.data.clone()
            gram, cross, _ = input_gram(layer, linear, inputs, dense)
            if removes:
                remove()
            cols = (
                [h * units.head_dim + k for h in heads for k in range(units.head_dim)]
                if proj.startswith("attention")
                else channels
            )
            _set(linear, *correction(w, b, gram, cols, how, cross))
        if i + 1 < len(plans):
            inputs = [LayerInputs((_run(layer, x), *x.args[1:]), x.kwargs, x.mask) for x in inputs]
            if dense_target:
                dense_inputs = [LayerInputs((_run(original, x), *x.args[1:]), x.kwargs, x.mask) for x in dense_inputs]
