"""Encoder pruning end to end: calibration pairs -> unit scores -> uniform widths -> physical removal -> export;
retrieval evaluation; contrastive recovery of an exported run."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DomainpruneError
from ..models import resolve_device
from ..outputs import check_output, local_inputs
from ..stages import ENCODER_UNITS
from . import retrieval
from .allocate import ALLOCATIONS, keep_top
from .compensate import COMPENSATIONS, apply_compensated
from .criteria import Calibration, LayerScores, get_criterion
from .export import save_encoder
from .model import BertUnits, encoder_units, is_encoder, load_encoder, resolve
from .train import recover as contrastive_recover

log = logging.getLogger(__name__)
DEFAULT_METHOD = "wanda-sp"


@dataclass
class EncoderRecipe:
    model: str
    data: str = "code"
    general_data: str = "general"
    method: str = DEFAULT_METHOD
    sparsity: float = 0.35
    units: str = "all"
    allocation: str = "uniform"  # encoders/allocate.py
    compensation: str = "none"  # encoders/compensate.py
    general_ratio: float = 0.0  # share of the calibration texts (activations, compensation) from general_data
    calib_samples: int = 256  # (query, positive) pairs; activation criteria read their queries and positives
    batch_size: int = 16
    seq_len: int | None = None  # tokens per text at most (default: the model's max_seq_length)
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        get_criterion(self.method)
        ALLOCATIONS.lookup(self.allocation)
        COMPENSATIONS.lookup(self.compensation)
        if not 0 <= self.general_ratio < 1:
            raise DomainpruneError(f"--general-ratio {self.general_ratio} is outside [0, 1); give e.g. 0.25")
        if not 0 <= self.sparsity < 1:
            raise DomainpruneError(f"--sparsity {self.sparsity} is outside [0, 1); give e.g. 0.35")
        if self.units not in ENCODER_UNITS:
            raise DomainpruneError(f"--encoder-units {self.units!r} is not one of {', '.join(ENCODER_UNITS)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise DomainpruneError(f"--seq-len {self.seq_len} is too short; give at least 2 tokens")
        if self.calib_samples < 2 or self.batch_size < 2:
            raise DomainpruneError("encoders need --calib-samples and --batch-size of at least 2 (in-batch negatives)")
        for source in (self.data, self.general_data):
            if source not in retrieval.RETRIEVAL_CORPORA and not Path(source).expanduser().is_file():
                raise DomainpruneError(
                    f"retrieval data {source!r} not found: give a preset "
                    f"({', '.join(retrieval.RETRIEVAL_CORPORA)}) or a .jsonl file of query/positive rows"
                )


@dataclass
class EncoderResult:
    model: Any
    plan: dict
    report: dict
    out: Path | None = None
    recipe: EncoderRecipe | None = None


def calibration(recipe: EncoderRecipe, progress: bool) -> Calibration:
    """`calib_samples` pairs of each stream's calibration split, in a seeded order; the texts (queries and
    positives) take `general_ratio` of their pairs from the general stream."""

    def take(source: str) -> list[tuple[str, ...]]:
        pairs = retrieval.split_pairs(retrieval.load_pairs(source), "calibration")
        if len(pairs) < 2:
            raise DomainpruneError(f"retrieval data {source!r} has {len(pairs)} calibration pair(s); give more pairs")
        random.Random(recipe.seed).shuffle(pairs)
        return [(p.query, p.positive, *p.negatives) for p in pairs[: recipe.calib_samples]]

    domain = take(recipe.data)
    general = take(recipe.general_data) if recipe.method == "gaprune" or recipe.general_ratio > 0 else []
    n_general = round(recipe.general_ratio * len(domain))
    texts = [t for p in domain[: len(domain) - n_general] + general[:n_general] for t in p[:2]]
    if recipe.method != "gaprune":
        general = []
    return Calibration(texts, domain, general, batch_size=recipe.batch_size, progress=progress)


def plan_units(units: BertUnits, scores: list[LayerScores] | torch.Tensor, recipe: EncoderRecipe) -> dict:
    if isinstance(scores, torch.Tensor):  # whole layers: drop the lowest-scoring round(s·L)
        drop = round(recipe.sparsity * units.num_layers())
        if drop >= units.num_layers():
            raise DomainpruneError(f"--sparsity {recipe.sparsity} would remove every layer; lower it")
        protected = scores.clone()
        protected[list(units.protected_layers)] = float("inf")
        return {"keep_layers": keep_top(protected, units.num_layers() - drop), "layer_scores": scores.tolist()}
    return {"layers": ALLOCATIONS.lookup(recipe.allocation)(units, scores, recipe.sparsity, recipe.units)}


def apply_plan(
    units: BertUnits, plan: dict, compensation: str = "none", texts: list[str] = (), batch_size: int = 16
) -> None:
    """Carry out the plan, layer by layer, compensating removed heads and channels on `texts` (encoders/compensate)."""
    if "keep_layers" in plan:
        units.keep_layers(plan["keep_layers"])
        return
    if compensation != "none":
        if units.attn_out(0).bias is None or units.ffn_out(0).bias is None:
            raise DomainpruneError(
                f"compensation {compensation!r} adds to the output projections' biases, which this "
                f"{units.bert.config.model_type} model does not have; use no compensation"
            )
        if not texts:
            raise DomainpruneError(f"compensation {compensation!r} needs calibration texts")
        apply_compensated(units, plan["layers"], compensation, list(texts), batch_size)
        return
    for i, layer in enumerate(plan["layers"]):
        if len(layer["heads"]) < units.heads(i):
            units.keep_heads(i, layer["heads"])
        units.keep_channels(i, layer["channels"])


def prune_encoder(
    model: str | Any, *, out: str | Path | None = None, force: bool = False, progress: bool = True, **fields: Any
) -> EncoderResult:
    """Prune a sentence encoder (a preset, folder, or loaded SentenceTransformer with `source` in fields) for the
    retrieval data in `data`; with `out`, write the verified checkpoint plus plan.json, recipe.json, report.json."""
    source = fields.pop("source", None) if not isinstance(model, str) else model
    recipe = EncoderRecipe(model=str(source), **fields)
    recipe.check()
    if out is not None:
        home = resolve(source) if isinstance(model, str) else None
        check_output(out, force=force, inputs=local_inputs(home, recipe.data, recipe.general_data))
    started = time.perf_counter()
    device = resolve_device(recipe.device)
    if isinstance(model, str):
        model = load_encoder(model, device=device)
    deployed_length = model.max_seq_length
    if recipe.seq_len is not None:  # calibration only: the output keeps the model's own max_seq_length
        model.max_seq_length = min(recipe.seq_len, deployed_length or recipe.seq_len)
    units = encoder_units(model)
    before_total = sum(p.numel() for p in model.parameters())
    before = units.attention_mlp_params()
    calib = calibration(recipe, progress)
    torch.manual_seed(recipe.seed)
    scores = get_criterion(recipe.method).score(model, calib)
    plan = plan_units(units, scores, recipe)
    apply_plan(units, plan, recipe.compensation, calib.texts, recipe.batch_size)
    model.max_seq_length = deployed_length
    after = units.attention_mlp_params()
    report = {
        "sparsity_target": recipe.sparsity,
        "sparsity_achieved": round(1 - after / before, 6),
        "attention_mlp_params": [before, after],
        "total_params": [before_total, sum(p.numel() for p in model.parameters())],
        "per_layer": units.per_layer(),
        "stock_loadable": units.stock_loadable(),
        "prune_seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
    }
    result = EncoderResult(model, plan, report, recipe=recipe)
    if out is not None:
        extra = {
            "plan.json": json.dumps(plan) + "\n",
            "recipe.json": json.dumps(asdict(recipe), indent=1) + "\n",
            "report.json": json.dumps(report, indent=1) + "\n",
        }
        result.out = save_encoder(
            model, out, force=force, extra_files=extra, inputs=tuple(local_inputs(recipe.data, recipe.general_data))
        )
    return result


def evaluate_encoder(
    model: str | Any,
    *,
    data: list[str] | tuple[str, ...] = ("code", "general"),
    split: str = "test",
    max_queries: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """nDCG@10, MRR@10 and sentences/s per retrieval task (its `split`'s queries over that split's whole corpus)."""
    tasks = {
        name: retrieval.build_split(name, retrieval.load_pairs(name), split, max_queries=max_queries) for name in data
    }
    if isinstance(model, str):
        model = load_encoder(model, device=resolve_device(device))
    return {
        name: retrieval.evaluate(model, task, batch_size=batch_size, progress=progress) for name, task in tasks.items()
    }


def recover_encoder(
    run: str | Path,
    *,
    out: str | Path,
    force: bool = False,
    data: str | None = None,
    steps: int = 60,
    batch_size: int = 32,
    lr: float = 2e-5,
    seed: int = 0,
    device: str = "auto",
    in_place: bool = False,
    progress: bool = True,
) -> EncoderResult:
    """Contrastive recovery (InfoNCE, in-batch negatives) of an exported encoder on its domain's calibration pairs
    (from recipe.json unless `data` is given), written to `out` with the run's files and a recover.json."""
    run = Path(run)
    if not is_encoder(run):
        raise DomainpruneError(f"{run} is not an encoder folder")
    if not in_place:
        check_output(out, force=force, inputs=local_inputs(run, data))
    recipe_file = run / "recipe.json"
    recorded = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    data = data or recorded.get("data") or "code"
    pairs = retrieval.split_pairs(retrieval.load_pairs(data), "calibration")
    random.Random(seed).shuffle(pairs)
    model = load_encoder(run, device=resolve_device(device))
    report = contrastive_recover(
        model,
        [(p.query, p.positive, *p.negatives) for p in pairs],
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
    )
    report["data"] = data
    extra = {
        name: (run / name).read_text() for name in ("plan.json", "recipe.json", "report.json") if (run / name).is_file()
    }
    extra["recover.json"] = json.dumps(report, indent=1) + "\n"
    written = save_encoder(model, out, force=force or in_place, extra_files=extra)
    return EncoderResult(model, {}, report, out=written)
