"""Structured OBS reconstruction (`--reconstruct obs`) and the greedy OBS unit choice (`--method obs`); METHODS.md §11.

What is refitted. Only the kept input columns of o_proj (a head = head_dim columns) and down_proj (one column per
MLP channel); the rows of q/k/v and gate/up of removed units are simply deleted, as in ZipLM and SlimGPT.

The closed form, exactly as METHODS.md §11 states it. With X the module's calibration inputs (d_in × N tokens),
H = XXᵀ, kept columns K and removed columns P, the least-squares refit argmin_{W′} ‖WX − W′_K X_K‖² is

    W′_K = W·H_{:,K}·H_KK⁻¹ = W_K + W_P·H_PK·H_KK⁻¹,

computed with the damped H + λI, λ = `damping`·mean(diag H) (ZipLM's `rel_damp` and Týr's 1 %: `OBS_DAMPING`), as a
float64 Cholesky solve. Damping makes this ridge regression towards the unpruned W_K; `damping=0` is the exact
least-squares refit (used by the tests). Inputs that are zero on every calibration token (H_jj = 0) get H_jj = 1 and
contribute nothing, as in SparseGPT.

Which X. The refit target is the module's own unpruned output W·X on the inputs X it sees *now*, i.e. produced by the
already pruned-and-reconstructed layers before it (SparseGPT/SlimGPT sequential convention, one H per module, the
formula above). Regressing onto the dense model's outputs instead (W·X_dense with X_pruned as regressor, which needs the
cross-moment X_dense X_prunedᵀ and a second activation stream) was tried and is not kept: on SmolLM2, code, cfsp 35 %,
128×128 calibration tokens it gave 1.43× dense code perplexity with every o_proj/down_proj refitted that way and
1.66× with only the pruned ones, against 1.34× for this refit (2026-11-28, 32×256 test tokens).

Order inside layer i (true-sequential):
1. H of o_proj's input, collected on the layer as it is (its q/k/v not yet sliced). Each head's output depends only on
   its own q rows and its KV head, so removing other heads leaves the kept columns of X unchanged: H_KK equals what
   the sliced layer would give, and H_PK holds what the removed heads produced, which the refit has to replace.
2. Attention refit, then q/k/v/o sliced.
3. H of down_proj's input, collected on the layer with the pruned attention (the MLP sees the pruned residual).
4. MLP refit, then gate/up/down sliced.
5. The layer's outputs on all calibration batches become the next layer's inputs.

Bias compensation (`--bias-compensation`, FLAP). With it, a constant input (a row of ones in X) is appended and kept:
the least squares then also fits an output bias, the optimal affine refit, which on the calibration data is never
worse than FLAP's mean-output bias (FLAP's W_K with bias W_P·x̄_P is one of the candidates; the damping does not
penalise the bias). Without it no bias is added and the export stays stock-loadable. FLAP's separate mean-bias step is
not applied on top: the fitted bias replaces it.

Greedy OBS unit choice (`--method obs`; ZipLM, SlimGPT). With H⁻¹ of the damped (augmented) H, removing the column set
S costs E_S = tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ); the unit with the least E_S is removed, then

    W ← W − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:},   H⁻¹ ← H⁻¹ − (H⁻¹)_{:,S} [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}

restricted to the columns left, and the next unit is chosen on the updated W and H⁻¹, until the layer's budget (the
uniform allocation's count) is met. Units: whole KV groups (`kv_group`) or query heads (`query_head`, at most r per
KV group so every group keeps the same count). MLP channels go one at a time (ZipLM) while a layer removes at most
`OBS_CHANNEL_STEPS` = 64 of them; beyond that they go in 64 groups of ⌈n/64⌉, each group the channels with the least
current single-channel error, removed jointly with the exact group update (SlimGPT's batched greedy, with a fixed
number of steps instead of its 512-halving schedule). The greedy's final W equals the refit above for the chosen set
(same damped H), so the weights are then written by the same `refit` the other criteria use.

Cost. H is hidden² (o_proj) and intermediate² (down_proj) per layer, accumulated in float32 on the model's device
and solved in float64: for an 8B Llama shape (intermediate 14336) that is 820 MB (float32) plus 1.6 GB (float64) while
one layer is processed; for SmolLM2-135M, 9 MB. The greedy channel choice touches an intermediate² float64 H⁻¹ 64
times per layer (on an H100, hidden 2048 / intermediate 8192 in bf16 with 32×512 tokens: 0.85 s per layer for
`--method obs`, 0.08 s for the refit of a given plan; peak 3.5 GiB).

Effect. SmolLM2-135M, `code`, 35 %, 32×128 calibration tokens, KL(dense‖pruned) on 16×128 held-out validation tokens:
wanda-sp 1.50, wanda-sp `--reconstruct obs` 0.91, `--method obs` 0.82 (CPU, one thread: 66 s, 73 s, 135 s). Every layer
runs its calibration batches about three times (H of o_proj, H of down_proj, outputs; a sequential criterion such as
wanda-sp adds its statistics pass). Nothing is cached: the pass changes the model as it goes; a progress bar counts
layers.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import faults
from .adapters import DecoderAdapter
from .errors import DomainpruneError
from .plan import LayerPlan, Plan
from .runner import LayerSource, walk
from .stats import LayerStats, LayerwiseRunner, load_resume, save_resume

log = logging.getLogger(__name__)

OBS_DAMPING = 0.01  # λ = OBS_DAMPING · mean(diag H): ZipLM's rel_damp, Týr's 1 %
OBS_CHANNEL_STEPS = 64  # greedy channel removal: at most this many H⁻¹ updates per layer


@dataclass
class InputHessian:
    """Σ x xᵀ, Σ x and the token count of one module's calibration inputs."""

    h: torch.Tensor  # (d, d) float32
    s: torch.Tensor  # (d,) float64
    n: int

    def damped(self, bias: bool, damping: float) -> torch.Tensor:
        """float64 H + λI (dead inputs: H_jj = 1), augmented with the constant input as the last column if `bias`."""
        h = self.h.double().clone()
        d = h.shape[0]
        diag = torch.diagonal(h)
        dead = diag == 0
        lam = damping * float(diag.mean()) if d else 0.0
        diag += lam
        diag[dead] = diag[dead] + 1.0
        if not bias:
            return h
        out = h.new_zeros(d + 1, d + 1)
        out[:d, :d] = h
        out[:d, d] = out[d, :d] = self.s.to(h)
        out[d, d] = float(self.n)
        return out


def _cholesky(a: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric matrix, with a growing jitter if rounding made it indefinite."""
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool(info.any()):
        return chol
    scale = float(torch.diagonal(a, dim1=-2, dim2=-1).abs().mean()) or 1.0
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for jitter in (1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        if not bool(info.any()):
            return chol
    raise DomainpruneError(
        f"{what}: the calibration Hessian is not positive definite even with damping; use more calibration data "
        "(--calib-samples)"
    )


def refit(
    weight: torch.Tensor,
    hess: InputHessian,
    kept: torch.Tensor,
    *,
    bias: bool = False,
    damping: float = OBS_DAMPING,
    what: str = "refit",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W′_K = W_K + W_P·H_PK·(H_KK + λI)⁻¹ for the kept input columns `kept` (sorted); with `bias`, the constant input
    is a kept column too and its coefficient, the fitted output bias, is returned. float64 results."""
    w = weight.detach().double()
    d = w.shape[1]
    kept = kept.to(device=w.device, dtype=torch.long)
    removed_mask = torch.ones(d, dtype=torch.bool, device=w.device)
    removed_mask[kept] = False
    removed = removed_mask.nonzero().squeeze(1)
    h = hess.damped(bias, damping).to(w.device)
    k_hat = torch.cat([kept, torch.tensor([d], device=w.device)]) if bias else kept
    if k_hat.numel() == 0:
        return w[:, kept], None
    if removed.numel() == 0:
        return w[:, kept].clone(), (w.new_zeros(w.shape[0]) if bias else None)
    chol = _cholesky(h[k_hat][:, k_hat], what)
    rhs = h[k_hat][:, removed] @ w[:, removed].T  # (k, d_out)
    delta = torch.cholesky_solve(rhs, chol).T  # (d_out, k)
    new = delta.clone()
    new[:, : kept.numel()] += w[:, kept]
    return new[:, : kept.numel()], (new[:, -1] if bias else None)


def greedy_remove(
    weight: torch.Tensor,
    hess: InputHessian,
    units: list[list[int]],
    n_remove: int,
    *,
    groups: list[int] | None = None,
    per_group: int | None = None,
    bias: bool = False,
    damping: float = OBS_DAMPING,
    step: int = 1,
    what: str = "obs",
) -> tuple[list[int], torch.Tensor]:
    """Greedy structured OBS: remove `n_remove` of `units` (each a list of input columns, all of one width), each
    time the unit(s) whose removal with optimal reconstruction of the rest costs least. With `groups`/`per_group`,
    at most `per_group` units of each group go (query heads under GQA). `step` units go per H⁻¹ update (single
    columns only). Returns the removed unit indices in removal order and the updated W on the columns left (sorted,
    plus the bias column last if `bias`)."""
    if n_remove <= 0:
        return [], weight.detach().double()
    w = weight.detach().double().clone()
    h = hess.damped(bias, damping).to(w.device)
    w[:, torch.diagonal(hess.h).to(w.device) == 0] = 0  # inputs never seen: removing them costs nothing
    if bias:
        w = torch.cat([w, w.new_zeros(w.shape[0], 1)], 1)
    hinv = torch.cholesky_inverse(_cholesky(h, what))
    cols = torch.arange(h.shape[0], device=w.device)  # original column of each current position
    width = len(units[0])
    if any(len(u) != width for u in units):
        raise ValueError("greedy_remove: every unit needs the same number of columns")
    if step > 1 and (width != 1 or groups is not None):
        raise ValueError("greedy_remove: step > 1 is for single columns without groups")
    unit_cols = torch.tensor(units, dtype=torch.long, device=w.device)  # (U, m)
    alive = [True] * len(units)
    taken: dict[int, int] = {}
    removed: list[int] = []
    while len(removed) < n_remove:
        cand = [u for u in range(len(units)) if alive[u] and (groups is None or taken.get(groups[u], 0) < per_group)]
        if not cand:
            raise DomainpruneError(f"{what}: cannot remove {n_remove} units within the per-group limit")
        pos_of = torch.full((int(cols.max()) + 1,), -1, dtype=torch.long, device=w.device)
        pos_of[cols] = torch.arange(cols.numel(), device=w.device)
        idx = pos_of[unit_cols[cand]]  # (C, m) current positions
        if width == 1:
            err = w[:, idx[:, 0]].pow(2).sum(0) / torch.diagonal(hinv)[idx[:, 0]].clamp_min(1e-300)
        else:
            m = hinv[idx[:, :, None], idx[:, None, :]]  # (C, m, m)
            lc = _cholesky(m, what)
            ws = w[:, idx].permute(1, 2, 0)  # (C, m, d_out)
            z = torch.linalg.solve_triangular(lc, ws, upper=False)
            err = z.pow(2).sum((1, 2))
        errs = err.cpu().tolist()  # one transfer, not one per candidate
        order = sorted(range(len(cand)), key=lambda j: (errs[j], cand[j]))
        chosen = [cand[j] for j in order[: min(step, n_remove - len(removed))]]
        for u in chosen:
            alive[u] = False
            removed.append(u)
            if groups is not None:
                taken[groups[u]] = taken.get(groups[u], 0) + 1
        s = pos_of[unit_cols[chosen].reshape(-1)]
        keep_mask = torch.ones(cols.numel(), dtype=torch.bool, device=w.device)
        keep_mask[s] = False
        a = keep_mask.nonzero().squeeze(1)
        ls = _cholesky(hinv[s][:, s], what)
        # W_A ← W_A − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_SA ;  H⁻¹_AA ← H⁻¹_AA − (H⁻¹)_AS [(H⁻¹)_SS]⁻¹ (H⁻¹)_SA
        t = torch.cholesky_solve(hinv[s][:, a], ls)  # (|S|, |A|)
        w = w[:, a] - w[:, s] @ t
        hinv = hinv[a][:, a] - hinv[a][:, s] @ t
        hinv = (hinv + hinv.T) / 2
        cols = cols[a]
    return removed, w


def choose_attention(
    weight: torch.Tensor,
    hess: InputHessian,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    n_remove: int,
    mode: str,
    *,
    bias: bool,
    damping: float,
    what: str,
) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads) after greedy OBS removal of `n_remove` KV groups or query-head rank slices."""
    group = num_heads // num_kv_heads
    heads_cols = [list(range(h * head_dim, (h + 1) * head_dim)) for h in range(num_heads)]
    if mode == "kv_group":
        units = [[c for h in range(k * group, (k + 1) * group) for c in heads_cols[h]] for k in range(num_kv_heads)]
        gone, _ = greedy_remove(weight, hess, units, n_remove, bias=bias, damping=damping, what=what)
        kv = [k for k in range(num_kv_heads) if k not in gone]
        return [h for h in range(num_heads) if h // group in kv], kv
    gone, _ = greedy_remove(
        weight,
        hess,
        heads_cols,
        n_remove * num_kv_heads,
        groups=[h // group for h in range(num_heads)],
        per_group=n_remove,
        bias=bias,
        damping=damping,
        what=what,
    )
    return [h for h in range(num_heads) if h not in gone], list(range(num_kv_heads))


def choose_channels(
    weight: torch.Tensor, hess: InputHessian, n_remove: int, *, bias: bool, damping: float, what: str
) -> list[int]:
    step = max(1, math.ceil(n_remove / OBS_CHANNEL_STEPS))
    gone, _ = greedy_remove(
        weight, hess, [[c] for c in range(weight.shape[1])], n_remove, bias=bias, damping=damping, step=step, what=what
    )
    gone_set = set(gone)
    return [c for c in range(weight.shape[1]) if c not in gone_set]


# --- the layer-sequential pass --------------------------------------------------------------------------------


class LayerChooser:
    """Decides what layer i keeps during the pass. `begin` sees the layer's statistics (on its current inputs, before
    it is touched) when `needs_stats`; `attention`/`mlp` may ask for the module's input Hessian."""

    needs_stats = False

    def begin(self, i: int, stats: LayerStats | None) -> None:
        pass

    def drop(self, i: int) -> bool:
        return False

    def skipped(self, i: int) -> set[str]:
        """Sublayers ("self_attn", "mlp") a depth method removed: sliced away without a refit or bias."""
        return set()

    def attention(self, i: int, hess: Callable[[], InputHessian]) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def mlp(self, i: int, hess: Callable[[], InputHessian]) -> list[int]:
        raise NotImplementedError


class FixedPlan(LayerChooser):
    """A plan made beforehand (any criterion and allocation, or a hand-edited plan)."""

    def __init__(self, plan: Plan):
        self.layers = {lp.index: lp for lp in plan.layers}

    def drop(self, i):
        return self.layers[i].drop

    def skipped(self, i):
        return set(getattr(self.layers[i], "skip", None) or ())

    def attention(self, i, hess):
        return self.layers[i].query_heads, self.layers[i].kv_heads

    def mlp(self, i, hess):
        return self.layers[i].mlp_channels


class ScoredUniform(LayerChooser):
    """A sequential criterion (wanda-sp) with uniform counts: layer i is scored on its current inputs, and `pick`
    (allocation.uniform_layer, passed in so that obs does not import the allocations that import it) keeps its
    strongest units."""

    needs_stats = True

    def __init__(self, criterion, adapter: DecoderAdapter, counts: list[tuple[int, int]], mode: str, pick):
        self.criterion, self.adapter, self.counts, self.mode, self.pick = criterion, adapter, counts, mode, pick
        self.current: LayerPlan | None = None

    def begin(self, i, stats):
        scores = self.criterion.score_layer(self.adapter, i, stats)
        self.current = self.pick(self.adapter, i, scores, self.counts[i], self.mode)

    def attention(self, i, hess):
        return self.current.query_heads, self.current.kv_heads

    def mlp(self, i, hess):
        return self.current.mlp_channels


class GreedyOBS(LayerChooser):
    """`--method obs`: the uniform counts, filled by greedy structured OBS on each module's input Hessian."""

    def __init__(
        self,
        adapter: DecoderAdapter,
        counts: list[tuple[int, int]],
        mode: str,
        *,
        bias: bool,
        damping: float = OBS_DAMPING,
    ):
        self.adapter, self.counts, self.mode, self.bias, self.damping = adapter, counts, mode, bias, damping

    def attention(self, i, hess):
        s = self.adapter.shape(i)
        n = self.counts[i][0]
        if n == 0:
            return list(range(s.num_heads)), list(range(s.num_kv_heads))
        return choose_attention(
            self.adapter.o_proj(i).weight,
            hess(),
            s.num_heads,
            s.num_kv_heads,
            self.adapter.head_dim,
            n,
            self.mode,
            bias=self.bias,
            damping=self.damping,
            what=f"layer {i} o_proj",
        )

    def mlp(self, i, hess):
        n_channels = self.adapter.shape(i).intermediate_size
        n = self.counts[i][1]
        if n == 0:
            return list(range(n_channels))
        return choose_channels(
            self.adapter.down_proj(i).weight,
            hess(),
            n,
            bias=self.bias,
            damping=self.damping,
            what=f"layer {i} down_proj",
        )


class _Stop(Exception):
    pass


@torch.inference_mode()
def record_inputs(layer: torch.nn.Module, module: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]):
    """`module`'s input, batch by batch, while `layer` runs on every batch (the layer stops there)."""
    inputs = []

    def hook(_m, args):
        inputs.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for h, kw in zip(hidden, kwargs):
            try:
                layer(h, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs


def hessian_of(inputs: list[torch.Tensor]) -> InputHessian:
    """H = Σ x xᵀ (float32), Σ x and N of a module's recorded inputs (`record_inputs`), batch by batch."""
    h = s = None
    n = 0
    for x in inputs:
        x = x.reshape(-1, x.shape[-1])
        xf = x.float()
        h = xf.T @ xf if h is None else h + xf.T @ xf
        s = x.double().sum(0) if s is None else s + x.double().sum(0)
        n += x.shape[0]
    return InputHessian(h, s, n)


@torch.inference_mode()
def record_mlp(
    adapter: DecoderAdapter,
    i: int,
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    attention: torch.nn.Module | None = None,
):
    """Run layer i (with `attention` standing in for its attention block) on every batch up to its down_proj: what
    the attention block returned and what down_proj gets. The refitted layer's outputs are then assembled from these
    (`_Replay`, `_DownProj`) instead of running the attention and the gate/up projections again."""
    attention_out = []
    with adapter.swapped(i, attention=attention):
        handle = adapter.attention(i).register_forward_hook(lambda _m, _args, out: attention_out.append(out))
        try:
            mlp_in = record_inputs(adapter.layers[i], adapter.down_proj(i), hidden, kwargs)
        finally:
            handle.remove()
    return attention_out, mlp_in


class _Replay(torch.nn.Module):
    """Stands in for a block whose outputs, batch by batch, are already known."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, *args, **kwargs):
        return next(self.outputs)


class _OProj(torch.nn.Module):
    """Stands in for an attention block whose o_proj inputs (before its heads were cut) are known: the kept heads'
    columns of each batch's recorded input through the (sliced, refitted) o_proj. Heads are independent, so a kept
    head's input to o_proj is the same before and after the others go."""

    def __init__(self, o_proj: torch.nn.Module, inputs: list[torch.Tensor], kept: torch.Tensor | None):
        super().__init__()
        self.o_proj, self.inputs, self.kept = o_proj, iter(inputs), kept

    def forward(self, hidden_states, *args, **kwargs):
        x = next(self.inputs)
        return self.o_proj(x if self.kept is None else x[..., self.kept.to(x.device)]), None


class _DownProj(torch.nn.Module):
    """Stands in for an MLP whose down_proj inputs (before slicing) are known: the kept channels of each batch's
    recorded input through the (sliced, refitted) down_proj."""

    def __init__(self, down_proj: torch.nn.Module, inputs: list[torch.Tensor], kept: torch.Tensor | None):
        super().__init__()
        self.down_proj, self.inputs, self.kept = down_proj, iter(inputs), kept

    def forward(self, hidden_states):
        x = next(self.inputs)
        return self.down_proj(x if self.kept is None else x[..., self.kept.to(x.device)])


def _write_columns(linear: torch.nn.Linear, kept: torch.Tensor, new: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight[:, kept.to(linear.weight.device)] = new.to(dtype=linear.weight.dtype, device=linear.weight.device)


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return (torch.tensor(sorted(heads), dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def reconstruct_layers(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    chooser: LayerChooser,
    *,
    batch_size: int = 8,
    bias: bool = False,
    damping: float = OBS_DAMPING,
    resume_key: str | None = None,
    progress: bool = True,
    source: LayerSource | None = None,
) -> tuple[list[LayerPlan], list[LayerStats] | None]:
    """Prune every layer in order, refitting the kept o_proj/down_proj columns (module docstring). Returns what each
    layer kept (a LayerPlan per layer, in the original indices) and, for a chooser that needs them, the statistics of
    every layer on its inputs. Dropped layers pass their inputs on; `surgery.finish` removes them afterwards.

    With `resume_key` (a fingerprint of everything the result depends on), every finished layer is checkpointed in
    the cache (its weights, its plan, the next layer's inputs), and a killed run continues after the last one.
    `source` says where the layers live between their turns (`runner.LayerSource`)."""
    from . import cache

    if adapter.has_experts():
        raise DomainpruneError(
            "--reconstruct obs refits dense heads and MLP channels; mixture-of-experts models are not supported, "
            "leave it out"
        )
    runner = LayerwiseRunner(model, adapter, sequences, batch_size)
    hidden, kwargs = runner.capture()
    layers: list[LayerPlan] = []
    stats_all: list[LayerStats] | None = [] if chooser.needs_stats else None
    folder = cache.entry("obs", resume_key) if resume_key else None
    start = 0
    point = load_resume(folder, batch_size, runner.device) if folder is not None else None
    if point is not None and _restore(adapter, folder, point[0], layers, stats_all):
        start, hidden = point
        log.info("obs reconstruction: resuming at layer %d (%s)", start, folder)
    resume = source.resume if source is not None else None  # a streamed walk's saved progress (streaming.py)
    if resume is not None and resume.start:  # the finished layers are the source's shards: only their plans here
        start, hidden = resume.start, resume.hidden(batch_size, runner.device)
        for tensors, meta in resume.records:
            layers.append(LayerPlan.model_validate(meta["plan"]))
            if stats_all is not None and not layers[-1].drop:
                stats_all.append({k.removeprefix("stats/"): v for k, v in tensors.items() if k.startswith("stats/")})
    for i in walk(adapter, source, start=start, desc="obs reconstruction", progress=progress):
        s = adapter.shape(i)
        biased = {"attention": False, "mlp": False}
        if chooser.drop(i):
            layers.append(
                LayerPlan(
                    index=i,
                    drop=True,
                    kv_heads=list(range(s.num_kv_heads)),
                    query_heads=list(range(s.num_heads)),
                    mlp_channels=list(range(s.intermediate_size)),
                )
            )
            _checkpoint(adapter, folder, i, layers[-1], biased, None, hidden, resume)
            continue
        stats = None
        if chooser.needs_stats:
            stats, _ = runner.layer_stats(i, hidden, kwargs[i])
            stats_all.append(stats)
            chooser.begin(i, stats)
        q_heads, kv_heads = list(range(s.num_heads)), list(range(s.num_kv_heads))
        attention = None  # a stand-in for the refitted attention, from its recorded o_proj inputs
        if not adapter.attention_removed(i):
            attn_in = record_inputs(adapter.layers[i], adapter.o_proj(i), hidden, kwargs[i])
            attn_hess = functools.cache(functools.partial(hessian_of, attn_in))  # only if the chooser asks
            q_heads, kv_heads = chooser.attention(i, attn_hess)
            if "self_attn" in chooser.skipped(i):
                adapter.slice_attention(i, q_heads, kv_heads)
            elif (len(q_heads), len(kv_heads)) != (s.num_heads, s.num_kv_heads):
                kept = _head_columns(q_heads, adapter.head_dim)
                new, b = refit(
                    adapter.o_proj(i).weight, attn_hess(), kept, bias=bias, damping=damping, what=f"layer {i} o_proj"
                )
                if kept.numel():
                    _write_columns(adapter.o_proj(i), kept, new)
                adapter.slice_attention(
                    i, q_heads, kv_heads, None if b is None else b.to(adapter.o_proj(i).weight.dtype)
                )
                biased["attention"] = b is not None
            if not adapter.attention_removed(i):  # each kept head's o_proj input is what it was before the cut
                unchanged = (len(q_heads), len(kv_heads)) == (s.num_heads, s.num_kv_heads)
                cols = None if unchanged else _head_columns(q_heads, adapter.head_dim)
                attention = _OProj(adapter.o_proj(i), attn_in, cols)
        channels = list(range(s.intermediate_size))
        stand_ins: dict = {}
        if attention is not None:
            stand_ins["attention"] = attention
        if adapter.has_dense_mlp(i):
            attention_out, mlp_in = record_mlp(adapter, i, hidden, kwargs[i], attention)
            mlp_hess = functools.cache(functools.partial(hessian_of, mlp_in))
            channels = chooser.mlp(i, mlp_hess)
            kept = None if len(channels) == s.intermediate_size else torch.tensor(sorted(channels), dtype=torch.long)
            if "mlp" in chooser.skipped(i):
                adapter.slice_mlp(i, channels)
            elif kept is not None:
                new, b = refit(
                    adapter.down_proj(i).weight,
                    mlp_hess(),
                    kept,
                    bias=bias,
                    damping=damping,
                    what=f"layer {i} down_proj",
                )
                if kept.numel():
                    _write_columns(adapter.down_proj(i), kept, new)
                adapter.slice_mlp(i, channels, None if b is None else b.to(adapter.down_proj(i).weight.dtype))
                biased["mlp"] = b is not None
            stand_ins["attention"] = _Replay(attention_out)
            if adapter.has_dense_mlp(i):
                stand_ins["mlp"] = _DownProj(adapter.down_proj(i), mlp_in, kept)
        layers.append(
            LayerPlan(index=i, kv_heads=sorted(kv_heads), query_heads=sorted(q_heads), mlp_channels=sorted(channels))
        )
        with adapter.swapped(i, **stand_ins):
            hidden = runner.outputs(i, hidden, kwargs[i])
        stand_ins.clear()
        _checkpoint(adapter, folder, i, layers[-1], biased, stats, hidden, resume)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)  # the result lives in the model now; the checkpoints served
    return layers, stats_all


def _checkpoint(adapter: DecoderAdapter, folder, i: int, lp: LayerPlan, biased: dict, stats, hidden, resume) -> None:
    """Layer i's weights, plan and statistics, then the next layer's inputs (the resume point), in the cache; or,
    streamed, its plan and statistics staged in the walk's `resume` (the source keeps its weights, as its shard)."""
    from . import cache

    if resume is not None:
        stats = {f"stats/{k}": v for k, v in (stats or {}).items()}
        resume.stage(i, tensors=stats, meta={"plan": lp.model_dump(mode="json"), "biased": biased}, hidden=hidden)
    if folder is None:
        return
    tensors = {f"weight/{k}": v for k, v in adapter.layers[i].state_dict().items()}
    tensors.update({f"stats/{k}": v for k, v in (stats or {}).items()})
    cache.save_tensors(folder / f"layer_{i:03d}.safetensors", tensors, {"plan": lp.model_dump(), "biased": biased})
    save_resume(folder, hidden, i + 1)
    faults.point(f"obs:{i}")


def _restore(adapter: DecoderAdapter, folder, start: int, layers: list[LayerPlan], stats_all: list | None) -> bool:
    """Put back the layers 0..start-1 a killed run finished (shapes, then the saved weights); False, changing nothing,
    when there is nothing usable (the checkpoint must be complete up to its resume point)."""
    from . import cache

    saved = [cache.load_tensors(folder / f"layer_{i:03d}.safetensors") for i in range(start)]
    if not start or any(entry is None for entry in saved):
        return False
    for i, (tensors, meta) in enumerate(saved):
        lp = LayerPlan.model_validate(meta["plan"])
        layers.append(lp)
        if stats_all is not None and not lp.drop:
            stats_all.append({k.removeprefix("stats/"): v for k, v in tensors.items() if k.startswith("stats/")})
        if lp.drop:
            continue
        s = adapter.shape(i)
        like = next(adapter.layers[i].parameters())
        zero = torch.zeros(adapter.hidden_size, dtype=like.dtype, device=like.device)  # overwritten by the saved bias
        if (len(lp.query_heads), len(lp.kv_heads)) != (s.num_heads, s.num_kv_heads):
            adapter.slice_attention(i, lp.query_heads, lp.kv_heads, zero if meta["biased"]["attention"] else None)
        if adapter.has_dense_mlp(i) and len(lp.mlp_channels) != s.intermediate_size:
            adapter.slice_mlp(i, lp.mlp_channels, zero if meta["biased"]["mlp"] else None)
        weights = {k.removeprefix("weight/"): v for k, v in tensors.items() if k.startswith("weight/")}
        layer = adapter.layers[i]
        reference = next(iter(layer.state_dict().values()))
        layer.load_state_dict({k: v.to(reference.device) for k, v in weights.items()}, strict=True)
    return True
