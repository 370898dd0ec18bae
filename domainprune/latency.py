"""Latency budgets (`--target-speedup`, ZipLM's idea): a table of measured block times on this machine, the
end-to-end time it predicts for any per-layer widths, and the sparsity whose allocation meets a speedup target.

The table is measured once per model *shape* (never its weights), dtype, device, torch/transformers version and
phase settings, and cached on disk (`latency/<key>/table.json` under the cache), so a second run is instant.

What is measured, with the model's own device and dtype, under `torch.inference_mode` (median of a few repeats after
a warm-up, synchronised on CUDA):

- **blocks**: one attention block at every count of kept KV groups (whole groups, query heads per group unchanged)
  and one MLP block at a grid of widths (every multiple of max(1, I // 32) channels, plus the full width). Each is a
  copy of a real layer's block cut by the adapter's own surgery (`slice_attention` / `slice_mlp` on a one-layer
  shell), called with the inputs that block received in a real forward pass of the model (captured by a hook), so no
  architecture knowledge lives here. A removed block (0 groups, 0 channels) costs 0 by definition.
- **phases**: `decode` is batch 1, one new token attending to a KV cache of `context` tokens (each timing replays
  a few consecutive decode steps on a cache the block itself filled); `prefill` is batch 1, `prefill_tokens`
  tokens in one forward.
- **the model around the blocks**: the dense model, and a *skeleton* of it (every attention and MLP block replaced
  by the adapter's removed block, weights shared, nothing copied) are timed exactly as `evaluate.throughput`
  measures a model: decode time per token is the difference of two `generate` runs of different lengths (so
  `generate`'s own per-token bookkeeping is included), prefill time is one cached forward that keeps only the last
  logits. The skeleton's time is `fixed` (embedding, norms, residual adds, LM head, decoding overhead); the blocks'
  isolated times are scaled by one factor per phase so that fixed + Σ blocks equals the measured dense time (a block
  timed alone runs with its weights hot in cache, faster than inside the model).

`predict` adds up fixed + Σ scaled block times, interpolating linearly between measured widths (a layer with fewer
query heads per group than the table's, from `--attention-unit query_head`, is read at its query-head count);
`solve_sparsity` bisects for the smallest attention+MLP sparsity whose allocation is predicted to be `target` times
faster than the dense model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import statistics
import time
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

LATENCY_VERSION = 1
PHASES = ("decode", "prefill")
MLP_GRID = 32  # MLP widths measured: every multiple of max(1, I // MLP_GRID) channels, plus the full width
DECODE_STEPS = 8  # consecutive decode steps replayed per decode timing of a block
DECODE_SHORT, DECODE_LONG = 8, 40  # generate lengths whose difference gives the model's per-token decode time
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
    scale: dict[str, float] = field(default_factory=dict)  # phase -> factor on the isolated block times (default 1)
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
        "latency", LATENCY_VERSION, model.config.model_type, shapes, str(param.dtype), attn, device_name(param.device),
        torch.__version__, transformers.__version__, context, prefill_tokens, repeats,
    )


def latency_table(model: nn.Module, *, context: int = 128, prefill_tokens: int = 256, repeats: int = 5, progress: bool = True, use_cache: bool = True) -> LatencyTable:
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


class _Shell(nn.Module):
    """A one-layer stand-in for the model, so the adapter's own surgery can cut a copied layer."""

    def __init__(self, config: Any, layer: nn.Module):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])


def _shared_memo(module: nn.Module) -> dict[int, Any]:
    """A deepcopy memo under which the module's parameters and buffers are shared, not copied (its module objects
    are copied, so the copy's structure can be changed without touching the original)."""
    return {id(t): t for t in [*module.parameters(), *module.buffers()]}


def _cut_block(adapter: DecoderAdapter, i: int, kind: str, width: int) -> nn.Module:
    """Layer i's attention block keeping its first `width` KV groups (all their query heads), or its MLP block keeping
    its first `width` channels: a copy of that block, cut by the adapter's surgery; the model is untouched."""
    other = adapter.mlp(i) if kind == "attention" else adapter.attention(i)
    layer = copy.deepcopy(adapter.layers[i], _shared_memo(other))  # only the block to cut is copied
    shell = type(adapter)(_Shell(adapter.config, layer))
    s = shell.shape(0)
    if kind == "attention":
        groups = list(range(width))
        heads = [g * s.group_size + h for g in groups for h in range(s.group_size)]
        if width != s.num_kv_heads:
            shell.slice_attention(0, heads, groups)
        return shell.attention(0)
    if width != s.intermediate_size:
        shell.slice_mlp(0, list(range(width)))
    return shell.mlp(0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with_cache(args: tuple, kwargs: dict, new: Any) -> tuple[tuple, dict]:
    """A captured call's arguments with every KV cache object replaced by `new`."""
    from transformers.cache_utils import Cache

    def swap(v):
        return new if isinstance(v, Cache) else v

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


class _Calls:
    """Captures every call (args, kwargs) to a module during the forward passes run inside the `with` block."""

    def __init__(self, module: nn.Module):
        self.module, self.calls = module, []

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda m, a, kw: self.calls.append((a, kw)), with_kwargs=True)
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def _time_block(block: nn.Module, calls: dict[str, Any], phase: str, device: torch.device, repeats: int, config: Any) -> float:
    """Median seconds of one call of `block` in `phase` (decode: per step, replayed on a cache the block filled,
    of the kind the model builds: sliding-window layers keep their window)."""
    from transformers import DynamicCache

    def once() -> float:
        if phase == "decode":
            kv = DynamicCache(config=config)
            fill = calls["fill"]
            if fill is not None:
                a, kw = _with_cache(*fill, kv)
                block(*a, **kw)
            steps = [_with_cache(a, kw, kv) for a, kw in calls["decode"]]
        else:
            steps = [_with_cache(a, kw, None) for a, kw in calls["prefill"]]
        _synchronize(device)
        start = time.perf_counter()
        for a, kw in steps:
            block(*a, **kw)
        _synchronize(device)
        return (time.perf_counter() - start) / len(steps)

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def _capture(model: nn.Module, module: nn.Module, context: int, prefill_tokens: int) -> dict[str, Any]:
    """The inputs `module` receives in a real forward pass: filling a cache of `context` tokens, DECODE_STEPS decode
    steps after it, and a prefill of `prefill_tokens` tokens (random tokens; their values do not change the time)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    with _Calls(module) as calls:
        out = model(input_ids=torch.randint(vocab, (1, context), generator=g).to(device), use_cache=True)
        kv = out.past_key_values
        for _ in range(DECODE_STEPS):
            model(input_ids=torch.randint(vocab, (1, 1), generator=g).to(device), past_key_values=kv, use_cache=True)
        n_decode = len(calls)
        model(input_ids=torch.randint(vocab, (1, prefill_tokens), generator=g).to(device), use_cache=False)
    if n_decode != DECODE_STEPS + 1 or len(calls) != n_decode + 1:
        raise DomainpruneError("latency table: a block was not called once per forward pass; this model cannot be timed block by block")
    return {"fill": calls[0], "decode": calls[1:n_decode], "prefill": calls[n_decode:]}


def _skeleton(model: nn.Module) -> nn.Module:
    """The model with every attention and MLP block removed by the adapter's surgery; all weights shared."""
    skeleton = copy.deepcopy(model, _shared_memo(model))
    adapter = get_adapter(skeleton)
    for i in range(adapter.num_layers):
        adapter.slice_attention(i, [], [])
        adapter.slice_mlp(i, [])
    return skeleton


def _model_seconds(model: nn.Module, context: int, prefill_tokens: int, repeats: int) -> dict[str, float]:
    """Seconds per decode step at about `context` tokens of cache, and per prefill, measured as
    `evaluate.throughput` measures them (decode: difference of two `generate` lengths)."""
    from .evaluate import throughput

    prompt = max(1, context - (DECODE_SHORT + DECODE_LONG) // 2)
    short = throughput(model, prompt_len=prompt, new_tokens=DECODE_SHORT, prefill_len=prefill_tokens, repeats=repeats)
    long = throughput(model, prompt_len=prompt, new_tokens=DECODE_LONG, prefill_len=prefill_tokens, repeats=repeats)
    step = (long["decode_s"] - short["decode_s"]) / (DECODE_LONG - DECODE_SHORT)
    if step <= 0:  # noise on a model too small to time: fall back to the long run's mean
        step = long["decode_s"] / DECODE_LONG
    return {"decode": step, "prefill": statistics.median([short["prefill_s"], long["prefill_s"]])}


def check_speedup_model(model: nn.Module) -> DecoderAdapter:
    """The model's adapter, or a one-line error for models the latency table cannot time."""
    adapter = get_adapter(model)
    if adapter.has_experts():
        raise DomainpruneError("--target-speedup times dense attention and MLP blocks; mixture-of-experts models are not supported yet")
    return adapter


@torch.inference_mode()
def measure_table(model: nn.Module, *, context: int = 128, prefill_tokens: int = 256, repeats: int = 5, progress: bool = True) -> LatencyTable:
    """Measure the latency table of `model` (see the module docstring). Needs one copy of one block at a time."""
    adapter = check_speedup_model(model)
    param = next(model.parameters())
    device = param.device
    shapes = adapter.shapes()
    n = adapter.num_layers
    ai = max(range(n), key=lambda i: (shapes[i].num_heads, shapes[i].num_kv_heads, -i))  # the widest blocks
    mi = max(range(n), key=lambda i: (shapes[i].intermediate_size, -i))
    a_shape, width = shapes[ai], shapes[mi].intermediate_size
    groups = list(range(1, a_shape.num_kv_heads + 1)) if a_shape.num_heads else []
    step = max(1, width // MLP_GRID)
    channels = sorted({*range(step, width, step), width}) if width else []
    jobs = [("attention", ai, k) for k in groups] + [("mlp", mi, c) for c in channels]

    a_calls = _capture(model, adapter.attention(ai), context, prefill_tokens) if groups else None
    m_calls = _capture(model, adapter.mlp(mi), context, prefill_tokens) if channels else None
    seconds: dict[tuple[str, int], dict[str, float]] = {}
    with tqdm(total=len(jobs) + 2, desc="latency table", unit="step", disable=not progress) as bar:
        for kind, i, w in jobs:
            block = _cut_block(adapter, i, kind, w)
            calls = a_calls if kind == "attention" else m_calls
            seconds[kind, w] = {phase: _time_block(block, calls, phase, device, repeats, model.config) for phase in PHASES}
            del block
            bar.update()
        dense = _model_seconds(model, context, prefill_tokens, max(3, repeats // 2))
        bar.update()
        skeleton = _skeleton(model)
        fixed = _model_seconds(skeleton, context, prefill_tokens, max(3, repeats // 2))
        del skeleton
        bar.update()
    table = LatencyTable(
        layers=[(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes],
        attention_widths=[0] + [k * a_shape.group_size for k in groups],
        attention_seconds={p: [0.0] + [seconds["attention", k][p] for k in groups] for p in PHASES},
        mlp_widths=[0] + channels,
        mlp_seconds={p: [0.0] + [seconds["mlp", c][p] for c in channels] for p in PHASES},
        fixed=fixed,
        dense=dense,
        context=context,
        prefill_tokens=prefill_tokens,
        device=device_name(device),
        dtype=str(param.dtype).removeprefix("torch."),
    )
    for p in PHASES:  # isolated blocks run hot in cache: scale them so that fixed + blocks = the dense model
        blocks = predict(table, table.dense_shapes(), p) - fixed[p]
        table.scale[p] = max(0.0, dense[p] - fixed[p]) / blocks if blocks > 0 else 0.0
    log.info(
        "latency table (%s, %s): decode %.2f ms/token (%.0f%% outside attention+MLP), prefill of %d tokens %.1f ms (%.0f%%)",
        table.device, table.dtype, 1e3 * dense["decode"], 100 * min(1, fixed["decode"] / dense["decode"]),
        prefill_tokens, 1e3 * dense["prefill"], 100 * min(1, fixed["prefill"] / dense["prefill"]),
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


def check_speedup_recipe(recipe, criterion) -> None:
    """One-line errors for recipes that combine --target-speedup with what it cannot go with (Recipe.resolved)."""
    if criterion.scores_experts:
        raise DomainpruneError(
            f"--target-speedup budgets attention and MLP widths; method {recipe.method!r} removes whole experts "
            "(--experts-keep): leave --target-speedup out"
        )
    if getattr(criterion, "depth", False):
        raise DomainpruneError(
            f"--target-speedup needs a width method, not the depth method {recipe.method!r}; give depth beside one, "
            f"e.g. --method flap --depth {recipe.method} --depth-sparsity 0.1"
        )
    if (recipe.allocation or criterion.default_allocation) == "search":
        raise DomainpruneError(
            "--target-speedup cannot be combined with --allocation search (it searches at one parameter budget); "
            "use uniform, global, nirvana-ratio, owl or cfsp"
        )
    if getattr(recipe, "hidden_sparsity", None):
        raise DomainpruneError("--target-speedup times blocks at the full hidden size; leave out --hidden-sparsity")


SPEEDUP_TOLERANCE = 0.05  # the measured speedup should be within 5 % of the target


def phase_speed(model: nn.Module, phase: str, prefill_tokens: int = 256, repeats: int = 3) -> float:
    """Tokens per second of `model` in `phase`, as `evaluate.throughput` measures it (decode: 128 new tokens after
    a 64-token prompt; prefill: `prefill_tokens` tokens), median of `repeats` runs after a warm-up."""
    from .evaluate import throughput

    if phase == "decode":
        return throughput(model, prefill_len=prefill_tokens, repeats=repeats)["decode_tokens_per_s"]
    return throughput(model, new_tokens=1, prefill_len=prefill_tokens, repeats=repeats)["prefill_tokens_per_s"]


def confirm_speedup(model: nn.Module, recipe, dense_speed: float) -> dict[str, Any]:
    """Measure the pruned `model` as its dense original was measured (`dense_speed`, tokens/s, same process) and
    compare the speedup with the recipe's target; logs whether it lies within 5 % of it."""
    measured = phase_speed(model, recipe.speedup_phase, recipe.prefill_tokens) / dense_speed
    off = measured / recipe.target_speedup - 1
    within = abs(off) <= SPEEDUP_TOLERANCE
    log.info(
        "speedup: measured %.3f× %s (target %.3f×, predicted %.3f×): %s", measured, recipe.speedup_phase,
        recipe.target_speedup, recipe.predicted_speedup or float("nan"),
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
