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

Verification (`--offload disk`): a 32-token probe is carried through every finished layer during the last walk;
the written folder is then rebuilt on the meta device from its own config and streamed back, and the probe's logits
must match, so a config or shard that does not describe the weights fails before the folder is moved into place.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import faults
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
    """Writes the output checkpoint one shard at a time (a decoder layer each, the rest last) and its index."""

    def __init__(self, folder: Path, shards: int):
        self.folder, self.shards = Path(folder), shards
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = f"model-{k + 1:05d}-of-{self.shards:05d}.safetensors"
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total += t.numel() * t.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


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
        self.walks: list[list[float]] = []  # seconds of each layer's turn, per walk (report.json "stream")
        self.read_seconds = self.write_seconds = 0.0
        self._turn = 0.0
        for i, prefix in enumerate(self.prefixes):  # a checkpoint that does not match is refused before any work
            missing = [n for n in _param_names(adapter.layers[i]) if prefix + n not in checkpoint.files]
            if missing:
                raise DomainpruneError(
                    f"{checkpoint.folder}: no tensor {prefix + missing[0]} for layer {i}; its names "
                    "do not match the architecture, so it cannot be streamed: use --offload none"
                )

    def load(self, adapter, i):
        self._turn = time.perf_counter()
        if i == 0:
            self.walks.append([])
        prefix = self.prefixes[i]
        names = _param_names(adapter.layers[i])
        tensors = self.checkpoint.read([prefix + n for n in names], self.dtype, self.device)
        _materialize(adapter.layers[i], {n: tensors[prefix + n] for n in names})
        self.read_seconds += time.perf_counter() - self._turn

    def release(self, adapter, i):
        layer = adapter.layers[i]
        if self.writer is not None:
            if self.probe is not None:
                self.probe.step(layer, i)
            writing = time.perf_counter()
            self.writer.write(i, {self.prefixes[i] + k: v for k, v in layer.state_dict().items()})
            self.write_seconds += time.perf_counter() - writing
            faults.point(f"stream:{i}")
        _to_meta(layer)
        _release_freed_memory()
        self.walks[-1].append(time.perf_counter() - self._turn)

    def summary(self) -> dict[str, Any]:
        return {
            "walks": [
                {
                    "layers": len(w),
                    "seconds": round(sum(w), 2),
                    "mean_layer_seconds": round(sum(w) / len(w), 3),
                    "max_layer_seconds": round(max(w), 3),
                }
                for w in self.walks
                if w
            ],
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

    def plan_and_cut(writer: ShardWriter | None):
        return _plan_and_cut(loaded, adapter, recipe, source, wanted, total_before, writer, progress)

    if offload == "disk":
        from .runfolder import run_folder

        with run_folder(out, force=force) as folder:
            tmp = folder.path
            writer = ShardWriter(tmp, adapter.num_layers + 1)
            source.probe = _Probe(net, adapter) if verify else None
            plan, recipe = plan_and_cut(writer)
            _write_rest(net, adapter, checkpoint, writer, plan, bool(recipe.bias_compensation), dtype, device)
            report = _report(recipe, plan, wanted, parameter_count(net), started, device, adapter, offload)
            plan.params.total_after = report["total_params"][1]
            folder.write_config(net)
            folder.write_generation_config(net)
            folder.write_tokenizer(tokenizer)
            folder.write_files(_side_files(plan, recipe, report))
            report["stream"] = source.summary()
            if verify:
                verifying = time.perf_counter()
                diff = _verify(net, source.probe, tmp, device, dtype, progress)
                log.info("export verified: max logit difference after streaming the output back %.2e", diff)
                seconds = round(time.perf_counter() - verifying, 2)
                report["stream"].update(verify_max_logit_diff=diff, verify_seconds=seconds)
            report["peak_memory_bytes"] = peak_memory_bytes(device)
            folder.write_json("report.json", report)
        return PruneResult(None, tokenizer, plan, recipe, out=Path(out), report=report)
    plan, recipe = plan_and_cut(None)
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
    writer: ShardWriter | None,
    progress: bool,
):
    """What `pipeline._make_plan_once` and `apply` do, as one or two layer walks through `source`; the last walk hands
    every finished layer to `writer` (disk). Returns (plan, recipe); the layers are cut, `surgery.finish` not run."""
    from .allocation import OWL_RATIO_KEY, allocation_needs_statistics, outlier_ratio, uniform_layer
    from .criteria import get_criterion
    from .pipeline import (
        calibration_sequences,
        check_budget,
        check_reachable,
        layer_chooser,
        plan_from_scores,
        target_sparsity,
        uniform_plan_counts,
    )
    from .plan import dense_plan
    from .stats import collect_statistics, derived
    from .surgery import prune_layer

    torch.manual_seed(recipe.seed)
    criterion = get_criterion(recipe.method)
    sparsity = target_sparsity(recipe, adapter, total_before)
    check_reachable(recipe, adapter, criterion, sparsity, total_before)
    dense = dense_plan(adapter, loaded.source)
    sequences = calibration_sequences(recipe, loaded.tokenizer)
    bias = bool(recipe.bias_compensation)

    def last_walk():
        if writer is not None:
            source.writer = writer

    if criterion.sequential and recipe.allocation == "uniform":  # one walk: each layer scored on its current inputs
        counts = uniform_plan_counts(recipe, adapter, sparsity)
        last_walk()
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
            layers = []

            def after_layer(i: int, layer_stats: dict) -> bool:
                scores = criterion.score_layer(adapter, i, layer_stats)
                lp = uniform_layer(adapter, i, scores, counts[i], recipe.attention_unit)
                layers.append(lp)
                prune_layer(adapter, lp, derived(layer_stats) if bias else None)
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
        scores = []

        def score(i: int, layer_stats: dict) -> bool:
            scores.append(criterion.score_layer(adapter, i, layer_stats if need_stats else None))
            if recipe.allocation == "owl":  # it reads the weights too: while they are here
                layer_stats[OWL_RATIO_KEY] = torch.tensor(outlier_ratio(adapter, i, layer_stats), dtype=torch.float64)
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
        last_walk()
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
            for i in walk(adapter, source, desc="pruning", progress=progress):
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
    writer.finish()


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
