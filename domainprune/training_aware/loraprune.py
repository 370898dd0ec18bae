"""LoRAPrune (METHODS.md §14): prune during LoRA tuning by an importance estimated from the LoRA gradients alone.

- The full weight's gradient is estimated from LoRA's: Ĝ = ∇B·A + B·∇A − ∇B·∇A (the change a unit SGD step of the
  factors makes to BA), and a weight's importance is |Ĝ ⊙ (W + s·BA)|.
- Units are ours: a KV group (the rows of q for all its query heads, of k and v for its KV head, and those columns of
  o) and an MLP channel (gate/up row, down column), so GQA is handled (the reference hard-codes 32 heads). Each
  module's per-unit sums are L2-normalised and summed over the unit's modules; S̄ ← ema·S̄ + (1 − ema)·S every step.
- Sparsity follows the cubic schedule s_t = s_f·(1 − (1 − (t − t_w)/(T − t_w − t_c))³) between a warm-up and a
  cool-down; every `prune_every` steps each layer drops its lowest-S̄ live units down to the uniform per-layer counts
  of the target scaled by s_t/s_f (allocation.uniform_counts at the target: whole KV groups and channels; by the
  reference's rule the first 10 % of layers and the last keep every unit, the others taking their share), masks
  multiplying the units' outputs. The last pruning reaches the target
  exactly (the reference stops just short of it); then LoRA is merged and the units are removed through the plan.
"""

from __future__ import annotations

import logging
import time

import torch
from pydantic import Field

from ..adapters import get_adapter
from ..allocation import uniform_counts
from ..errors import DomainpruneError
from ..evaluate import parameter_count
from ..plan import dense_plan
from ..surgery import apply_plan
from . import common
from .common import TRAINING_METHODS, TrainOptions, Units

log = logging.getLogger(__name__)


class LoraPruneOptions(TrainOptions):
    prune_every: int = Field(10, ge=1)  # steps between pruning rounds
    ema: float = Field(0.9, ge=0, lt=1)  # S̄ ← ema·S̄ + (1 − ema)·S
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # share of the steps before pruning starts
    cooldown_fraction: float = Field(0.1, ge=0, lt=1)  # share of the steps at the final sparsity
    # The reference's `freeze`: the first int(0.1·L) layers and the last layer keep every unit; the other layers take
    # the whole budget (the reference does not make it up, so its total falls short of the target).
    protect_layers: bool = True


PROTECT_LIMIT = 0.9  # the other layers' sparsity above which protection is refused (uniform counts cap a layer)


def protected_layers(num_layers: int) -> set[int]:
    return set(range(int(0.1 * num_layers))) | {num_layers - 1}


def target_counts(adapter, sparsity: float, protect: bool) -> list[tuple[int, int]]:
    """(KV groups, MLP channels) each layer loses at the target: uniform, or zero in the protected layers and one
    higher fraction in the others that removes the same parameters."""
    if not protect:
        return uniform_counts(adapter, sparsity, "kv_group")
    shapes = adapter.shapes()
    keep = protected_layers(len(shapes))
    sizes = [adapter.layer_params(x) for x in shapes]
    free = sum(n for i, n in enumerate(sizes) if i not in keep)
    rest = sparsity * sum(sizes) / free if free else float("inf")
    if rest > PROTECT_LIMIT:
        raise DomainpruneError(
            f"loraprune keeps layers {sorted(keep)} whole (the reference's rule), so reaching {sparsity:.0%} would "
            f"take {rest:.0%} of every other layer; lower --sparsity or give --train-opt protect_layers=false"
        )
    return uniform_counts(adapter, [0.0 if i in keep else rest for i in range(len(shapes))], "kv_group")


def lora_gradient(module) -> torch.Tensor:
    """Ĝ = ∇B·A + B·∇A − ∇B·∇A of a peft LoRA Linear after backward: the LoRA estimate of its weight's gradient."""
    b, a, _ = common.lora_parts(module)
    gb = b.grad if b.grad is not None else torch.zeros_like(b)
    ga = a.grad if a.grad is not None else torch.zeros_like(a)
    return gb @ a + b @ ga - gb @ ga


def _sensitivity(module) -> torch.Tensor:
    b, a, s = common.lora_parts(module)
    return (lora_gradient(module) * (module.base_layer.weight + s * (b @ a))).abs()


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-30)


@torch.no_grad()
def unit_importance(adapter, units: Units, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's (KV group, MLP channel) importances from the current LoRA gradients."""
    n = units.groups[i]
    q, k, v = (_sensitivity(m) for m in adapter.attention_in_projs(i))
    o = _sensitivity(adapter.o_proj(i))
    groups = (
        _normalised(q.reshape(n, -1).sum(1))
        + _normalised(k.reshape(n, -1).sum(1))
        + _normalised(v.reshape(n, -1).sum(1))
        + _normalised(o.reshape(o.shape[0], n, -1).sum((0, 2)))
    )
    gate, up = (_sensitivity(m) for m in adapter.mlp_in_projs(i))
    down = _sensitivity(adapter.down_proj(i))
    channels = _normalised(gate.sum(1)) + _normalised(up.sum(1)) + _normalised(down.sum(0))
    return groups.float().cpu(), channels.float().cpu()


def cubic_sparsity(step: int, total: int, final: float, options: LoraPruneOptions) -> float:
    warm, cool = round(options.warmup_fraction * total), round(options.cooldown_fraction * total)
    if step <= warm:
        return 0.0
    span = max(1, total - warm - cool)
    if step >= warm + span:
        return final
    return final * (1 - (1 - (step - warm) / span) ** 3)


def prune_to(units: Units, counts, ema, keep) -> None:
    """In each layer, drop the lowest-S̄ live units until `counts` (groups, channels) are removed; never revive."""
    for i, (n_groups, n_channels) in enumerate(counts):
        for kind, want in ((0, n_groups), (1, n_channels)):
            mask, score = keep[i][kind], ema[i][kind]
            extra = want - int((~mask).sum())
            if extra > 0:
                live = mask.nonzero().flatten()
                order = live[torch.argsort(score[live], stable=True)]
                mask[order[:extra]] = False


@TRAINING_METHODS.register("loraprune", options=LoraPruneOptions)
def run(loaded, recipe, options: LoraPruneOptions, staging, progress: bool = True):
    from tqdm.auto import tqdm

    model = loaded.model
    device = next(model.parameters()).device
    base_adapter = get_adapter(model)
    units = Units.of(base_adapter)
    total_before = parameter_count(model)
    dense = dense_plan(base_adapter, loaded.source)
    final_counts = target_counts(base_adapter, recipe.sparsity, options.protect_layers)

    def counts(s: float):
        """The final per-layer removals scaled by s/s_f: monotone in s (the uniform counts at a lower sparsity are
        not, where a KV group's rounding flips), and exactly the final ones at s_f."""
        f = s / recipe.sparsity if recipe.sparsity else 1.0
        return [(round(f * g), round(f * c)) for g, c in final_counts]

    train = common.domain_sequences(
        recipe.data, recipe.text_field, loaded.tokenizer, "calibration", options.samples, options.seq_len
    )
    key, peft_model, adapter, masks, lparams, opt = common.lora_setup("loraprune", model, recipe, options, units)
    keep = [
        (torch.ones(g, dtype=torch.bool), torch.ones(c, dtype=torch.bool)) for g, c in zip(units.groups, units.channels)
    ]
    ema = [(torch.zeros(g), torch.zeros(c)) for g, c in zip(units.groups, units.channels)]
    ckpt = common.Checkpoints(staging, key)
    step, total, spent, history = 0, options.max_steps, 0.0, []
    if (saved := ckpt.load()) is not None:
        tensors, meta = saved
        with torch.no_grad():
            for n, p in lparams.items():
                p.copy_(tensors[f"lora.{n}"])
        common.load_optimizer_state(opt, "opt", tensors, meta["opt"])
        common.set_rng_state(tensors)
        keep = [(tensors[f"keep.{i}.g"], tensors[f"keep.{i}.c"]) for i in range(units.num_layers)]
        ema = [(tensors[f"ema.{i}.g"], tensors[f"ema.{i}.c"]) for i in range(units.num_layers)]
        step, total, spent, history = meta["step"], meta["total"], meta["elapsed"], meta["history"]
        log.info("loraprune: resuming at step %d of %s from %s", step, total, staging)
    clock = common.Clock(options.time_budget, spent)
    bar = tqdm(total=total, initial=step, desc="loraprune", disable=not progress, unit="step")
    stopped = False
    while total is None or step < total:
        if clock.over():
            stopped = True
            log.info("loraprune: time budget spent at step %d of %s; pruning to the target now", step, total)
            break
        started = time.perf_counter()
        peft_model.train()
        masks.set([g.float() for g, _ in keep], [c.float() for _, c in keep], "full")
        lr = common.lr_at(step, total or 1, options)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = common.causal_ce(peft_model, common.batch_at(train, step, options.batch_size, recipe.seed).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lparams.values(), 1.0)
        for i in range(units.num_layers):
            g, c = unit_importance(adapter, units, i)
            ema[i] = (options.ema * ema[i][0] + (1 - options.ema) * g, options.ema * ema[i][1] + (1 - options.ema) * c)
        opt.step()
        step += 1
        if total is None:
            total = common.planned_steps(options, time.perf_counter() - started)
            bar.total = total
        entry = {"step": step, "loss": round(float(loss.detach()), 5), "lr": lr, "elapsed": round(clock.elapsed, 2)}
        if step % options.prune_every == 0 or step == total:
            s = cubic_sparsity(step, total, recipe.sparsity, options)
            prune_to(units, final_counts if step == total else counts(s), ema, keep)
            entry["sparsity"] = round(s, 5)
        history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=entry["loss"])
        if step % options.save_steps == 0 and step < total:
            tensors = {f"lora.{n}": p for n, p in lparams.items()}
            o, om = common.optimizer_state(opt, "opt")
            tensors.update({**o, **common.rng_state()})
            for i in range(units.num_layers):
                tensors[f"keep.{i}.g"], tensors[f"keep.{i}.c"] = keep[i]
                tensors[f"ema.{i}.g"], tensors[f"ema.{i}.c"] = ema[i]
            ckpt.save(step, tensors, {"opt": om, "total": total, "elapsed": clock.elapsed, "history": history})
    bar.close()
    prune_to(units, final_counts, ema, keep)  # a run stopped by its budget still ends at the target
    masks.remove()
    merged = peft_model.merge_and_unload()
    merged.eval()
    plan = common.plan_from_keep(get_adapter(merged), dense, keep, total_before)
    apply_plan(merged, plan)
    loaded.model = merged
    report = {
        "method": "loraprune",
        "steps": step,
        "planned_steps": total,
        "stopped_by_time_budget": stopped,
        "train_seconds": round(clock.elapsed, 2),
        "trainable_params": {"lora": sum(p.numel() for p in lparams.values())},
        "log": history,
    }
    return plan, report
