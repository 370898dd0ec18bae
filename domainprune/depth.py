"""Depth pruning (METHODS.md §6): remove whole decoder layers (ShortGPT) or attention/MLP sublayers (FinerCut).

Both methods spend a budget in attention+MLP parameters, the same budget width methods spend, and stop where the
removed parameters are closest to it at their granularity: walking candidates in the method's order, a candidate is
removed while removing it does not move the total further from the target than stopping would (ties remove; at
least one layer is kept). A whole layer of SmolLM2-135M is 3.3 % of attention+MLP parameters, so a depth-only run
lands within half a layer (or half a sublayer) of the budget; combined with a width method (`--depth`), the width
method removes the rest of the one budget, so the total is met to within one width unit — unless the depth part
alone overshoots it, in which case width removes nothing.

- **ShortGPT** (`shortgpt`): Block Influence BI_i = 1 − mean_tokens cos(h_i, h_{i+1}) of each layer's input and
  output hidden states on the calibration data (the layer-wise statistics pass, one forward through the model;
  cached and resumable like any statistics). The layers with the lowest BI are removed in one shot, no
  compensation. Layer outputs are taken directly, so the final norm HF applies to its last hidden state (a
  pitfall METHODS.md flags) never enters.
- **FinerCut** (`finercut`): the 2L sublayers are the candidates; a sublayer is removed by zeroing the output of
  its o_proj or down_proj (the residual stream stays). Greedy: at each step, every remaining candidate is removed
  on top of those already removed, and the Jensen–Shannon divergence between the dense and the candidate model's
  next-token distributions (nats per token, mean over positions; FinerCut's mean over vocabulary too differs by
  the constant 1/V, so the order is the same) is measured on `FINERCUT_SAMPLES` (10) of the calibration sequences,
  evenly spaced; the cheapest is removed for good. O(L²) forwards; each candidate only reruns the layers from its own
  onwards (the earlier layers' outputs for the current removals are computed once per step). Every candidate's
  divergence is cached on disk under the set of removals it was measured on, so an interrupted run resumes where it
  stopped, and a rerun with another budget reuses the steps the two share.

Width after depth: the output projections of removed layers/sublayers are zeroed in place, which gives exactly the
pruned model's activations (a layer whose attention and MLP add zero is the identity; Gemma's post-norms map zero
to zero) while every module keeps its shape, so width criteria, their statistics and their caches (keyed on the
weights) see the depth-pruned model unchanged; allocation counts the removed sublayers as spent (`frozen`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import cache
from .adapters import DecoderAdapter
from .errors import DomainpruneError
from .plan import LayerPlan, Plan

log = logging.getLogger(__name__)

SUBLAYERS = ("attention", "mlp")  # allocation's names for a layer's two sublayers
PLAN_NAMES = {"attention": "self_attn", "mlp": "mlp"}  # LayerPlan.skip / per_layer_config "skip" names
FROM_PLAN = {v: k for k, v in PLAN_NAMES.items()}
DEPTH_ALLOCATIONS = ("global", "uniform")  # width allocations that can spend the rest of a budget after depth
FINERCUT_SAMPLES = 10  # FinerCut's calibration: 10 sequences (of 256 tokens)
FINERCUT_VERSION = 1

Sublayer = tuple[int, str]  # (layer index, "attention" | "mlp")


@dataclass
class DepthRemoval:
    """What a depth method removed, in original layer indices."""

    method: str
    layers: list[int] = field(default_factory=list)  # whole layers (ShortGPT)
    sublayers: list[Sublayer] = field(default_factory=list)  # sublayers in removal order (FinerCut)
    removed_params: int = 0
    scores: dict = field(default_factory=dict)  # BI per layer, or the divergence of every greedy step

    def frozen(self) -> set[Sublayer]:
        """Every sublayer this removal takes, whole layers included: spent budget for width allocation."""
        return {(i, k) for i in self.layers for k in SUBLAYERS} | set(self.sublayers)

    def mark(self, plan: Plan, dense: Plan) -> Plan:
        """`plan` (a width plan or the dense plan) with this removal applied: dropped layers keep their dense lists
        and `drop: true`; removed sublayers have empty lists and are named in `skip`."""
        by_index = {lp.index: lp for lp in dense.layers}
        return plan.model_copy(update={"layers": [self.mark_layer(lp, by_index[lp.index]) for lp in plan.layers]})

    def mark_layer(self, lp: LayerPlan, dense_lp: LayerPlan) -> LayerPlan:
        if lp.index in self.layers:
            return dense_lp.model_copy(update={"drop": True})
        kinds = [k for k in SUBLAYERS if (lp.index, k) in self.sublayers]
        if not kinds:
            return lp
        update: dict = {"skip": [PLAN_NAMES[k] for k in kinds]}
        if "attention" in kinds:
            update.update(kv_heads=[], query_heads=[])
        if "mlp" in kinds:
            update.update(mlp_channels=[])
        return lp.model_copy(update=update)


def plan_frozen(plan: Plan) -> set[Sublayer]:
    """The sublayers a plan removes by depth: every sublayer of a dropped layer and those listed in `skip`."""
    out = set()
    for lp in plan.layers:
        kinds = SUBLAYERS if lp.drop else [FROM_PLAN[s] for s in lp.skip]
        out |= {(lp.index, k) for k in kinds}
    return out


def sublayer_cost(adapter: DecoderAdapter, i: int, kind: str) -> int:
    s = adapter.shape(i)
    return (
        adapter.attention_params(s.num_heads, s.num_kv_heads)
        if kind == "attention"
        else adapter.mlp_params(s.intermediate_size)
    )


def _output_projection(adapter: DecoderAdapter, i: int, kind: str) -> torch.nn.Module:
    return adapter.o_proj(i) if kind == "attention" else adapter.down_proj(i)


def _present(adapter: DecoderAdapter, i: int, kind: str) -> bool:
    return not adapter.attention_removed(i) if kind == "attention" else adapter.has_dense_mlp(i)


@torch.no_grad()
def zero_removed(adapter: DecoderAdapter, frozen: Iterable[Sublayer]) -> None:
    """Zero the output projections (weight and bias) of these sublayers in place: the model then computes exactly
    what the model with them removed computes, with every module's shape unchanged. Surgery removes them later."""
    for i, kind in sorted(frozen):
        if not _present(adapter, i, kind):
            continue
        proj = _output_projection(adapter, i, kind)
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


def _fits(cum: int, cost: int, target: float) -> bool:
    """Removing `cost` more does not leave the total further from the target than stopping at `cum` (ties remove)."""
    return cum + cost <= target or abs(cum + cost - target) <= abs(cum - target)


def check_depth_model(adapter: DecoderAdapter, method: str) -> None:
    if adapter.has_experts():
        raise DomainpruneError(
            f"depth method {method!r} is not supported on mixture-of-experts models; use an expert method "
            "(expert-frequency, easy-ep, tcess)"
        )


# ----- ShortGPT ----------------------------------------------------------------------------------------------


def block_influence(stats: list[dict]) -> list[float]:
    """BI_i = mean over tokens of 1 − cos(h_in, h_out) of layer i, from the layer-wise statistics."""
    return [float(s["block_cos_sum"]) / float(s["tokens"]) for s in stats]


def shortgpt(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    target: float,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> DepthRemoval:
    """Remove the layers of lowest Block Influence until the removed attention+MLP parameters are closest to
    `target` (at least one layer kept)."""
    from .stats import collect_statistics

    check_depth_model(adapter, "shortgpt")
    stats = collect_statistics(model, adapter, sequences, batch_size=batch_size, progress=progress)
    bi = block_influence(stats)
    removal = DepthRemoval("shortgpt", scores={"block_influence": [round(v, 8) for v in bi]})
    for i in sorted(range(adapter.num_layers), key=lambda i: (bi[i], i)):
        cost = adapter.layer_params(adapter.shape(i))
        if len(removal.layers) == adapter.num_layers - 1 or not _fits(removal.removed_params, cost, target):
            break
        removal.layers.append(i)
        removal.removed_params += cost
    removal.layers.sort()
    log.info("shortgpt: block influence %s; removing layers %s", [round(v, 4) for v in bi], removal.layers)
    return removal


# ----- FinerCut ----------------------------------------------------------------------------------------------


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-position Jensen–Shannon divergence (nats) of two log-distributions over the last dimension.

    log m = max(log p, log q) + log1p(expm1(−|log p − log q|)/2): stable, and exactly log p where the two agree,
    so identical distributions give exactly 0 even in float32 (which keeps a 49k vocabulary cheap)."""
    logm = torch.maximum(logp, logq) + torch.log1p(0.5 * torch.expm1(-(logp - logq).abs()))
    js = 0.5 * (logp.exp() * (logp - logm)).sum(-1) + 0.5 * (logq.exp() * (logq - logm)).sum(-1)
    return js.clamp_min(0)


@contextmanager
def _zeroed_outputs(adapter: DecoderAdapter, sublayers: Iterable[Sublayer]):
    """Forward hooks that zero the outputs of these sublayers' o_proj / down_proj."""
    handles = [
        _output_projection(adapter, i, k).register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
        for i, k in sublayers
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _prefix_from(adapter: DecoderAdapter, start: int, cached: list[torch.Tensor] | None):
    """Make layers 0..start-1 cost nothing: each passes its input through, and layer start-1 returns `cached`
    (its output for the current batch), so the model runs from layer `start` on with its own head."""
    if start == 0:
        yield
        return

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def last(hidden_states, *args, **kwargs):
        return cached[0]

    layers = [adapter.layers[j] for j in range(start)]
    for j, layer in enumerate(layers):
        layer.forward = last if j == start - 1 else passthrough
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class FinerCut:
    """Greedy sublayer removal by output divergence (see the module docstring); `run` returns the removal."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: DecoderAdapter,
        sequences: torch.Tensor,
        *,
        batch_size: int = 8,
        use_cache: bool = True,
        progress: bool = True,
    ):
        from .stats import model_fingerprint, tensor_fingerprint

        check_depth_model(adapter, "finercut")
        self.model, self.adapter, self.progress = model, adapter, progress
        self.device = next(model.parameters()).device
        pick = torch.linspace(0, len(sequences) - 1, min(FINERCUT_SAMPLES, len(sequences))).round().long()
        self.sequences = sequences[pick]  # evenly spaced over the calibration sequences
        self.batches = list(self.sequences.split(batch_size))
        self.candidates = [(i, k) for i in range(adapter.num_layers) for k in SUBLAYERS if _present(adapter, i, k)]
        self.cost = {c: sublayer_cost(adapter, *c) for c in self.candidates}
        key = cache.fingerprint(
            "finercut", FINERCUT_VERSION, model_fingerprint(model), tensor_fingerprint(self.sequences)
        )
        self.folder = cache.entry("finercut", key) if use_cache else None
        self.forwards = 0  # candidate forward passes actually run (cached ones are not)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids=batch.to(self.device), use_cache=False).logits.float(), -1)

    @torch.inference_mode()
    def _layer_outputs(self, removed: list[Sublayer]) -> list[list[torch.Tensor]]:
        """outputs[j][b]: layer j's output on batch b with `removed` zeroed (one forward per batch)."""
        outputs: list[list[torch.Tensor]] = [[] for _ in range(self.adapter.num_layers)]
        handles = [
            layer.register_forward_hook(
                lambda _m, _a, out, j=j: outputs[j].append(out[0] if isinstance(out, tuple) else out)
            )
            for j, layer in enumerate(self.adapter.layers)
        ]
        try:
            with _zeroed_outputs(self.adapter, removed):
                for batch in self.batches:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return outputs

    @torch.inference_mode()
    def _divergence(
        self, removed: list[Sublayer], cand: Sublayer, dense: list[torch.Tensor], outputs: list[list[torch.Tensor]]
    ) -> float:
        start = cand[0]
        total, count = 0.0, 0
        cached: list[torch.Tensor] = [None]  # type: ignore[list-item]
        with _zeroed_outputs(self.adapter, [*removed, cand]), _prefix_from(self.adapter, start, cached):
            for b, (batch, logp) in enumerate(zip(self.batches, dense)):
                if start:
                    cached[0] = outputs[start - 1][b]
                logq = self._forward(batch)
                for row_p, row_q in zip(logp, logq):  # one sequence at a time: vocabulary-sized temporaries
                    js = js_divergence(row_p, row_q)
                    total += float(js.double().sum())
                    count += js.numel()
        self.forwards += 1
        return total / count

    def _step_file(self, removed: list[Sublayer]):
        if self.folder is None:
            return None
        return self.folder / f"step_{cache.fingerprint(sorted(removed))}.json"

    @torch.inference_mode()
    def run(self, target: float) -> DepthRemoval:
        removal = DepthRemoval("finercut", scores={"steps": []})
        removed: list[Sublayer] = []
        dense = [self._forward(batch) for batch in self.batches]
        while True:
            remaining = [c for c in self.candidates if c not in removed]
            todo = [c for c in remaining if _fits(removal.removed_params, self.cost[c], target)]
            if not todo:
                break
            path = self._step_file(removed)
            known: dict[Sublayer, float] = {}
            if path is not None and (saved := cache.load_json(path)) is not None:
                known = {tuple(k): v for k, v in saved["divergence"]}
            missing = [c for c in todo if c not in known]
            if missing:
                outputs = self._layer_outputs(removed)
                desc = f"finercut step {len(removed) + 1}"
                for c in tqdm(missing, desc=desc, unit="candidate", disable=not self.progress, leave=False):
                    known[c] = self._divergence(removed, c, dense, outputs)
                    if path is not None:  # after every candidate: an interrupted step loses at most one forward
                        divergence = [(list(k), v) for k, v in known.items()]
                        cache.save_json(path, {"removed": sorted(removed), "divergence": divergence})
                del outputs
            best = min(todo, key=lambda c: (known[c], c))
            removed.append(best)
            removal.removed_params += self.cost[best]
            removal.scores["steps"].append(
                {"layer": best[0], "sublayer": PLAN_NAMES[best[1]], "js": round(known[best], 8)}
            )
            log.info(
                "finercut: removed layer %d %s (JS %.5f); %s attention+MLP parameters removed",
                best[0],
                PLAN_NAMES[best[1]],
                known[best],
                f"{removal.removed_params:,}",
            )
        removal.sublayers = removed
        # a layer whose attention and MLP are both gone is dropped outright (same function, and stock-loadable)
        both = sorted(
            i
            for i in {i for i, _ in removed}
            if all((i, k) in removed or not _present(self.adapter, i, k) for k in SUBLAYERS)
        )
        if len(both) < self.adapter.num_layers:
            removal.layers = both
            removal.sublayers = [c for c in removed if c[0] not in both]
        return removal


def finercut(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    target: float,
    *,
    batch_size: int = 8,
    use_cache: bool = True,
    progress: bool = True,
) -> DepthRemoval:
    return FinerCut(model, adapter, sequences, batch_size=batch_size, use_cache=use_cache, progress=progress).run(
        target
    )
