"""Calibration statistics, collected one decoder layer at a time.

One cheap forward pass records, for every layer, the keyword arguments the model hands it (masks, rotary
embeddings — per layer type for sliding-window models) and the embeddings that enter layer 0. Then each layer runs
on all calibration batches with hooks on the inputs of o_proj and down_proj, and its outputs become the next
layer's inputs. Only one layer's activations are live at a time beyond the residual stream itself.

Per layer the statistics are (float64):
- `attn_in_sum`, `attn_in_sqsum` over tokens of each o_proj input channel (heads × head_dim),
- `mlp_in_sum`, `mlp_in_sqsum` of each down_proj input channel,
- `qkv_in_sqsum`, `up_in_sqsum` of each q/k/v and gate/up input channel (the normed residual stream; OWL's
  outlier ratios score every linear of the block; hidden-channel pruning scores residual channels by them), and
  `moe_in_sqsum` of a mixture-of-experts block's input,
- `block_cos_sum`, `block_angle_sum`: Σ_tokens (1 − cos(h_in, h_out)) and Σ arccos(cos)/π of the layer,
- `tokens`,
- in mixture-of-experts layers, per routed expert: `expert_selected`, `expert_gate_sum`, `expert_easyep`,
  `expert_tcess_sum`, and per channel of each routed expert and of the shared expert `expert_in_sum`/`_sqsum`,
  `shared_in_sum`/`_sqsum` (collected by the adapter's `expert_hooks`; see `adapters.moe`).
They are cached per layer on disk; an interrupted run resumes from the last finished layer.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from . import cache, faults
from .adapters import DecoderAdapter
from .runner import LayerSource, walk

log = logging.getLogger(__name__)
STATS_VERSION = 4  # 3: per-expert channel statistics (expert_in_*, shared_in_*); 4: moe_in_sqsum
LayerStats = dict[str, torch.Tensor]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model: names, shapes, dtypes and a strided sample of every tensor's values."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 257)].float().cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def derived(stats: LayerStats) -> LayerStats:
    """Means, variances and L2 norms of the o_proj / down_proj input channels from the raw sums."""
    out = dict(stats)
    n = float(stats["tokens"])
    for key in ("attn_in", "mlp_in"):
        if f"{key}_sum" not in stats:
            continue
        mean = stats[f"{key}_sum"] / n
        out[f"{key}_mean"] = mean
        out[f"{key}_var"] = (stats[f"{key}_sqsum"] / n - mean**2).clamp_min(0)
        out[f"{key}_norm"] = stats[f"{key}_sqsum"].sqrt()
    return out


class _StopForward(Exception):
    """Raised by the last layer's recorder: the final norm and LM head are not needed for capture."""


class _Recorder:
    """Replaces each decoder layer's forward with one that records its keyword arguments and passes through."""

    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self.kwargs: list[list[dict]] = [[] for _ in range(adapter.num_layers)]
        self.inputs: list[torch.Tensor] = []

    def __enter__(self):
        for i, layer in enumerate(self.adapter.layers):
            layer.forward = self._make(i)
        return self

    def _make(self, i: int):
        def forward(hidden_states, *args, **kwargs):
            if args:  # every supported model passes everything but hidden_states by keyword
                raise RuntimeError("decoder layer called with positional arguments; adapter needs updating")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
            self.kwargs[i].append(kwargs)
            if i == 0:
                self.inputs.append(hidden_states)
            if i == self.adapter.num_layers - 1:
                raise _StopForward
            return hidden_states

        return forward

    def __exit__(self, *exc):
        for layer in self.adapter.layers:
            del layer.forward


class LayerwiseRunner:
    """Runs calibration batches through the model layer by layer (see module docstring)."""

    def __init__(self, model: torch.nn.Module, adapter: DecoderAdapter, sequences: torch.Tensor, batch_size: int = 8):
        self.model, self.adapter = model, adapter
        self.device = next(model.parameters()).device
        self.batches = list(sequences.split(batch_size))

    @torch.inference_mode()
    def capture(self) -> tuple[list[torch.Tensor], list[list[dict]]]:
        with _Recorder(self.adapter) as rec:
            for batch in self.batches:
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
        return rec.inputs, rec.kwargs

    @torch.inference_mode()
    def layer_stats(
        self, i: int, hidden: list[torch.Tensor], kwargs: list[dict]
    ) -> tuple[LayerStats, list[torch.Tensor]]:
        """Run layer i over every batch, returning its statistics and its outputs."""
        a = self.adapter
        acc: dict[str, torch.Tensor] = {}

        def accumulate(key: str, sums: bool = True):
            def hook(_module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                if sums:
                    acc[f"{key}_sum"] = acc.get(f"{key}_sum", 0) + x.sum(0)
                acc[f"{key}_sqsum"] = acc.get(f"{key}_sqsum", 0) + (x * x).sum(0)

            return hook

        handles = []
        if not a.attention_removed(i):
            handles.append(a.o_proj(i).register_forward_pre_hook(accumulate("attn_in")))
            handles.append(a.attention_in_projs(i)[0].register_forward_pre_hook(accumulate("qkv_in", sums=False)))
        if a.has_dense_mlp(i):
            handles.append(a.down_proj(i).register_forward_pre_hook(accumulate("mlp_in")))
            handles.append(a.mlp_in_projs(i)[0].register_forward_pre_hook(accumulate("up_in", sums=False)))
        elif not a.mlp_removed(i):  # a mixture-of-experts block: its input, the normed residual stream
            handles.append(a.mlp(i).register_forward_pre_hook(accumulate("moe_in", sums=False)))
        handles += a.expert_hooks(i, acc)
        outputs, cos_sum, angle_sum, tokens = [], 0.0, 0.0, 0
        try:
            for h, kw in zip(hidden, kwargs):
                out = a.layers[i](h, **kw)
                cos = torch.nn.functional.cosine_similarity(h.double(), out.double(), dim=-1).clamp(-1, 1)
                cos_sum += float((1 - cos).sum())
                angle_sum += float(torch.arccos(cos).sum() / math.pi)
                tokens += cos.numel()
                outputs.append(out)
        finally:
            for handle in handles:
                handle.remove()
        stats = {k: v.cpu() for k, v in acc.items()}
        stats.update(
            block_cos_sum=torch.tensor(cos_sum, dtype=torch.float64),
            block_angle_sum=torch.tensor(angle_sum, dtype=torch.float64),
            tokens=torch.tensor(tokens),
        )
        return stats, outputs

    @torch.inference_mode()
    def outputs(self, i: int, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
        return [self.adapter.layers[i](h, **kw) for h, kw in zip(hidden, kwargs)]


RESUME_FILE = "resume.safetensors"


def save_resume(folder: Path, hidden: list[torch.Tensor], next_layer: int) -> None:
    """Where a killed layer walk continues: the inputs of layer `next_layer`, all batches as one tensor."""
    inputs = {"hidden": torch.cat([h.cpu() for h in hidden])}
    cache.save_tensors(folder / RESUME_FILE, inputs, {"next_layer": next_layer})


def load_resume(folder: Path, batch_size: int, device: torch.device) -> tuple[int, list[torch.Tensor]] | None:
    """(next layer, its inputs in batches of `batch_size` on `device`) saved by `save_resume`, or None. The inputs are
    re-split for this run's batch size: a rerun after running out of memory often uses a smaller one."""
    state = cache.load_tensors(folder / RESUME_FILE)
    if state is None or not isinstance(state[1], dict):
        return None
    return int(state[1].get("next_layer", 0)), [h.to(device) for h in state[0]["hidden"].split(batch_size)]


def collect_statistics(
    model: torch.nn.Module,
    adapter: DecoderAdapter,
    sequences: torch.Tensor,
    *,
    batch_size: int = 8,
    after_layer: Callable[[int, LayerStats], bool] | None = None,
    use_cache: bool = True,
    progress: bool = True,
    source: LayerSource | None = None,
) -> list[LayerStats]:
    """Statistics of every layer on `sequences` (n, seq_len) of token ids.

    `after_layer(i, stats)` is called once layer i's statistics are known; if it returns True it has modified
    layer i (sequential pruning), and the layer's outputs are recomputed before layer i+1 sees them. Sequential
    runs depend on the callback, so they are not cached. `source` says where the layers live between their turns
    (`runner.LayerSource`; streamed layers are never cached either: their weights are not in memory to fingerprint).
    """
    sequential = after_layer is not None
    runner = LayerwiseRunner(model, adapter, sequences, batch_size)
    n_layers = adapter.num_layers
    use_cache = use_cache and not sequential and source is None
    folder: Path | None = None
    if use_cache:
        key = cache.fingerprint("stats", STATS_VERSION, model_fingerprint(model), tensor_fingerprint(sequences))
        folder = cache.entry("stats", key)

    def layer_file(i: int) -> Path:
        return folder / f"layer_{i:03d}.safetensors"

    def cached_layer(i: int) -> LayerStats | None:
        entry = cache.load_tensors(layer_file(i)) if use_cache else None
        return entry[0] if entry is not None else None

    done = []
    for i in range(n_layers):
        if (layer := cached_layer(i)) is None:
            break
        done.append(layer)
    if use_cache and len(done) == n_layers:
        log.info("statistics: cached (%s)", folder)
        return done

    start, stats_all, hidden, kwargs = 0, [], None, None
    point = load_resume(folder, batch_size, runner.device) if use_cache else None
    if point is not None and 0 < point[0] <= len(done):
        start, hidden = point
        stats_all = done[:start]
        log.info("statistics: resuming at layer %d", start)
    resume = source.resume if source is not None else None  # a streamed walk's saved progress (streaming.py)
    if resume is not None and resume.start:
        start, hidden = resume.start, resume.hidden(batch_size, runner.device)
        stats_all = [{k[6:]: v for k, v in t.items() if k.startswith("stats/")} for t, _ in resume.records]
    first_hidden, kwargs = runner.capture()
    hidden = hidden if hidden is not None else first_hidden
    for i in walk(adapter, source, start=start, desc="statistics", progress=progress):
        stats, outputs = runner.layer_stats(i, hidden, kwargs[i])
        stats_all.append(stats)
        if sequential and after_layer(i, stats):
            outputs = runner.outputs(i, hidden, kwargs[i])
        hidden = outputs
        if resume is not None:
            resume.stage(i, tensors={f"stats/{k}": v for k, v in stats.items()}, hidden=hidden)
        if use_cache:
            # after every layer: a killed run resumes here (the layer's inputs are one tensor write)
            cache.save_tensors(layer_file(i), stats)
            if i + 1 < n_layers:
                save_resume(folder, hidden, i + 1)
                faults.point(f"statistics:{i}")
    if use_cache:
        (folder / RESUME_FILE).unlink(missing_ok=True)
    return stats_all
