"""Latency budgets (`--target-speedup`, ZipLM's idea): a table of measured block times on this machine, the
end-to-end time it predicts for any per-layer widths, and the sparsity whose allocation meets a speedup target.

The table is measured once per model *shape* (never its weights), dtype, device, torch/transformers version and
phase settings, and cached on disk (`latency/<key>/table.json` under the cache), so a second run is instant.

What is measured, with the model's own device and dtype, as `evaluate.throughput` measures a model (decode: the
median time between two new tokens of batch-1 `generate` around a KV cache of about `context` tokens, so `generate`'s
own per-step work is in it; prefill: one forward of `prefill_tokens` tokens that keeps the last logits):

- **variants of the whole model**: the model with every layer's attention cut to k of its KV groups (whole groups,
  query heads per group unchanged), for every k below the full count; with every MLP cut to c channels, for every
  multiple of max(1, I // 16) below the full width, and 0; and with every attention and MLP block removed (its
  *skeleton*: embedding, norms, residual adds, LM head, decoding overhead). Each variant is a copy cut by the
  adapter's own surgery whose other weights are shared with the model, so no architecture knowledge lives here and
  the model is untouched.
- **paired with the dense model**: the dense model is timed right before and after every variant, and a variant's
  time is the median over `repeats` passes of its ratio to the mean of those two, times the dense model's median
  time. A shared machine's speed drifts on a scale of seconds (other tenants' memory traffic; decode is bound by
  memory bandwidth), and a pair sees the same drift.
- **per-layer block times** follow by difference: one attention block at k groups costs (T(attention at k) −
  T(attention removed)) / layers, one MLP block likewise, fitted non-decreasing in width (least squares). Blocks are
  thus timed *inside the model*, with every other layer's weights streaming through the same caches and memory as
  in real use; timed alone, a block's weights stay hot in the processor's cache and its time curve bends where they
  stop fitting, which no real model sees.

`predict` adds up the skeleton's time and each layer's block times (one factor per phase scales the blocks so that
the table predicts the dense model's measured time exactly; it is close to 1), interpolating linearly between
measured widths (a layer with fewer query heads per group than the table's, from `--attention-unit query_head`, is
read at its query-head count); `solve_sparsity` bisects for the smallest attention+MLP sparsity whose allocation is
predicted to be `target` times faster than the dense model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import cache
from .adapters import DecoderAdapter, get_adapter
from .adapters.base import LayerShape
from .errors import DomainpruneError

log = logging.getLogger(__name__)

LATENCY_VERSION = 4
PHASES = ("decode", "prefill")
MLP_GRID = 16  # MLP widths measured: every multiple of max(1, I // MLP_GRID) channels, plus the full width
DECODE_TOKENS = 24  # new tokens per timed `generate` of a table variant (the median gap between them is timed)
SOLVE_STEPS = 20


@dataclass
class LatencyTable:
    """Measured seconds of one attention and one MLP block at candidate widths, per phase, and of the rest of the
    model. `layers` are the measured model's (query heads, KV heads, MLP channels) per layer: the dense reference."""

    layers: list[tuple[int, int, int]]
    attention_widths: list[int]  # kept query heads (whole KV groups: 0, g, 2g, …, H), ascending
    attention_seconds: dict[str, list[float]]  # phase -> seconds of one attention block at each width
    mlp_widths: list[int]  # kept MLP channels, ascending (0 first)
    mlp_seconds: dict[str, list[float]]
    fixed: dict[str, float]  # phase -> seconds of everything outside the blocks (per decode step / per prefill)
    scale: dict[str, float] = field(default_factory=dict)  # phase -> factor on the summed block times (default 1)
    dense: dict[str, float] = field(default_factory=dict)  # phase -> measured dense model seconds (for the record)
    context: int = 128
    prefill_tokens: int = 256
    device: str = ""
    dtype: str = ""

    def attention(self, heads: int, phase: str) -> float:
        return 0.0 if heads <= 0 else _interp(heads, self.attention_widths, self._phase(self.attention_seconds, phase))

    def mlp(self, channels: int, phase: str) -> float:
        return 0.0 if channels <= 0 else _interp(channels, self.mlp_widths, self._phase(self.mlp_seconds, phase))

    def block_scale(self, phase: str) -> float:
        return self.scale.get(phase, 1.0)

    def dense_shapes(self) -> list[LayerShape]:
        return [LayerShape(*s) for s in self.layers]

    @staticmethod
    def _phase(values: dict[str, list[float]], phase: str) -> list[float]:
        if phase not in values:
            raise DomainpruneError(f"latency phase must be one of {', '.join(PHASES)}, not {phase!r}")
        return values[phase]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        return cls(**{**d, "layers": [tuple(s) for s in d["layers"]]})


def _interp(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise-linear through (xs, ys), extended past the last point along the last segment."""
    if len(xs) == 1:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    for k in range(1, len(xs)):
        if x <= xs[k] or k == len(xs) - 1:
            x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable")


def _shape_of(s: LayerShape | tuple | None) -> tuple[int, int] | None:
    if s is None:
        return None
    s = s if isinstance(s, LayerShape) else LayerShape(*s)
    return s.num_heads, s.intermediate_size


def predict(table: LatencyTable, shapes: list[LayerShape | None], phase: str = "decode") -> float:
    """Predicted seconds of one decode step (or one prefill) of a model with these per-layer widths; None is a
    dropped layer, which costs nothing (its norms stay in `fixed`: a small overestimate)."""
    blocks = 0.0
    for s in shapes:
        if (hq := _shape_of(s)) is not None:
            blocks += table.attention(hq[0], phase) + table.mlp(hq[1], phase)
    return table.fixed[phase] + table.block_scale(phase) * blocks


def predicted_speedup(table: LatencyTable, shapes: list[LayerShape | None], phase: str = "decode") -> float:
    """predict(dense) / predict(shapes): how many times faster the pruned model is predicted to run."""
    return predict(table, table.dense_shapes(), phase) / max(predict(table, shapes, phase), 1e-12)


def solve_sparsity(
    shapes_at: Callable[[float], list[LayerShape | None]],
    table: LatencyTable,
    target: float,
    phase: str = "decode",
    lo: float = 0.0,
    hi: float = 0.95,
    *,
    steps: int = SOLVE_STEPS,
    hint: str = "lower --target-speedup or add depth pruning (e.g. --depth shortgpt --depth-sparsity 0.2)",
) -> tuple[float, float]:
    """The smallest sparsity in [lo, hi] whose allocation (`shapes_at(sparsity)`, per-layer shapes) is predicted to
    run `target` times faster than the dense model, by bisection; returns (sparsity, predicted speedup).

    If `shapes_at(hi)` raises (an allocation that cannot reach that sparsity), `hi` is lowered until it does not.
    If even `hi` falls short of the target, raises a one-line DomainpruneError naming the best predicted speedup."""

    def speed(s: float) -> float:
        return predicted_speedup(table, shapes_at(s), phase)

    start = speed(lo)
    if start >= target:
        return lo, start
    reach = None
    for _ in range(30):
        try:
            reach = speed(hi)
            break
        except DomainpruneError:  # the allocation cannot reach `hi` (e.g. cfsp, MLP channels only): come down
            hi = lo + (hi - lo) * 0.9
    if reach is None or reach < target:
        raise DomainpruneError(
            f"--target-speedup {target:g}: pruning {hi:.0%} of attention+MLP is predicted to reach at most "
            f"{max(reach or start, start):.3f}× {phase} speed on this machine ({table.device}); {hint}"
        )
    top, best = hi, reach
    for _ in range(steps):  # invariant: speed(lo) < target <= speed(hi) = best
        mid = (lo + hi) / 2
        if (v := speed(mid)) >= target:
            hi, best = mid, v
        else:
            lo = mid
    tidy = math.ceil(hi * 1e4 - 1e-6) / 1e4  # a readable figure, if it still meets the target
    if hi < tidy <= top and (v := speed(tidy)) >= target:
        return tidy, v
    return hi, best


# ----- measurement ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model and the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def table_key(model: nn.Module, context: int, prefill_tokens: int, repeats: int) -> str:
    """What the table depends on: parameter names and shapes (not values), dtype, attention implementation,
    device, library versions and phase settings."""
    import transformers

    param = next(model.parameters())
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    attn = getattr(model.config, "_attn_implementation", None)
    return cache.fingerprint(
        "latency",
        LATENCY_VERSION,
        model.config.model_type,
        shapes,
        str(param.dtype),
        attn,
        device_name(param.device),
        torch.__version__,
        transformers.__version__,
        context,
        prefill_tokens,
        repeats,
    )


def latency_table(
    model: nn.Module,
    *,
    context: int = 128,
    prefill_tokens: int = 256,
    repeats: int = 3,
    progress: bool = True,
    use_cache: bool = True,
) -> LatencyTable:
    """The model's latency table on its device and dtype, from the cache when it was measured before."""
    for name, value in (("context", context), ("prefill_tokens", prefill_tokens), ("repeats", repeats)):
        if value < 1:
            raise DomainpruneError(f"latency table: {name} must be at least 1, got {value}")
    path = cache.entry("latency", table_key(model, context, prefill_tokens, repeats)) / "table.json"
    if use_cache and path.is_file():
        log.info("latency table: cached (%s)", path.parent)
        return LatencyTable.from_dict(json.loads(path.read_text()))
    table = measure_table(model, context=context, prefill_tokens=prefill_tokens, repeats=repeats, progress=progress)
    if use_cache:
        cache.atomic_write_bytes(path, (json.dumps(table.to_dict(), indent=1) + "\n").encode())
    return table


def _shared_memo(module: nn.Module) -> dict[int, Any]:
    """A deepcopy memo under which the module's parameters and buffers are shared, not copied (its module objects
    are copied, so the copy's structure can be changed without touching the original)."""
    return {id(t): t for t in [*module.parameters(), *module.buffers()]}


def _variant(model: nn.Module, kv_groups: int | None, channels: int | None) -> nn.Module:
    """The model with every layer's attention cut to its first `kv_groups` KV groups (all their query heads) and/or
    every MLP to its first `channels` channels (0: removed; None: kept whole), by the adapter's surgery on a copy
    whose other weights are shared with the model; the model is untouched."""
    variant = copy.deepcopy(model, _shared_memo(model))
    adapter = get_adapter(variant)
    for i in range(adapter.num_layers):
        s = adapter.shape(i)
        if kv_groups is not None and kv_groups != s.num_kv_heads:
            groups = list(range(kv_groups))
            adapter.slice_attention(i, [g * s.group_size + h for g in groups for h in range(s.group_size)], groups)
        if channels is not None and channels != s.intermediate_size:
            adapter.slice_mlp(i, list(range(channels)))
    return variant


def _nondecreasing(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit to `values` (pool adjacent violators). On the table's grid (aligned widths)
    a wider block is never faster; a measured dip is the machine's noise, amplified by the per-layer difference."""
    pools: list[tuple[float, int]] = []  # (mean, count) of runs of values fitted by one level
    for v in values:
        mean, count = v, 1
        while pools and pools[-1][0] > mean:
            m, c = pools.pop()
            mean, count = (m * c + mean * count) / (c + count), c + count
        pools.append((mean, count))
    return [m for m, c in pools for _ in range(c)]


def _model_seconds(model: nn.Module, context: int, prefill_tokens: int) -> dict[str, float]:
    """Seconds per decode step around a cache of about `context` tokens, and per prefill, as `evaluate.throughput`
    measures them: one `generate` (its median gap between new tokens is robust to a slow first step, so no warm-up
    run), then one prefill."""
    from .evaluate import throughput

    prompt = max(1, context - DECODE_TOKENS // 2)
    t = throughput(
        model, prompt_len=prompt, new_tokens=DECODE_TOKENS, prefill_len=prefill_tokens, repeats=1, warmup=False
    )
    return {"decode": t["decode_step_s"], "prefill": t["prefill_s"]}


SPEEDUP_BOUND_SLACK = 1.25  # measured speedups scatter; the bound must never refuse a reachable target


def check_speedup_model(model: nn.Module, target: float | None = None, depth: bool = False) -> DecoderAdapter:
    """The model's adapter, or a one-line error for models the latency table cannot time, or for a `target` that the
    parameter count already rules out (no pruning runs faster than its weights shrink, give or take timing noise,
    so nothing is measured for it)."""
    from .allocation import max_width_sparsity

    adapter = get_adapter(model)
    if adapter.has_experts():
        raise DomainpruneError(
            "--target-speedup times dense attention and MLP blocks; mixture-of-experts models are not supported yet"
        )
    if len(set(adapter.shapes())) > 1:
        raise DomainpruneError(
            "--target-speedup times every layer cut to the same width, so it needs a model whose layers all have one "
            "shape (a stock checkpoint); this one's layers differ (pruned before?): give --sparsity instead"
        )
    if target is not None:
        total = sum(p.numel() for p in model.parameters())
        attn_mlp = sum(adapter.layer_params(s) for s in adapter.shapes())
        removable = attn_mlp if depth else max_width_sparsity(adapter, "query_head") * attn_mlp
        bound = SPEEDUP_BOUND_SLACK * total / (total - removable)
        if target > bound:
            raise DomainpruneError(
                f"--target-speedup {target:g} is out of reach: even the smallest model pruning leaves "
                f"({int(total - removable):,} of {total:,} parameters) cannot run more than about {bound:.1f}× "
                "faster; lower the target"
            )
    return adapter


def table_from_seconds(
    seconds: dict[tuple[str, int], dict[str, float]], dense: dict[str, float], s: LayerShape, n: int, **fields: Any
) -> LatencyTable:
    """The table of an `n`-layer model of layer shape `s` from whole-model seconds per phase: `seconds[("skeleton",
    0)]` with every block removed, `seconds[("attention", k)]` with every attention cut to k KV groups (k below the
    full count), `seconds[("mlp", c)]` likewise for c MLP channels, and `dense`, the whole model."""
    groups = sorted(k for kind, k in seconds if kind == "attention")
    channels = sorted(c for kind, c in seconds if kind == "mlp")
    seconds = {**seconds, ("attention", s.num_kv_heads): dense, ("mlp", s.intermediate_size): dense}
    fixed = seconds["skeleton", 0]
    a_widths = [*groups, s.num_kv_heads] if groups else []
    m_widths = [*channels, s.intermediate_size] if channels else []

    def per_layer(kind: str, widths: list[int], p: str) -> list[float]:  # block time by difference, never decreasing
        return _nondecreasing([max(0.0, seconds[kind, w][p] - seconds[kind, widths[0]][p]) / n for w in widths])

    table = LatencyTable(
        layers=[(s.num_heads, s.num_kv_heads, s.intermediate_size)] * n,
        attention_widths=[k * s.group_size for k in a_widths],
        attention_seconds={p: per_layer("attention", a_widths, p) if a_widths else [] for p in PHASES},
        mlp_widths=m_widths,
        mlp_seconds={p: per_layer("mlp", m_widths, p) if m_widths else [] for p in PHASES},
        fixed=fixed,
        dense=dense,
        **fields,
    )
    for p in PHASES:  # blocks add up to the dense model's time, up to noise: scale them so that they do exactly
        blocks = predict(table, table.dense_shapes(), p) - fixed[p]
        table.scale[p] = max(0.0, dense[p] - fixed[p]) / blocks if blocks > 0 else 0.0
    return table


@torch.inference_mode()
def measure_table(
    model: nn.Module, *, context: int = 128, prefill_tokens: int = 256, repeats: int = 3, progress: bool = True
) -> LatencyTable:
    """Measure the latency table of `model` (see the module docstring). Needs one cut copy of the attention or MLP
    weights at a time beside the model."""
    adapter = check_speedup_model(model)
    param = next(model.parameters())
    s, n = adapter.shape(0), adapter.num_layers
    groups = list(range(s.num_kv_heads)) if s.num_heads else []  # attention variants below the full count
    step = max(1, s.intermediate_size // MLP_GRID)
    channels = [0, *range(step, s.intermediate_size, step)] if s.intermediate_size else []
    # (table key, KV groups kept, MLP channels kept) of every variant; None: that block whole
    jobs = (
        [(("skeleton", 0), 0, 0)]
        + [(("attention", k), k, None) for k in groups]
        + [(("mlp", c), None, c) for c in channels]
    )
    ratios: dict[tuple[str, int], list[dict[str, float]]] = {}
    dense_runs = []
    with tqdm(total=repeats * len(jobs), desc="latency table", unit="variant", disable=not progress) as bar:
        _model_seconds(model, context, prefill_tokens)  # warm-up
        for _ in range(repeats):  # whole passes over the variants, so a slow spell of the machine hits one run of many
            dense_runs.append(before := _model_seconds(model, context, prefill_tokens))
            for key, kv_groups, width in jobs:
                variant = _variant(model, kv_groups, width)
                t = _model_seconds(variant, context, prefill_tokens)
                del variant
                # the dense model, timed right before and after each variant, is its yardstick: the machine's speed
                # drifts (other tenants' memory traffic) on a scale of seconds, and both see the same drift
                dense_runs.append(after := _model_seconds(model, context, prefill_tokens))
                ratios.setdefault(key, []).append({p: 2 * t[p] / (before[p] + after[p]) for p in PHASES})
                before = after
                bar.update()
    dense = {p: statistics.median(r[p] for r in dense_runs) for p in PHASES}
    seconds = {key: {p: dense[p] * statistics.median(r[p] for r in rs) for p in PHASES} for key, rs in ratios.items()}
    table = table_from_seconds(
        seconds,
        dense,
        s,
        n,
        context=context,
        prefill_tokens=prefill_tokens,
        device=device_name(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
    )
    fixed = table.fixed
    log.info(
        "latency table (%s, %s): decode %.2f ms/token (%.0f%% outside attention+MLP), prefill of %d tokens %.1f ms "
        "(%.0f%%)",
        table.device,
        table.dtype,
        1e3 * dense["decode"],
        100 * min(1, fixed["decode"] / dense["decode"]),
        prefill_tokens,
        1e3 * dense["prefill"],
        100 * min(1, fixed["prefill"] / dense["prefill"]),
    )
    return table


def plan_shapes(plan) -> list[LayerShape | None]:
    """Per-layer widths a plan keeps (None: a dropped layer); sublayers removed by depth have width 0."""
    return [None if lp.drop else lp.shape() for lp in plan.layers]


def counts_shapes(adapter: DecoderAdapter, counts: list[tuple[int, int]], mode: str) -> list[LayerShape]:
    """Per-layer widths after removing `counts` = (attention units, MLP channels) per layer (`uniform_counts`)."""
    out = []
    for s, (a, c) in zip(adapter.shapes(), counts):
        if mode == "kv_group":
            kv = s.num_kv_heads - a
            heads = kv * s.group_size
        else:  # rank slices: one query head of every group each
            heads = s.num_heads - a * s.num_kv_heads
            kv = s.num_kv_heads if heads else 0
        out.append(LayerShape(heads, kv, s.intermediate_size - c))
    return out


SPEEDUP_TOLERANCE = 0.05  # the measured speedup should be within 5 % of the target


def phase_speed(model: nn.Module, phase: str, prefill_tokens: int = 256, repeats: int = 3) -> float:
    """Tokens per second of `model` in `phase`, as `evaluate.throughput` measures it (decode: 128 new tokens after
    a 64-token prompt; prefill: `prefill_tokens` tokens), median of `repeats` runs after a warm-up."""
    from .evaluate import throughput

    if phase == "decode":
        return throughput(model, prefill_len=prefill_tokens, repeats=repeats)["decode_tokens_per_s"]
    return throughput(model, new_tokens=2, prefill_len=prefill_tokens, repeats=repeats)["prefill_tokens_per_s"]


def confirm_speedup(model: nn.Module, recipe, dense_speed: float) -> dict[str, Any]:
    """Measure the pruned `model` as its dense original was measured (`dense_speed`, tokens/s, same process) and
    compare the speedup with the recipe's target; logs whether it lies within 5 % of it."""
    measured = phase_speed(model, recipe.speedup_phase, recipe.prefill_tokens) / dense_speed
    off = measured / recipe.target_speedup - 1
    within = abs(off) <= SPEEDUP_TOLERANCE
    log.info(
        "speedup: measured %.3f× %s (target %.3f×, predicted %.3f×): %s",
        measured,
        recipe.speedup_phase,
        recipe.target_speedup,
        recipe.predicted_speedup or float("nan"),
        "within 5 % of the target" if within else f"{100 * off:+.1f} % off the target (more than 5 %)",
    )
    return {
        "target": recipe.target_speedup,
        "phase": recipe.speedup_phase,
        "predicted": recipe.predicted_speedup,
        "measured": round(measured, 4),
        "sparsity": recipe.sparsity,
        "within_5_percent": within,
    }
