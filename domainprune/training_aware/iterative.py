"""Iterative prune–train (Adapt-Pruner, METHODS.md §15), `prune --iterative N`: N stages, stage k pruning the model
down to P₀ − (P₀ − P*)·k/N parameters with the recipe's own width criterion and allocation (any of them: cfsp's
angular-change widths, owl or global allocation give the layer-adaptive sparsity; uniform gives none), each followed
by a short LoRA tune on the domain (the time budget split equally over the stages), merged before the next stage
scores the model. The plan written at the end lists, per layer, the original indices of what survived every stage;
the weights are those the stages (compensation, OBS refits, tuning) left, not a re-application of the plan.

Resumable per stage (each finished stage is written to the staging folder as a checkpoint) and, inside a stage's
tune, every `save_steps` steps.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from .. import cache
from ..adapters import get_adapter
from ..evaluate import parameter_count
from ..plan import LayerPlan, dense_plan
from ..stats import model_fingerprint, tensor_fingerprint
from . import common
from .common import IterativeOptions, TrainOptions

log = logging.getLogger(__name__)

MAPS_FILE = "stage.json"


def tune(
    model,
    seqs: torch.Tensor,
    options: TrainOptions,
    seed: int,
    steps: int | None,
    seconds: float | None,
    staging,
    progress: bool,
    desc: str = "tune",
):
    """LoRA cross-entropy tuning for `steps` steps or `seconds` seconds (sized after the first step), resumable in
    `staging`; returns the merged model and a summary."""
    from tqdm.auto import tqdm

    key = cache.fingerprint(
        "tune",
        1,
        seed,
        steps,
        options.model_dump(exclude={"time_budget", "save_steps"}),
        model_fingerprint(model),
        tensor_fingerprint(seqs),
    )
    device = next(model.parameters()).device
    peft_model = common.add_lora(model, options, seed)
    lparams = common.lora_params(peft_model)
    opt = torch.optim.AdamW(lparams.values(), lr=options.lr, weight_decay=0.0)
    ckpt = common.Checkpoints(staging, key)
    step, total, spent, losses = 0, steps, 0.0, []
    if (saved := ckpt.load()) is not None:
        tensors, meta = saved
        with torch.no_grad():
            for n, p in lparams.items():
                p.copy_(tensors[f"lora.{n}"])
        common.load_optimizer_state(opt, "opt", tensors, meta["opt"])
        common.set_rng_state(tensors)
        step, total, spent, losses = meta["step"], meta["total"], meta["elapsed"], meta["losses"]
    clock = common.Clock(seconds, spent)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, unit="step")
    peft_model.train()
    while total is None or step < total:
        if clock.over():
            break
        started = time.perf_counter()
        lr = common.lr_at(step, total or 1, options)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = common.causal_ce(peft_model, common.batch_at(seqs, step, options.batch_size, seed).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lparams.values(), 1.0)
        opt.step()
        step += 1
        losses.append(round(float(loss.detach()), 5))
        if total is None:
            total = max(2, int(seconds / max(time.perf_counter() - started, 1e-6)))
            bar.total = total
        bar.update(1)
        bar.set_postfix(loss=losses[-1])
        if step % options.save_steps == 0 and step < total:
            o, om = common.optimizer_state(opt, "opt")
            ckpt.save(
                step,
                {**{f"lora.{n}": p for n, p in lparams.items()}, **o, **common.rng_state()},
                {"opt": om, "total": total, "elapsed": clock.elapsed, "losses": losses},
            )
    bar.close()
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, {
        "steps": step,
        "seconds": round(clock.elapsed, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def _compose(maps: list[dict], stage_plan) -> list[dict]:
    """Original indices that survive `stage_plan` (whose indices are the current model's)."""
    out = []
    for m, lp in zip(maps, stage_plan.layers):
        out.append(
            {
                "kv": [m["kv"][k] for k in sorted(lp.kv_heads)],
                "q": [m["q"][h] for h in sorted(lp.query_heads)],
                "ch": [m["ch"][c] for c in sorted(lp.mlp_channels)],
            }
        )
    return out


def run(loaded, recipe, options: IterativeOptions, staging, progress: bool = True):
    from ..models import load_model
    from ..pipeline import apply, make_plan
    from ..runfolder import save_pruned

    n = recipe.iterative
    adapter = get_adapter(loaded.model)
    common.Units.of(adapter)  # dense decoders only, refused in one line
    dense = dense_plan(adapter, loaded.source)
    total_before = parameter_count(loaded.model)
    attn_mlp = sum(adapter.layer_params(s) for s in adapter.shapes())
    maps = [
        {"kv": list(range(s.num_kv_heads)), "q": list(range(s.num_heads)), "ch": list(range(s.intermediate_size))}
        for s in adapter.shapes()
    ]
    seqs = common.domain_sequences(
        recipe.data, recipe.text_field, loaded.tokenizer, "calibration", options.samples, options.seq_len
    )
    seconds = options.time_budget / n if options.time_budget is not None else None
    steps = -(-options.max_steps // n) if options.max_steps is not None else None
    key = cache.fingerprint(
        "iterative",
        1,
        recipe.model_dump(exclude={"train"}),
        options.model_dump(exclude={"time_budget", "save_steps"}),
        model_fingerprint(loaded.model),
    )
    stages, first = [], 1
    if staging is not None:  # resume after the last finished stage
        for k in range(n, 0, -1):
            meta = cache.load_json(staging / f"stage-{k}" / MAPS_FILE)
            if isinstance(meta, dict) and meta.get("key") == key:
                log.info("iterative: resuming after stage %d of %d", k, n)
                device = next(loaded.model.parameters()).device
                resumed = load_model(staging / f"stage-{k}", dtype="float32", device=str(device))
                loaded.model = resumed.model
                maps, stages, first = meta["maps"], meta["stages"], k + 1
                break
    for k in range(first, n + 1):
        started = time.perf_counter()
        target = total_before - round(recipe.sparsity * k / n * attn_mlp)
        stage = recipe.model_copy(update={"iterative": None, "train": None, "sparsity": None, "target_params": target})
        plan, stats, pruned = make_plan(loaded, stage, progress=progress)
        if not pruned:
            apply(loaded, plan, stats=stats, progress=progress)
        maps = _compose(maps, plan)
        prune_seconds = time.perf_counter() - started
        folder = staging / f"tune-{k}" if staging is not None else None
        loaded.model, tuned = tune(
            loaded.model, seqs, options, recipe.seed + k, steps, seconds, folder, progress, desc=f"tune {k}/{n}"
        )
        stages.append(
            {"stage": k, "params": parameter_count(loaded.model), "prune_seconds": round(prune_seconds, 2), **tuned}
        )
        log.info(
            "iterative: stage %d/%d at %s parameters, tuned %d steps", k, n, f"{stages[-1]['params']:,}", tuned["steps"]
        )
        if staging is not None and k < n:
            side = {MAPS_FILE: json.dumps({"key": key, "maps": maps, "stages": stages})}
            save_pruned(
                loaded.model, loaded.tokenizer, staging / f"stage-{k}", extra_files=side, force=True, verify=False
            )
    layers = [
        LayerPlan(index=i, kv_heads=m["kv"], query_heads=m["q"], mlp_channels=m["ch"]) for i, m in enumerate(maps)
    ]
    plan = dense.model_copy(update={"layers": layers})
    plan.params = plan.count_params(get_adapter(loaded.model), total_before)
    report = {
        "method": f"iterative x{n} ({recipe.method})",
        "stages": stages,
        "train_seconds": round(sum(s["seconds"] for s in stages), 2),
        "prune_seconds": round(sum(s["prune_seconds"] for s in stages), 2),
    }
    return plan, report
