"""Gradient statistics for the gradient criteria (taylor, fisher, dpruner, gaprune, nirvana); see docs/criteria.md.

The calibration sequences run in micro-batches through forward + backward with the model in eval mode (no dropout)
and gradients enabled. Only the weights the criteria score (q/k/v/o and gate/up/down of every layer) take
gradients: every other parameter is frozen for the pass and restored afterwards, so no embedding or LM-head gradient
is ever materialised. With `gradient_checkpointing=True`, `model.gradient_checkpointing_enable()` is switched on for
the pass (non-reentrant; only the decoder layers' own `training` flag is set, so dropout stays off).

What is kept. A tensor hook on each target weight sees the micro-batch gradient g_m before PyTorch adds it to
`.grad`, and folds it straight into PER-UNIT accumulators (one number per query head, KV head or MLP channel and per
projection): Σ_m Σ_slice W·g_m, Σ_m Σ_slice W²·g_m², Σ_m Σ_slice |W|·g_m², D-Pruner's Σ_m Σ_slice |g′W + ½(g′W)²|.
Per-sample gradients are never kept. `.grad` itself holds the running sum Σ_m g_m (the one full-size gradient any
backward needs); after the last micro-batch it is reduced to per-unit quantities (element-wise Σ_slice |W·ḡ|,
alignment dot products) and released. Only two options keep another full-size tensor: taylor's `param_mix` keeps
the element-wise Fisher, and gaprune keeps the general stream's mean gradient while the domain stream runs (D-Pruner
keeps its general importance G, one tensor per weight, during its domain pass).

Fisher is the empirical Fisher of MICRO-BATCH gradients: F = (1/M) Σ_m g_m², g_m = ∇ of the mean token loss of
micro-batch m. It is the per-sample Fisher only with `micro_batch=1` (the default for gradient criteria).

Every quantity is divided by the number of micro-batches M, so ḡ = (1/M) Σ_m g_m is the mean-loss gradient.

Per-unit results are cached on disk (`cache.entry("grads", key)`), keyed by the model, the data and the settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import cache
from .adapters import DecoderAdapter
from .errors import DomainpruneError
from .stats import model_fingerprint, tensor_fingerprint

log = logging.getLogger(__name__)
GRADS_VERSION = 1
PROJS = ("q", "k", "v", "o", "gate", "up", "down")
# projection -> (slice along rows (True) or columns (False), unit kind)
LAYOUT = {
    "q": (True, "head"),
    "k": (True, "kv"),
    "v": (True, "kv"),
    "o": (False, "head"),
    "gate": (True, "channel"),
    "up": (True, "channel"),
    "down": (False, "channel"),
}
STEP_QUANTITIES = ("wg", "w2g2", "absw_g2", "dpruner")  # folded in from each micro-batch gradient
FINAL_QUANTITIES = ("abs_wgbar", "mix", "gbar_dot_ref", "gbar_sq", "ref_sq")  # from the summed gradient
UnitStats = dict[str, dict[str, torch.Tensor]]  # quantity -> projection -> (units,) float64


def target_weights(adapter: DecoderAdapter, i: int) -> dict[str, torch.nn.Parameter]:
    q, k, v = adapter.attention_in_projs(i)
    gate, up = adapter.mlp_in_projs(i)
    mods = dict(q=q, k=k, v=v, o=adapter.o_proj(i), gate=gate, up=up, down=adapter.down_proj(i))
    return {name: m.weight for name, m in mods.items()}


def unit_width(adapter: DecoderAdapter, proj: str) -> int:
    return 1 if LAYOUT[proj][1] == "channel" else adapter.head_dim


def per_unit(e: torch.Tensor, proj: str, width: int) -> torch.Tensor:
    """Sum an element-wise (out, in) tensor over each unit's slice of projection `proj`: (units,) float64."""
    rows, _ = LAYOUT[proj]
    s = e.sum(1) if rows else e.sum(0)
    return s.double().reshape(-1, width).sum(1).cpu()


def check_backprop(model: torch.nn.Module, adapter: DecoderAdapter, method: str) -> None:
    """One-line errors for models that cannot give the gradients `method` needs."""
    for i in range(adapter.num_layers):
        if adapter.attention_removed(i) or not adapter.has_dense_mlp(i):
            raise DomainpruneError(
                f"method {method!r} needs every layer's attention and MLP; layer {i} has one removed"
            )
        for name, w in target_weights(adapter, i).items():
            if not w.is_floating_point() or w.is_meta:
                raise DomainpruneError(
                    f"method {method!r} needs gradients, but layer {i} {name}_proj has {w.dtype} weights on "
                    f"{w.device.type}; load the model in float32 or bfloat16"
                )
            if w.is_inference():
                raise DomainpruneError(
                    f"method {method!r} needs gradients, but the model's weights were created in inference mode; load "
                    "it outside torch.inference_mode()"
                )
            if not w.requires_grad:
                raise DomainpruneError(
                    f"method {method!r} needs gradients, but layer {i} {name}_proj has requires_grad=False; call "
                    "model.requires_grad_(True) first"
                )
            if w.device.type == "cpu" and w.dtype == torch.float16:
                raise DomainpruneError(
                    f"method {method!r} needs gradients, which float16 on CPU cannot give; use --dtype float32 (or "
                    "bfloat16)"
                )


@contextmanager
def _backprop_mode(model: torch.nn.Module, adapter: DecoderAdapter, checkpointing: bool):
    targets = {id(w) for i in range(adapter.num_layers) for w in target_weights(adapter, i).values()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in targets]
    was_training = model.training
    had_ckpt = any(getattr(layer, "gradient_checkpointing", False) for layer in adapter.layers)
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    if checkpointing:
        # transformers ≥ 5.x renames gradient_checkpointing_enable to activation_checkpointing_enable
        kwargs = {"use_reentrant": False}  # frozen embeddings: the checkpointed inputs need no grad
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise DomainpruneError(
                "--gradient-checkpointing needs a transformers model (gradient_checkpointing_enable)"
            )
        for layer in adapter.layers:  # HF checkpoints only `if self.training`; children (dropout) stay in eval
            layer.training = True
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if checkpointing:
            for layer in adapter.layers:
                layer.training = False
            if not had_ckpt:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def objective_value(model: torch.nn.Module, batch: torch.Tensor, objective: str) -> torch.Tensor:
    out = model(input_ids=batch, use_cache=False).logits
    if objective == "loss":  # mean next-token cross-entropy of the micro-batch
        return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    if objective == "nirvana":  # NIRVANA: mean over batch and vocabulary of the max-over-positions logits
        return out.float().amax(dim=1).mean()
    raise DomainpruneError(f"unknown gradient objective {objective!r}")


def accumulate(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    *,
    quantities: Iterable[str],
    micro_batch: int = 1,
    objective: str = "loss",
    gradient_checkpointing: bool = False,
    general_importance: list[dict[str, torch.Tensor]] | None = None,
    reference: list[dict[str, torch.Tensor]] | None = None,
    dpruner_lambda: float = 0.1,
    dpruner_step: float = 0.03,
    keep_mean_gradient: bool = False,
    progress: bool = True,
) -> tuple[list[UnitStats], list[dict[str, torch.Tensor]] | None]:
    """Per-unit gradient quantities of every layer (see the module docstring), each divided by the number of
    micro-batches. Quantities:

    - `wg`: Σ_slice W·ḡ; `w2g2`: Σ_slice W²·F; `absw_g2`: Σ_slice |W|·F (F = mean of g_m²);
    - `dpruner`: mean_m Σ_slice |g′W + ½(g′W)²| with g′ = g_m + 2λ·G⊙(W′−W), W′−W = −η·g_m (one SGD step of
      size η = `dpruner_step` on the domain loss; G = `general_importance`);
    - `abs_wgbar`: Σ_slice |W·ḡ|; `mix`: Σ_slice |W·ḡ − ½W²·F|;
    - `gbar_dot_ref`, `gbar_sq`, `ref_sq`: Σ_slice ḡ·r, Σ_slice ḡ², Σ_slice r² with r = `reference` (full tensors).

    With `keep_mean_gradient` the full mean gradient ḡ of every weight is returned too (gaprune's reference).
    """
    quantities = set(quantities)
    if micro_batch < 1:
        raise DomainpruneError(f"--micro-batch must be at least 1, got {micro_batch}")
    if "dpruner" in quantities and general_importance is None:
        raise DomainpruneError("the dpruner quantity needs the general importance G")
    device = next(model.parameters()).device
    batches = list(sequences.split(micro_batch))
    n_layers = adapter.num_layers
    acc: list[UnitStats] = [{q: {} for q in quantities} for _ in range(n_layers)]
    fisher_full: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def add(i: int, q: str, proj: str, value: torch.Tensor) -> None:
        d = acc[i][q]
        d[proj] = d[proj] + value if proj in d else value

    def make_hook(i: int, proj: str, w: torch.Tensor):
        width = unit_width(adapter, proj)

        @torch.no_grad()
        def hook(g: torch.Tensor):
            g32, w32 = g.float(), w.detach().float()
            if "wg" in quantities:
                add(i, "wg", proj, per_unit(w32 * g32, proj, width))
            if quantities & {"w2g2", "absw_g2", "mix"}:
                g2 = g32 * g32
                if "w2g2" in quantities:
                    add(i, "w2g2", proj, per_unit(w32 * w32 * g2, proj, width))
                if "absw_g2" in quantities:
                    add(i, "absw_g2", proj, per_unit(w32.abs() * g2, proj, width))
                if "mix" in quantities:
                    key = (i, proj)
                    fisher_full[key] = fisher_full[key] + g2 if key in fisher_full else g2
            if "dpruner" in quantities:
                G = general_importance[i][proj].to(g32.device)
                g_ref = g32 + 2 * dpruner_lambda * G * (-dpruner_step * g32)
                s = g_ref * w32
                add(i, "dpruner", proj, per_unit((s + 0.5 * s * s).abs(), proj, width))
            return None  # PyTorch adds g_m to .grad: the running sum

        return hook

    for i in range(n_layers):
        for proj, w in target_weights(adapter, i).items():
            handles.append(w.register_hook(make_hook(i, proj, w)))
    mean_grads = None
    try:
        with _backprop_mode(model, adapter, gradient_checkpointing):
            model.zero_grad(set_to_none=True)
            for batch in tqdm(batches, desc="gradients", unit="batch", disable=not progress):
                objective_value(model, batch.to(device), objective).backward()
            m = len(batches)
            mean_grads = [] if keep_mean_gradient else None
            with torch.no_grad():
                for i in range(n_layers):
                    for proj, w in target_weights(adapter, i).items():
                        width = unit_width(adapter, proj)
                        gbar = w.grad.float() / m if w.grad is not None else torch.zeros_like(w, dtype=torch.float32)
                        w32 = w.detach().float()
                        if "abs_wgbar" in quantities:
                            acc[i]["abs_wgbar"][proj] = per_unit((w32 * gbar).abs(), proj, width)
                        if "mix" in quantities:
                            fisher = fisher_full.pop((i, proj)) / m
                            acc[i]["mix"][proj] = per_unit((w32 * gbar - 0.5 * w32 * w32 * fisher).abs(), proj, width)
                        if quantities & {"gbar_dot_ref", "gbar_sq", "ref_sq"}:
                            r = reference[i][proj].to(gbar.device).float()
                            acc[i].setdefault("gbar_dot_ref", {})[proj] = per_unit(gbar * r, proj, width)
                            acc[i].setdefault("gbar_sq", {})[proj] = per_unit(gbar * gbar, proj, width)
                            acc[i].setdefault("ref_sq", {})[proj] = per_unit(r * r, proj, width)
                        if mean_grads is not None:
                            if len(mean_grads) <= i:
                                mean_grads.append({})
                            mean_grads[i][proj] = gbar.cpu()
                        w.grad = None
    finally:
        for h in handles:
            h.remove()
    for i in range(n_layers):
        for q in STEP_QUANTITIES:
            if q in acc[i]:
                acc[i][q] = {p: v / len(batches) for p, v in acc[i][q].items()}
    return acc, mean_grads


# --- D-Pruner's general importance (SparseGPT-style, forward only) ------------------------------------------------


@torch.inference_mode()
def input_hessians(
    model: torch.nn.Module, adapter: DecoderAdapter, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> list[dict[str, torch.Tensor]]:
    """H = 2XXᵀ/N (float32, N tokens) of the inputs of q/k/v (shared), o, gate/up (shared) and down of every layer."""
    device = next(model.parameters()).device
    sums: list[dict[str, torch.Tensor]] = [{} for _ in range(adapter.num_layers)]
    tokens = 0
    handles = []

    def hook(i: int, key: str):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[i][key] = sums[i][key] + x.T @ x if key in sums[i] else x.T @ x

        return fn

    for i in range(adapter.num_layers):
        q, _, _ = adapter.attention_in_projs(i)
        gate, _ = adapter.mlp_in_projs(i)
        for key, mod in (("qkv", q), ("o", adapter.o_proj(i)), ("gateup", gate), ("down", adapter.down_proj(i))):
            handles.append(mod.register_forward_pre_hook(hook(i, key)))
    try:
        for batch in tqdm(list(sequences.split(batch_size)), desc="hessians", unit="batch", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return [{k: 2 * v / tokens for k, v in layer.items()} for layer in sums]


def sparsegpt_importance(w: torch.Tensor, h: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """G = W² / diag(U)², U = chol(H⁻¹) upper (SparseGPT's error metric), with damping·mean(diag H) added to H and
    dead inputs (H_jj = 0) handled as SparseGPT does (H_jj = 1, W_:j = 0)."""
    h = h.double().clone()
    w = w.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(hinv, upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise DomainpruneError(
            f"the calibration Hessian is not positive definite ({e}); use more general calibration data"
        ) from None
    return (w * w / torch.diag(u).pow(2)).float()


def general_importance(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    batch_size: int = 8,
    damping: float = 0.01,
    progress: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """D-Pruner step 1 per weight (one-shot, not layer-sequential): G for every target weight."""
    hess = input_hessians(model, adapter, sequences, batch_size, progress)
    out = []
    source = dict(q="qkv", k="qkv", v="qkv", o="o", gate="gateup", up="gateup", down="down")
    for i in range(adapter.num_layers):
        out.append(
            {p: sparsegpt_importance(w, hess[i][source[p]], damping) for p, w in target_weights(adapter, i).items()}
        )
        hess[i] = {}
    return out


# --- caching -------------------------------------------------------------------------------------------------------


def cached(kind: str, parts: list, compute: Callable[[], list[UnitStats]], use_cache: bool = True) -> list[UnitStats]:
    """Per-unit results of `compute()`, cached under `cache.entry("grads", fingerprint(kind, parts))`."""
    key = cache.fingerprint("grads", GRADS_VERSION, kind, *parts)
    path: Path = cache.entry("grads", key) / "units.safetensors"
    if use_cache and (entry := cache.load_tensors(path)) is not None:
        log.info("%s gradients: cached (%s)", kind, path.parent)
        flat, n_layers = entry
        result: list[UnitStats] = [{} for _ in range(n_layers)]
        for name, t in flat.items():  # "layer/quantity/projection"
            i, quantity, projection = name.split("/", 2)
            result[int(i)].setdefault(quantity, {})[projection] = t
        return result
    result = compute()
    if use_cache:
        flat = {f"{i}/{q}/{p}": t for i, layer in enumerate(result) for q, per in layer.items() for p, t in per.items()}
        cache.save_tensors(path, flat, len(result))
    return result


def fingerprints(model: torch.nn.Module, *sequences: torch.Tensor | None) -> list[str]:
    return [model_fingerprint(model), *(tensor_fingerprint(s) if s is not None else "-" for s in sequences)]


def cosine(dot: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    den = (a_sq * b_sq).sqrt()
    return torch.where(den > 0, dot / den.clamp_min(1e-300), torch.zeros_like(dot))


def zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=x.dtype)
    return (x - x.mean()) / (std if std > 0 and math.isfinite(float(std)) else 1)
