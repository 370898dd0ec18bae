"""Pruning a model larger than memory (`prune --offload cpu|disk`; docs/streaming.md).

`--offload disk` builds the model on the meta device (accelerate's `init_empty_weights`: shapes, no memory), reads
each decoder layer from the input checkpoint's safetensors shards (`safe_open`, one tensor at a time) for its turn in
the layer walk (`runner.walk`), and on the last pass writes the finished layer to the output as its own safetensors
shard and returns it to the meta device. Peak memory is therefore about one layer, the calibration activations and
the embedding. The LM head is never needed for planning: it is read once, at the end, to be written.

Passes. Methods whose decisions are per layer (a sequential criterion with uniform allocation, `--method obs`, OBS
reconstruction of a sequential criterion) prune in the one walk that scores them. Methods whose allocation needs
every layer's scores first (FLAP's global allocation, cfsp, owl, ...) walk twice: statistics and scores (while each
layer is loaded) in the first walk, then the allocation, then a second walk that cuts (and refits, with
`--reconstruct obs`) each layer and writes it. Both give the weights the in-memory path gives, bit for bit
(tests/test_streaming.py): the same layer code runs on the same inputs in the same order.

`--offload cpu` keeps the model in CPU memory and moves one layer at a time to the compute device (the GPU), with
the same passes; its export is the ordinary in-memory one.

Resuming (`--offload disk`): each walk keeps what its finished layers produced (statistics and scores; the written
shard, the layer's plan, the activations entering the next layer) in the run's cache entry (`WalkResume`), so a
rerun of a killed run continues at the first unfinished layer and writes the same weights.

Verification (`--offload disk`): a 32-token probe is carried through every finished layer during the last walk;
the written folder is then rebuilt on the meta device from its own config and streamed back, and the probe's logits
must match, so a config or shard that does not describe the weights fails before the folder is moved into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cache, faults
from .adapters import DecoderAdapter, get_adapter
from .errors import DomainpruneError
from .runner import CpuOffload, LayerSource, walk

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "none", "cpu", "disk")
# --offload auto: the model is kept whole on the device while its weights take at most this share of free memory
# (the rest holds the calibration activations, statistics and the export's verification)
FIT_FRACTION = 0.6
INDEX_FILE = "model.safetensors.index.json"
_ITEMSIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_BYTES = {**_ITEMSIZE, "F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class Checkpoint:
    """The tensors of a model folder's safetensors files: name -> file, each read on its own."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                self.files.update({name: file for name in f.keys()})
        if not self.files:
            raise DomainpruneError(
                f"{folder} has no *.safetensors weights; --offload disk streams safetensors shards "
                "(use --offload none for other formats)"
            )

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors, floating ones cast to `dtype`, on `device`; each file opened once and closed after."""
        from safetensors import safe_open

        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in group:
                    t = f.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes the checkpoint's tensors take in `dtype` (floating ones; others as stored)."""
        from safetensors import safe_open

        total = 0
        by_file = defaultdict(list)
        for name, file in self.files.items():
            by_file[file].append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    s = f.get_slice(name)
                    n = 1
                    for d in s.get_shape():
                        n *= d
                    kind = s.get_dtype()
                    total += n * (dtype.itemsize if kind in ("F64", "F32", "F16", "BF16") else _ITEMSIZE.get(kind, 8))
        return total


class ShardWriter:
    """Writes the output checkpoint one shard at a time (a decoder layer each, the rest last) into `folder` (the run's
    cache entry, so that a killed run keeps its finished layers), and at the end links them into the output with
    their index."""

    def __init__(self, folder: Path, shards: int):
        self.folder, self.shards = Path(folder), shards
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.shards:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        cache.atomic_write(self.folder / self.name(k), lambda tmp: save_file(tensors, str(tmp), {"format": "pt"}))
        self._register(k, {n: t.numel() * t.element_size() for n, t in tensors.items()})

    def shapes(self, k: int) -> dict[str, tuple[int, ...]] | None:
        """The tensor shapes of shard k as written by an earlier run, or None if it is missing or unreadable."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / self.name(k)), framework="pt") as f:
                return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        except Exception:  # noqa: BLE001 - missing or damaged: the layer is redone
            return None

    def adopt(self, k: int) -> None:
        """Count shard k, written by the run that was killed, as written."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.name(k)), framework="pt") as f:
            sizes = {}
            for n in f.keys():
                s = f.get_slice(n)
                sizes[n] = math.prod(s.get_shape()) * _BYTES[s.get_dtype()]
        self._register(k, sizes)

    def _register(self, k: int, sizes: dict[str, int]) -> None:
        for n, size in sizes.items():
            self.weight_map[n] = self.name(k)
            self.total += size

    def finish(self, out: Path) -> None:
        """Link (or, across file systems, copy) every shard into `out` and write the index there."""
        for name in sorted(set(self.weight_map.values())):
            try:
                os.link(self.folder / name, out / name)
            except OSError:
                shutil.copyfile(self.folder / name, out / name)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


STREAM_VERSION = 1  # of the cache entries below: a change in what they hold makes older entries unreadable


def stream_key(recipe, checkpoint: Checkpoint, sequences: torch.Tensor, dtype: torch.dtype, device) -> str:
    """The cache key of a streamed run's progress: the recipe, the input (each file's path, size and modification
    time) and the calibration tokens, in this dtype on this kind of device."""
    from .stats import STATS_VERSION, tensor_fingerprint

    files = sorted({*checkpoint.files.values(), checkpoint.folder / "config.json"})
    return cache.fingerprint(
        "stream",
        STREAM_VERSION,
        STATS_VERSION,
        recipe.model_dump(mode="json"),
        [cache.file_fingerprint(f) for f in files if f.is_file()],
        tensor_fingerprint(sequences),
        str(dtype),
        torch.device(device).type,
    )


class WalkResume:
    """One streamed layer walk's progress in the run's cache entry (docs/streaming.md, "Resuming"): a record per
    finished layer (tensors in safetensors, the rest as JSON in its header) and, after each, the resume point: the
    index of the next layer and the calibration activations entering it (plus what the source carries, the probe).

    The stage running the walk (statistics, OBS, the cut) reads `start`, `hidden()` and `records` before it begins and
    `stage`s what layer i produced in its loop body; the source `commit`s it after the layer's turn (after writing its
    shard), so a resume point never names a layer whose shard is not on disk. Every file is written to a temporary
    name and renamed; a missing, unreadable or inconsistent entry is not trusted: the walk starts again at layer 0.
    Without a folder (`--offload cpu`) nothing is kept."""

    RESUME_FILE = "resume.safetensors"

    def __init__(self, folder: Path | None, name: str, n_layers: int, activations: bool = True):
        self.folder = folder / name if folder is not None else None
        self.name, self.n_layers = name, n_layers
        self.activations = activations  # whether the walk carries them from layer to layer (the plain cut does not)
        self.start = 0
        self.records: list[tuple[dict[str, torch.Tensor], dict]] = []
        self.saved: dict[str, torch.Tensor] = {}  # the resume file's tensors: "hidden/<batch>", "carry/<name>"
        self._pending: tuple[dict, dict, list[torch.Tensor] | None] = ({}, {}, None)

    def open(self, has_layer=lambda i: True, carried: tuple[str, ...] = ()) -> None:
        """Read the resume point; keep it only if every record before it, `has_layer(i)` for each of those layers
        (their shards) and the tensors `carried` are there."""
        if self.folder is None:
            return
        state = cache.load_tensors(self.folder / self.RESUME_FILE)
        if state is None or not isinstance(state[1], dict):
            if (self.folder / self.RESUME_FILE).exists():
                log.warning("%s: the saved progress in %s is unreadable; starting at layer 0", self.name, self.folder)
            return
        k = int(state[1].get("next_layer", 0))
        hidden = self.activations and k < self.n_layers  # the last layer's outputs are needed by nobody
        ok = 0 < k <= self.n_layers and (any(n.startswith("hidden/") for n in state[0]) or not hidden)
        ok = ok and all(f"carry/{c}" in state[0] for c in carried)
        records = [cache.load_tensors(self._record(i)) for i in range(k)] if ok else []
        if not ok or any(r is None or not isinstance(r[1], dict) for r in records) or not all(map(has_layer, range(k))):
            log.warning("%s: the saved progress in %s is incomplete; starting at layer 0", self.name, self.folder)
            return
        self.start, self.records, self.saved = k, records, state[0]
        log.info("%s: resuming at layer %d/%d (%s)", self.name, k, self.n_layers, self.folder)

    def hidden(self, batch_size: int, device: torch.device) -> list[torch.Tensor] | None:
        """The calibration activations entering layer `start`, in the batches they were saved in (the batch size is
        part of the key); handed over, not kept here as well."""
        keys = sorted((n for n in self.saved if n.startswith("hidden/")), key=lambda n: int(n.split("/")[1]))
        return [self.saved.pop(n).to(device) for n in keys] or None

    def carried(self, name: str) -> torch.Tensor:
        return self.saved[f"carry/{name}"]

    def stage(self, i: int, tensors: dict | None = None, meta: dict | None = None, hidden=None) -> None:
        """What layer i's turn produced (called in the loop body, possibly several times: merged)."""
        if self.folder is None:
            return
        old_tensors, old_meta, old_hidden = self._pending
        self._pending = (
            {**old_tensors, **(tensors or {})},
            {**old_meta, **(meta or {})},
            hidden if hidden is not None else old_hidden,
        )

    def commit(self, i: int, carry: dict[str, torch.Tensor] | None = None) -> None:
        """Layer i is finished: its record, then the resume point at layer i+1 (called by the source)."""
        tensors, meta, hidden = self._pending
        self._pending = ({}, {}, None)
        if self.folder is None:
            return
        cache.save_tensors(self._record(i), tensors, {"layer": i, **meta})
        state = {f"carry/{k}": v for k, v in (carry or {}).items()}
        if self.activations and i + 1 < self.n_layers:
            if hidden is None:
                raise RuntimeError(f"{self.name}: layer {i} staged no activations for layer {i + 1}")
            state.update({f"hidden/{j}": h for j, h in enumerate(hidden)})
        # not copied: the activations saved after each layer are the largest thing in memory
        cache.save_tensors(self.folder / self.RESUME_FILE, state, {"next_layer": i + 1}, copy=False)
        faults.point(f"stream:{self.name}:{i}")

    def _record(self, i: int) -> Path:
        return self.folder / f"layer_{i:05d}.safetensors"


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def _unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{prefix}/"): v for k, v in tensors.items() if k.startswith(f"{prefix}/")}


def _materialize(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put real tensors in place of `module`'s meta parameters (names relative to `module`)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, value in tensors.items():
        set_module_tensor_to_device(module, name, value.device, value=value)


def _to_meta(module: nn.Module) -> None:
    """Drop `module`'s parameter memory, keeping their shapes and dtypes (buffers, e.g. rotary tables, stay)."""
    for sub in module.modules():
        for key, p in sub._parameters.items():
            if p is not None and p.device.type != "meta":
                sub._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def _release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere). Freed layer-sized
    blocks otherwise stay in the heap, fragmented, and resident memory grows by a fraction of a layer per turn
    (bench/results/scale.md: +1.2 GB over 64 turns of an 8B-shaped model without it)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def _param_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


def _read_in(model: nn.Module, names: list[str], checkpoint: Checkpoint, dtype, device) -> None:
    """Read the model's parameters `names` (full names; those already real, e.g. a tied LM head, are skipped)."""
    params = dict(model.named_parameters())
    wanted = [n for n in names if params[n].device.type == "meta"]
    missing = [n for n in wanted if n not in checkpoint.files]
    if missing:
        raise DomainpruneError(
            f"{checkpoint.folder}: no tensor {missing[0]}; it cannot be streamed: use --offload none"
        )
    _materialize(model, checkpoint.read(wanted, dtype, device))


class _Probe:
    """A short token sequence carried through every finished layer: the logits the written folder must reproduce."""

    def __init__(self, model: nn.Module, adapter: DecoderAdapter):
        from .export import VERIFY_TOKENS
        from .stats import LayerwiseRunner

        vocab = model.config.vocab_size
        self.ids = torch.arange(VERIFY_TOKENS).mul(7919).remainder(vocab)[None]
        hidden, self.kwargs = LayerwiseRunner(model, adapter, self.ids, 1).capture()
        self.hidden = hidden[0]

    @torch.inference_mode()
    def step(self, layer: nn.Module, i: int) -> None:
        self.hidden = layer(self.hidden, **self.kwargs[i][0])

    @torch.inference_mode()
    def logits(self, model: nn.Module) -> torch.Tensor:
        return model.lm_head(model.model.norm(self.hidden)).float().cpu()


class DiskStream(LayerSource):
    """Layers read from `checkpoint` for their turn (`--offload disk`). With `writer` set (the last walk), a finished
    layer is carried through the probe and written as its own shard before its memory is dropped."""

    name = "disk"

    def __init__(
        self,
        model: nn.Module,
        adapter: DecoderAdapter,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [names[id(layer)] + "." for layer in adapter.layers]
        self.writer: ShardWriter | None = None
        self.probe: _Probe | None = None
        self.folder: Path | None = None  # the run's cache entry: each walk's progress (`WalkResume`), the shards
        self.walks: list[dict[str, Any]] = []  # per walk: where it resumed, seconds of each layer's turn
        self.read_seconds = self.write_seconds = 0.0
        self._turn = 0.0
        for i, prefix in enumerate(self.prefixes):  # a checkpoint that does not match is refused before any work
            missing = [n for n in _param_names(adapter.layers[i]) if prefix + n not in checkpoint.files]
            if missing:
                raise DomainpruneError(
                    f"{checkpoint.folder}: no tensor {prefix + missing[0]} for layer {i}; its names "
                    "do not match the architecture, so it cannot be streamed: use --offload none"
                )

    def begin(self, name: str, n_layers: int, activations: bool = True) -> WalkResume:
        """A new walk; on the last one (with a writer) a layer counts as finished only with its shard on disk."""
        resume = WalkResume(self.folder, name, n_layers, activations)
        if self.writer is None:
            resume.open()
        else:
            probe = ("probe",) if self.probe is not None else ()
            resume.open(lambda i: self.writer.shapes(i) is not None, probe)
            for i in range(resume.start):
                self.writer.adopt(i)
            if self.probe is not None and resume.start:
                self.probe.hidden = resume.carried("probe").to(self.probe.hidden.device)
        self.resume = resume
        self.walks.append({"name": name, "resumed_at": resume.start, "turns": []})
        return resume

    def load(self, adapter, i):
        self._turn = time.perf_counter()
        if not self.walks:  # a walk without `begin` (the verification's): nothing to resume
            self.walks.append({"name": "walk", "resumed_at": 0, "turns": []})
        prefix = self.prefixes[i]
        names = _param_names(adapter.layers[i])
        tensors = self.checkpoint.read([prefix + n for n in names], self.dtype, self.device)
        _materialize(adapter.layers[i], {n: tensors[prefix + n] for n in names})
        self.read_seconds += time.perf_counter() - self._turn

    def release(self, adapter, i):
        layer = adapter.layers[i]
        carry = {}
        if self.writer is not None:
            if self.probe is not None:
                self.probe.step(layer, i)
                carry["probe"] = self.probe.hidden
            writing = time.perf_counter()
            self.writer.write(i, {self.prefixes[i] + k: v for k, v in layer.state_dict().items()})
            self.write_seconds += time.perf_counter() - writing
        if self.resume is not None:
            self.resume.commit(i, carry)
        _to_meta(layer)
        _release_freed_memory()
        self.walks[-1]["turns"].append(time.perf_counter() - self._turn)

    def reshape_finished(self, adapter: DecoderAdapter, plan) -> None:
        """Give the layers a killed run finished (their shards adopted, not recomputed) their pruned shapes on the meta
        device, as the cut gave the others: what `surgery.finish` and config.json read. A shard whose shapes the plan
        does not give is refused (and the progress removed), never trusted."""
        start = self.walks[-1]["resumed_at"] if self.walks else 0
        for i in range(start):
            layer = adapter.layers[i]
            shard = {n.removeprefix(self.prefixes[i]): shape for n, shape in (self.writer.shapes(i) or {}).items()}
            names = {id(m): n for n, m in layer.named_modules()}
            lp = plan.layers[i]
            s = adapter.shape(i)

            def added_bias(linear: nn.Module) -> torch.Tensor | None:
                has = f"{names[id(linear)]}.bias" in shard and linear.bias is None
                return torch.zeros(adapter.hidden_size, device="meta", dtype=self.dtype) if has else None

            if (len(lp.query_heads), len(lp.kv_heads)) != (s.num_heads, s.num_kv_heads):
                adapter.slice_attention(i, lp.query_heads, lp.kv_heads, added_bias(adapter.o_proj(i)))
            if len(lp.mlp_channels) != s.intermediate_size:
                adapter.slice_mlp(i, lp.mlp_channels, added_bias(adapter.down_proj(i)))
            _to_meta(layer)
            got = {n: tuple(p.shape) for n, p in layer.state_dict().items()}
            if got != shard:
                shutil.rmtree(self.folder, ignore_errors=True)
                raise DomainpruneError(
                    f"the saved layer {i} of an interrupted run does not match its plan; the saved progress was "
                    "removed: run the command again"
                )

    def summary(self) -> dict[str, Any]:
        walks = []
        for w in self.walks:
            t = w["turns"]
            entry = {"name": w["name"], "resumed_at": w["resumed_at"], "layers": len(t), "seconds": round(sum(t), 2)}
            if t:
                entry.update(mean_layer_seconds=round(sum(t) / len(t), 3), max_layer_seconds=round(max(t), 3))
            walks.append(entry)
        return {
            "walks": walks,
            "read_seconds": round(self.read_seconds, 2),
            "write_seconds": round(self.write_seconds, 2),
        }


def meta_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of `folder` on the meta device, in the shapes its config describes (per-layer widths included)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import adapter_class_for
    from .models import read_config

    raw = read_config(folder)
    per_layer = raw.pop("per_layer_config", {}) or {}
    raw.pop("allow_global_per_layer_attribute_access", None)
    extra = (raw.pop("domainprune", {}) or {}).get("extra_biases", [])
    config = AutoConfig.for_model(**raw) if per_layer or extra else AutoConfig.from_pretrained(folder)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) are real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if per_layer or extra:
        adapter_class_for(raw.get("model_type", "?"))(model).reshape_to(per_layer, extra)
    _tie(model)
    return model.eval()


def _tie(model: nn.Module) -> None:
    """A tied LM head is the embedding's parameter (again, after the embedding was replaced by a real tensor)."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _outside_layers(model: nn.Module, adapter: DecoderAdapter) -> list[str]:
    """Parameter names outside the decoder layers (embedding, final norm, LM head), a tied LM head once."""
    layer_params = {id(p) for layer in adapter.layers for p in layer.parameters()}
    return [n for n, p in model.named_parameters() if id(p) not in layer_params]


def _prepare(
    model: nn.Module, adapter: DecoderAdapter, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype
) -> None:
    """Buffers to the compute device, and the input embedding read in: what capturing layer 0's inputs needs."""
    layer_modules = {id(m) for layer in adapter.layers for m in layer.modules()}
    for module in model.modules():
        if id(module) in layer_modules:
            continue
        for key, b in module._buffers.items():
            if b is not None and b.device.type != "meta":
                module._buffers[key] = b.to(device)
    _read_in(model, [_full_name(model, model.get_input_embeddings()) + ".weight"], checkpoint, dtype, device)
    _tie(model)


def _full_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def unsupported(recipe, criterion, adapter: DecoderAdapter | None = None) -> str | None:
    """Why `recipe` cannot run one layer at a time (None if it can): what needs the whole model at once."""
    if criterion.needs_gradients:
        return f"method {recipe.method!r} back-propagates through the whole model"
    if criterion.scores_experts or (adapter is not None and adapter.has_experts()):
        return "mixture-of-experts checkpoints store experts in another layout than the model's fused tensors"
    if recipe.depth or criterion.depth:
        return "depth pruning scores whole layers against the model's output"
    if recipe.hidden_sparsity:
        return "hidden pruning slices every layer, the embedding and the LM head together"
    if recipe.allocation == "search":
        return "--allocation search evaluates the whole pruned model many times"
    if recipe.target_speedup is not None:
        return "--target-speedup times the whole model"
    if recipe.calib_candidates > 1:
        return "--calib-candidates compares whole pruned models"
    if recipe.vocab_coverage or recipe.vocab_size:
        return "vocabulary trimming measures the whole model; trim afterwards with `domainprune vocab`"
    return None


def check_streamable(recipe, offload: str, adapter: DecoderAdapter | None = None) -> None:
    from .criteria import get_criterion

    why = unsupported(recipe, get_criterion(recipe.method), adapter)
    if why:
        raise DomainpruneError(f"--offload {offload} prunes one layer at a time, and {why}: use --offload none")


def free_memory(device: torch.device) -> int:
    """Bytes free for the model on `device`: the GPU's free memory, or the available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def choose_offload(path: Path | str, recipe, device: torch.device, dtype: torch.dtype) -> str:
    """`--offload auto`: none when the weights fit the device, else cpu (a GPU, with room in RAM), else disk; none
    for what cannot stream (with a warning when it will not fit) and for hub ids (their size is unknown here)."""
    if not isinstance(path, Path):
        return "none"
    need = Checkpoint(path).nbytes(dtype)
    if need <= FIT_FRACTION * free_memory(device):
        return "none"
    cpu = torch.device("cpu")
    mode = "cpu" if device.type == "cuda" and need <= FIT_FRACTION * free_memory(cpu) else "disk"
    try:
        check_streamable(recipe, mode)
    except DomainpruneError as e:
        log.warning("the model (%.1f GB) may not fit in %s memory, but %s; loading it whole", need / 1e9, device, e)
        return "none"
    log.info("--offload auto: the model (%.1f GB) does not fit in %s memory; --offload %s", need / 1e9, device, mode)
    return mode


def prune_streamed(
    model: str,
    offload: str,
    *,
    out: str | Path | None,
    force: bool = False,
    verify: bool = True,
    progress: bool = True,
    **recipe_fields: Any,
):
    """`run.prune` one layer at a time (`offload` cpu or disk); see the module docstring."""
    from transformers import AutoTokenizer

    from .evaluate import parameter_count
    from .models import (
        DTYPES,
        LoadedModel,
        check_prunable,
        check_seq_len,
        is_domainprune_checkpoint,
        load_model,
        resolve_device,
        resolve_dtype,
        resolve_source,
    )
    from .outputs import check_output, local_inputs
    from .pipeline import PruneResult, budget, check_data, fit_default, make_recipe, peak_memory_bytes

    recipe = make_recipe(model=model, **recipe_fields)
    check_streamable(recipe, offload)
    if offload == "disk" and out is None:
        raise DomainpruneError("--offload disk writes each layer as it is finished: give --out")
    if out is not None:
        check_output(out, force=force, inputs=local_inputs(model, recipe.data, recipe.general_data))
    check_prunable(recipe.model)
    check_data(recipe)
    path = resolve_source(recipe.model)
    if not isinstance(path, Path):
        raise DomainpruneError(
            f"--offload {offload} reads a local model folder; download {model!r} first (e.g. "
            "`huggingface-cli download`) and give its folder"
        )
    if is_domainprune_checkpoint(path):
        raise DomainpruneError(
            f"{path} is a domainprune checkpoint with per-layer widths; prune it with --offload none"
        )
    started = time.perf_counter()
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, device)
    if offload == "disk":
        checkpoint = Checkpoint(path)
        net = meta_model(path, dtype)
        adapter = get_adapter(net)
        source: LayerSource = DiskStream(net, adapter, checkpoint, device, dtype)
        _prepare(net, adapter, checkpoint, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        loaded = load_model(path, dtype={v: k for k, v in DTYPES.items()}[dtype], device="cpu")
        net, tokenizer = loaded.model, loaded.tokenizer
        adapter = get_adapter(net)
        for child in adapter.decoder.children():  # all but the layers (and the unused LM head) computes there
            if child is not adapter.layers:
                child.to(device)
        source = CpuOffload(device)
    check_streamable(recipe, offload, adapter)
    loaded = LoadedModel(net, tokenizer, path, model)
    recipe = fit_default(recipe, loaded)
    check_streamable(recipe, offload, adapter)  # the default recipe may have fallen back to another method
    check_seq_len(net, recipe.seq_len)
    total_before = parameter_count(net)
    wanted = budget(recipe, adapter, total_before)

    def plan_and_cut():
        return _plan_and_cut(loaded, adapter, recipe, source, wanted, total_before, progress)

    if offload == "disk":
        from .runfolder import run_folder

        with run_folder(out, force=force) as folder:
            tmp = folder.path
            source.probe = _Probe(net, adapter) if verify else None
            plan, recipe = plan_and_cut()
            source.reshape_finished(adapter, plan)
            _write_rest(net, adapter, checkpoint, source.writer, plan, bool(recipe.bias_compensation), dtype, device)
            source.writer.finish(tmp)
            report = _report(recipe, plan, wanted, parameter_count(net), started, device, adapter, offload)
            plan.params.total_after = report["total_params"][1]
            folder.write_config(net)
            folder.write_generation_config(net)
            folder.write_tokenizer(tokenizer)
            folder.write_files(_side_files(plan, recipe, report))
            report["stream"] = source.summary()
            if verify:
                verifying = time.perf_counter()
                try:
                    diff = _verify(net, source.probe, tmp, device, dtype, progress)
                except DomainpruneError:  # whatever was wrong, the saved progress is not reused
                    shutil.rmtree(source.folder, ignore_errors=True)
                    raise
                log.info("export verified: max logit difference after streaming the output back %.2e", diff)
                seconds = round(time.perf_counter() - verifying, 2)
                report["stream"].update(verify_max_logit_diff=diff, verify_seconds=seconds)
            report["peak_memory_bytes"] = peak_memory_bytes(device)
            folder.write_json("report.json", report)
        shutil.rmtree(source.folder, ignore_errors=True)  # the output holds the result now; the progress served
        return PruneResult(None, tokenizer, plan, recipe, out=Path(out), report=report)
    plan, recipe = plan_and_cut()
    net.to("cpu")
    from .surgery import finish

    finish(adapter, plan, bool(recipe.bias_compensation))
    report = _report(recipe, plan, wanted, parameter_count(net), started, device, adapter, offload)
    plan.params.total_after = report["total_params"][1]
    result = PruneResult(net, tokenizer, plan, recipe, report=report)
    if out is not None:
        from .runfolder import save_pruned

        result.out = save_pruned(
            net, tokenizer, out, extra_files=_side_files(plan, recipe, report), force=force, verify=verify
        )
    return result


def _plan_and_cut(
    loaded,
    adapter: DecoderAdapter,
    recipe,
    source: LayerSource,
    wanted,
    total_before: int,
    progress: bool,
):
    """What `pipeline._make_plan_once` and `apply` do, as one or two layer walks through `source`; with `--offload disk`
    the last walk writes every finished layer as a shard, and each walk keeps its progress in the run's cache entry,
    so that a killed run resumes at its first unfinished layer (`WalkResume`). Returns (plan, recipe); the layers are
    cut, `surgery.finish` not run."""
    from .allocation import OWL_RATIO_KEY, allocation_needs_statistics, outlier_ratio, uniform_layer
    from .criteria import get_criterion
    from .criteria.base import LayerScores
    from .pipeline import (
        calibration_sequences,
        check_budget,
        check_reachable,
        layer_chooser,
        plan_from_scores,
        target_sparsity,
        uniform_plan_counts,
    )
    from .plan import LayerPlan, dense_plan
    from .stats import collect_statistics, derived
    from .surgery import prune_layer

    torch.manual_seed(recipe.seed)
    criterion = get_criterion(recipe.method)
    sparsity = target_sparsity(recipe, adapter, total_before)
    check_reachable(recipe, adapter, criterion, sparsity, total_before)
    dense = dense_plan(adapter, loaded.source)
    sequences = calibration_sequences(recipe, loaded.tokenizer)
    bias = bool(recipe.bias_compensation)
    n = adapter.num_layers
    disk = isinstance(source, DiskStream)
    if disk:
        key = stream_key(recipe, source.checkpoint, sequences, source.dtype, source.device)
        source.folder = cache.entry("stream", key)

    def begin(name: str, last: bool, activations: bool = True) -> WalkResume:
        if not disk:
            return WalkResume(None, name, n)
        if last:
            source.writer = ShardWriter(source.folder / "shards", n + 1)
        return source.begin(name, n, activations)

    if criterion.sequential and recipe.allocation == "uniform":  # one walk: each layer scored on its current inputs
        counts = uniform_plan_counts(recipe, adapter, sparsity)
        resume = begin("cut", last=True)
        if recipe.reconstruct:
            from .obs import reconstruct_layers

            layers, _ = reconstruct_layers(
                loaded.model,
                adapter,
                sequences,
                layer_chooser(recipe, criterion, adapter, counts),
                batch_size=recipe.batch_size,
                bias=bias,
                progress=progress,
                source=source,
            )
        else:
            layers = [LayerPlan.model_validate(meta["plan"]) for _, meta in resume.records]

            def after_layer(i: int, layer_stats: dict) -> bool:
                scores = criterion.score_layer(adapter, i, layer_stats)
                lp = uniform_layer(adapter, i, scores, counts[i], recipe.attention_unit)
                layers.append(lp)
                prune_layer(adapter, lp, derived(layer_stats) if bias else None)
                resume.stage(i, meta={"plan": lp.model_dump(mode="json")})
                return True

            collect_statistics(
                loaded.model,
                adapter,
                sequences,
                batch_size=recipe.batch_size,
                after_layer=after_layer,
                progress=progress,
                source=source,
            )
        plan = dense.model_copy(update={"layers": layers})
        plan.params = plan.count_params(adapter, total_before)
    else:  # two walks: statistics and scores of every layer, the allocation, then the cuts
        need_stats = criterion.needs_statistics or bias or allocation_needs_statistics(recipe.allocation)
        resume = begin("statistics", last=False)
        scores = [LayerScores(**_unprefixed(tensors, "score")) for tensors, _ in resume.records]

        def score(i: int, layer_stats: dict) -> bool:
            scores.append(criterion.score_layer(adapter, i, layer_stats if need_stats else None))
            if recipe.allocation == "owl":  # it reads the weights too: while they are here
                layer_stats[OWL_RATIO_KEY] = torch.tensor(outlier_ratio(adapter, i, layer_stats), dtype=torch.float64)
            kept = {f.name: getattr(scores[-1], f.name) for f in dataclasses.fields(LayerScores)}
            resume.stage(i, tensors=_prefixed({k: v for k, v in kept.items() if v is not None}, "score"))
            return False

        stats = collect_statistics(
            loaded.model,
            adapter,
            sequences,
            batch_size=recipe.batch_size,
            after_layer=score,
            progress=progress,
            source=source,
        )
        plan = plan_from_scores(recipe, criterion, adapter, dense, scores, sparsity, stats if need_stats else None)
        plan.params = plan.count_params(adapter, total_before)
        check_budget(recipe, plan, wanted)
        resume = begin("cut", last=True, activations=bool(recipe.reconstruct))
        if recipe.reconstruct:
            from .obs import FixedPlan, reconstruct_layers

            reconstruct_layers(
                loaded.model,
                adapter,
                sequences,
                FixedPlan(plan),
                batch_size=recipe.batch_size,
                bias=bias,
                progress=progress,
                source=source,
            )
        else:
            means = [derived(s) for s in stats] if bias else None
            for i in walk(adapter, source, start=resume.start, desc="pruning", progress=progress):
                prune_layer(adapter, plan.layers[i], means[i] if means is not None else None)
    check_budget(recipe, plan, wanted)
    return plan.model_copy(update={"recipe": recipe.model_dump()}), recipe


def _report(recipe, plan, wanted, total_after: int, started: float, device: torch.device, adapter, offload: str):
    from .pipeline import prune_report

    return {**prune_report(recipe, plan, wanted, total_after, started, device, adapter), "offload": offload}


def _side_files(plan, recipe, report) -> dict[str, str]:
    from .stages import recipe_files

    return {
        "plan.json": plan.model_dump_json(indent=1) + "\n",
        **recipe_files(recipe),
        "report.json": json.dumps(report, indent=1) + "\n",
    }


def _write_rest(net, adapter, checkpoint, writer: ShardWriter, plan, compensated: bool, dtype, device) -> None:
    """After the last layer: `surgery.finish` on the meta model (zero biases it adds are written here), then the
    embedding, final norm and LM head, read from the input, as the last shard."""
    from .surgery import finish

    before = {n for n, _ in net.named_parameters()}
    finish(adapter, plan, compensated)
    tensors = {}
    for name, p in net.named_parameters():
        if name not in before:  # ensure_output_biases: zeros where a layer had no bias of the set
            tensors[name] = torch.zeros(p.shape, dtype=p.dtype)
    outside = _outside_layers(net, adapter)
    _read_in(net, outside, checkpoint, dtype, device)
    params = dict(net.named_parameters())
    tensors.update({name: params[name] for name in outside})
    writer.write(writer.shards - 1, tensors)


def _verify(net, probe: _Probe, folder: Path, device: torch.device, dtype: torch.dtype, progress: bool) -> float:
    """Stream the written folder back through the probe; its logits must match those of the finished layers."""
    reference = probe.logits(net)
    _to_meta(net)
    written = meta_model(folder, dtype)
    adapter = get_adapter(written)
    checkpoint = Checkpoint(folder)
    source = DiskStream(written, adapter, checkpoint, device, dtype)
    _prepare(written, adapter, checkpoint, device, dtype)
    replay = _Probe(written, adapter)
    for i in walk(adapter, source, desc="verifying", progress=progress):
        replay.step(adapter.layers[i], i)
    _read_in(written, _outside_layers(written, adapter), checkpoint, dtype, device)
    got = replay.logits(written)
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    if not diff <= atol * max(1.0, float(reference.abs().max())):
        raise DomainpruneError(
            f"export verification failed: the written layers' logits differ by {diff:.3g}; nothing was written"
        )
    return diff
