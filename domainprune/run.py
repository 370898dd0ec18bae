"""The entry point of `domainprune prune`: `prune()` chooses how a recipe runs (in memory, streamed one layer at a
time, or training-aware) and writes the run folder.

It sits above the planning core so that the import graph has no cycle: `domainprune.pipeline` holds the recipe,
planning and `apply`; `domainprune.streaming` and the training-aware methods (`domainprune.training_aware`) use that
core, and only this module hands over to them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .adapters import get_adapter
from .errors import DomainpruneError
from .evaluate import parameter_count
from .models import LoadedModel, check_prunable, check_seq_len, load_model
from .outputs import check_output, local_inputs
from .pipeline import (
    PruneResult,
    Recipe,
    apply,
    budget,
    check_budget,
    check_data,
    make_plan,
    make_recipe,
    prune_report,
    trim_vocab_stage,
)
from .runfolder import save_pruned
from .stages import recipe_files
from .training_aware import TRAINING_METHODS, is_training, options_class


def prune_training(loaded: LoadedModel, recipe: Recipe, out: Path | None, progress: bool):
    """Run the recipe's training-aware method on `loaded` (pruned in place); returns (plan, report, staging).
    Checkpoints live in `.<out>.train/` beside the output until it is written (none without `out`)."""
    from .training_aware import iterative

    options = options_class(recipe.method)(**recipe.train)
    check_seq_len(loaded.model, options.seq_len, "--train-opt seq_len")
    staging = out.parent / f".{out.name}.train" if out is not None else None
    if recipe.method in TRAINING_METHODS:
        plan, report = TRAINING_METHODS[recipe.method](loaded, recipe, options, staging, progress)
    else:
        plan, report = iterative.run(loaded, recipe, options, staging, progress)
    return plan, report, staging


def prune(
    model: str | LoadedModel = "smollm2-135m",
    *,
    out: str | Path | None = None,
    force: bool = False,
    verify: bool = True,
    progress: bool = True,
    offload: str = "auto",
    **recipe_fields: Any,
) -> PruneResult:
    """Prune `model` (a preset, folder, .gguf file, hub id, or an already loaded model) for the domain in `data`.

    Recipe fields: data, method, allocation, sparsity | target_params, experts_keep (MoE models, with an expert
    method), attention_unit, calib_samples, seq_len, batch_size, bias_compensation, reconstruct ("obs": structured
    OBS least-squares refit, domainprune.obs), seed, dtype, device, text_field,
    general_data, general_ratio, calib_candidates, micro_batch, gradient_checkpointing, taylor_mode (docs/criteria.md),
    target_speedup (instead of sparsity | target_params), speedup_phase, prefill_tokens (docs/allocation.md): then the
    dense model's and the pruned model's throughput are measured here and compared in `report["speedup"]`.
    With `out`, the pruned checkpoint (plus plan.json, recipe.yaml, recipe.json and report.json) is written there,
    verified, and moved into place. A recipe.yaml's keyword arguments: `domainprune.stages.load_recipe(path).fields()`.

    `offload` (docs/streaming.md): "none" loads the whole model on the device; "cpu" keeps it in CPU memory and moves
    one layer at a time to the device; "disk" reads one layer at a time from the checkpoint's safetensors shards and
    writes each pruned layer to `out` as it is finished (then `PruneResult.model` is None); "auto" chooses from the
    free memory. An already loaded model is pruned where it is.
    """
    source = model.source if isinstance(model, LoadedModel) else str(model)
    recipe = make_recipe(model=source, **recipe_fields)
    if offload not in ("auto", "none", "cpu", "disk"):
        raise DomainpruneError(f"--offload must be one of auto, none, cpu, disk, not {offload!r}")
    if out is not None:  # fail before the expensive part; never over an input
        home = model.path if isinstance(model, LoadedModel) else source
        check_output(out, force=force, inputs=local_inputs(home, recipe.data, recipe.general_data))
    if not isinstance(model, LoadedModel):
        check_prunable(recipe.model)
        check_data(recipe)
    if offload == "auto" and not isinstance(model, LoadedModel):
        from .models import resolve_device, resolve_dtype, resolve_source
        from .streaming import choose_offload

        device = resolve_device(recipe.device)
        offload = choose_offload(resolve_source(recipe.model), recipe, device, resolve_dtype(recipe.dtype, device))
    if offload in ("cpu", "disk"):
        if isinstance(model, LoadedModel):
            raise DomainpruneError(f"--offload {offload} loads the model itself: give its folder, not a loaded model")
        if is_training(recipe):
            raise DomainpruneError(
                f"--offload {offload}: training-aware pruning (atp, loraprune, --iterative) tunes the "
                "whole model in memory; use --offload none"
            )
        from .streaming import prune_streamed

        return prune_streamed(source, offload, out=out, force=force, verify=verify, progress=progress, **recipe_fields)
    started = time.perf_counter()
    loaded = (
        model if isinstance(model, LoadedModel) else load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    )
    check_seq_len(loaded.model, recipe.seq_len)
    if recipe.target_speedup is not None:  # the dense model's speed, measured before it is pruned in place
        from .latency import check_speedup_model, phase_speed

        check_speedup_model(loaded.model, recipe.target_speedup, depth=bool(recipe.depth))
        measuring = time.perf_counter()
        dense_speed = phase_speed(loaded.model, recipe.speedup_phase, recipe.prefill_tokens)
        started += time.perf_counter() - measuring
    wanted = budget(recipe, get_adapter(loaded.model), parameter_count(loaded.model))
    staging = trained = None
    if is_training(recipe):  # decided while tuning on the domain (domainprune.training_aware); pruned in place
        plan, trained, staging = prune_training(loaded, recipe, None if out is None else Path(out), progress)
        plan, stats, pruned = plan.model_copy(update={"recipe": recipe.model_dump()}), None, True
    else:
        plan, stats, pruned = make_plan(loaded, recipe, progress=progress)
    check_budget(recipe, plan, wanted)
    recipe = Recipe.model_validate(plan.recipe)  # with what planning recorded (calib_kl, search_kl)
    if not pruned:
        apply(loaded, plan, stats=stats, progress=progress)
    vocab = trim_vocab_stage(loaded, recipe) if recipe.vocab_coverage or recipe.vocab_size else None
    total_after = parameter_count(loaded.model)
    device = next(loaded.model.parameters()).device
    report = prune_report(recipe, plan, wanted, total_after, started, device, get_adapter(loaded.model))
    if vocab is not None:
        report["vocab"] = vocab.to_dict()
    if trained is not None:
        report["training"] = {k: v for k, v in trained.items() if k != "log"}
    if recipe.target_speedup is not None:
        from .latency import confirm_speedup

        report["speedup"] = confirm_speedup(loaded.model, recipe, dense_speed)
    plan.params.total_after = total_after
    result = PruneResult(
        loaded.model,
        loaded.tokenizer,
        plan,
        recipe,
        report=report,
        training_log=trained.get("log") if trained is not None else None,
    )
    if out is not None:
        files = {
            "plan.json": plan.model_dump_json(indent=1) + "\n",
            **recipe_files(recipe),
            "report.json": json.dumps(report, indent=1) + "\n",
        }
        if vocab is not None:  # the same side files `domainprune vocab` writes
            files["vocab_report.json"] = json.dumps(vocab.to_dict(), indent=1) + "\n"
            files["vocab_map.json"] = json.dumps({"kept_old_ids": vocab.kept_ids}) + "\n"
        if trained is not None:
            files["training_log.json"] = json.dumps(trained.get("log", []), indent=1) + "\n"
        result.out = save_pruned(loaded.model, loaded.tokenizer, out, extra_files=files, force=force, verify=verify)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return result
