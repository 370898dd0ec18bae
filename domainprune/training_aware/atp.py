"""ATP (METHODS.md §13): learn the pruning decisions while tuning LoRA on the domain, then remove what was decided.

- A pruning-decision generator (PDG): fixed orthogonal 64-d inputs, one per layer -> 2-layer TransformerEncoder
  (d 64, 4 heads, FF 256) -> LayerNorm -> a bias-free linear head per layer and unit kind -> logits z over that
  layer's KV groups (each with its query heads) and MLP channels: the units we can physically remove, so there is
  no RoPE issue (the reference masks dimensions inside heads before RoPE).
- Masks m = σ((z + logistic noise + 3)/T), binarised at 0.5 with a straight-through estimator; +3 starts at keep-all.
- Every step alternates (1) a PDG step on a validation-split batch with the model in eval mode and the units' whole
  contribution masked: CE + w·log(max(r, p)/min(r, p)), r the kept fraction of attention+MLP parameters counted
  exactly from the binary masks and p = 1 − sparsity, the KEEP ratio (the reference compares r with the prune
  ratio); (2) a LoRA step on a calibration batch with the LoRA-aware forward, y = (W₀x)⊙m + BAx (mask on the frozen
  path only), followed by a proximal group-lasso step on the LoRA slices of the currently pruned units,
  w_g ← w_g·max(0, 1 − lr·λ_t/‖w_g‖), λ_t = β·(e^{t/T} − 1)/(e − 1), rising towards the end (the reference's v1
  schedule runs the other way round).
- After `pdg_fraction` of the steps the decisions are fixed: the PDG's logits, projected onto the exact budget
  (within half a unit), and LoRA tunes under those masks while the lasso rises. At the end the pruned units' LoRA
  slices are set to zero (the residual norm is reported), W₀⊙m + BA is merged, so every pruned unit is exactly zero,
  and the units are removed through the plan and surgery like any other method's.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..adapters import get_adapter
from ..evaluate import parameter_count
from ..plan import dense_plan
from ..surgery import apply_plan
from . import common
from .common import TRAINING_METHODS, TrainOptions, Units

log = logging.getLogger(__name__)


class AtpOptions(TrainOptions):
    pdg_lr: float = Field(1e-3, gt=0)  # AdamW learning rate of the decision generator
    temperature: float = Field(0.4, gt=0)  # T of the Gumbel-sigmoid
    budget_weight: float = Field(5.0, gt=0)  # w of the log-ratio budget loss
    pdg_fraction: float = Field(0.5, gt=0, le=1)  # share of the steps the generator learns; then the masks are fixed
    pdg_samples: int = Field(64, ge=1)  # validation-split sequences for the generator's steps
    pdg_batch_size: int | None = Field(None, ge=1)  # None: batch_size
    lasso: float = Field(5e3, ge=0)  # β: strength of the proximal group lasso at the last step (times the lr)


class DecisionGenerator(nn.Module):
    def __init__(self, units: Units, seed: int, width: int = 64):
        super().__init__()
        torch.manual_seed(seed)
        inputs = torch.empty(units.num_layers, width)
        nn.init.orthogonal_(inputs)
        self.register_buffer("inputs", inputs)
        layer = nn.TransformerEncoderLayer(width, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.group_heads = nn.ModuleList(nn.Linear(width, n, bias=False) for n in units.groups)
        self.channel_heads = nn.ModuleList(nn.Linear(width, n, bias=False) for n in units.channels)

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = self.norm(self.encoder(self.inputs[None]))[0]
        return [(g(h[i]), c(h[i])) for i, (g, c) in enumerate(zip(self.group_heads, self.channel_heads))]


def gumbel_mask(z: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Binary mask in the forward pass, σ((z + noise + 3)/T)'s gradient in the backward pass (straight-through)."""
    if generator is not None:
        u = torch.rand(z.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(z.device)
        z = z + (u.log() - (-u).log1p())
    soft = torch.sigmoid((z + 3) / temperature)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def hard_masks(logits) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The generator's noiseless decisions: keep where σ((z + 3)/T) > 0.5."""
    return [((g.detach() > -3).float(), (c.detach() > -3).float()) for g, c in logits]


def _lasso(adapter, units: Units, keep, strength: float) -> None:
    """Proximal group-lasso step (or, with strength inf, the hard zero) on the LoRA slices of the pruned units."""
    for i, (g, c) in enumerate(keep):
        gparts, cparts = common.lora_unit_slices(adapter, units, i)
        for parts, mask, n in ((gparts, g, units.groups[i]), (cparts, c, units.channels[i])):
            pruned = mask.cpu() < 0.5
            if not bool(pruned.any()):
                continue
            norms = common.unit_norms(parts, n).cpu()
            shrink = (1 - strength / norms.clamp_min(1e-30)).clamp_min(0) if math.isfinite(strength) else 0.0
            common.scale_units(parts, torch.where(pruned, shrink, torch.ones(n)))


def _pruned_lora_norm(adapter, units: Units, keep) -> float:
    worst = 0.0
    for i, (g, c) in enumerate(keep):
        gparts, cparts = common.lora_unit_slices(adapter, units, i)
        for parts, mask, n in ((gparts, g, units.groups[i]), (cparts, c, units.channels[i])):
            pruned = mask.cpu() < 0.5
            if bool(pruned.any()):
                worst = max(worst, float(common.unit_norms(parts, n)[pruned].max()))
    return worst


@torch.no_grad()
def _bake_masks(adapter, units: Units, keep) -> None:
    """W₀ ← W₀⊙m on the frozen path (rows of q/k/v/gate/up with their biases, columns of o/down), before merging."""
    for i, (g, c) in enumerate(keep):
        q, k, v = adapter.attention_in_projs(i)
        gate, up = adapter.mlp_in_projs(i)
        for mod, rows in ((q, units.q_rows(i, g)), (k, units.kv_rows(g)), (v, units.kv_rows(g)), (gate, c), (up, c)):
            base = mod.base_layer
            base.weight.mul_(rows.to(base.weight)[:, None])
            if base.bias is not None:
                base.bias.mul_(rows.to(base.bias))
        for mod, cols in ((adapter.o_proj(i), units.q_rows(i, g)), (adapter.down_proj(i), c)):
            mod.base_layer.weight.mul_(cols.to(mod.base_layer.weight)[None, :])


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def pruned_max_abs(model: nn.Module, units: Units, keep) -> float:
    """Largest |weight| (or bias) in the slices of the pruned units of a plain (merged) model: 0.0 when exact."""
    adapter = get_adapter(model)
    worst = 0.0
    for i, (g, c) in enumerate(keep):
        gone_q, gone_kv, gone_c = (units.q_rows(i, g) < 0.5), (units.kv_rows(g) < 0.5), (c < 0.5)
        q, k, v = adapter.attention_in_projs(i)
        gate, up = adapter.mlp_in_projs(i)
        for mod, rows in ((q, gone_q), (k, gone_kv), (v, gone_kv), (gate, gone_c), (up, gone_c)):
            rows = rows.to(mod.weight.device)
            worst = max(worst, _max_abs(mod.weight.detach()[rows]))
            if mod.bias is not None:
                worst = max(worst, _max_abs(mod.bias.detach()[rows]))
        for mod, cols in ((adapter.o_proj(i), gone_q), (adapter.down_proj(i), gone_c)):
            worst = max(worst, _max_abs(mod.weight.detach()[:, cols.to(mod.weight.device)]))
    return worst


def train_atp(loaded, recipe, options: AtpOptions, staging, progress: bool = True):
    """Train LoRA and the decisions; returns (merged model with the pruned units exactly zero, keep masks, units,
    report). Nothing is removed yet: `run` does that through the plan."""
    from tqdm.auto import tqdm

    model = loaded.model
    device = next(model.parameters()).device
    units = Units.of(get_adapter(model))
    keep_ratio = 1 - recipe.sparsity
    train = common.domain_sequences(
        recipe.data, recipe.text_field, loaded.tokenizer, "calibration", options.samples, options.seq_len
    )
    val = common.domain_sequences(
        recipe.data, recipe.text_field, loaded.tokenizer, "validation", options.pdg_samples, options.seq_len
    )
    key, peft_model, adapter, masks, lparams, opt = common.lora_setup("atp", model, recipe, options, units)
    pdg = DecisionGenerator(units, recipe.seed + 1).to(device)
    popt = torch.optim.AdamW(pdg.parameters(), lr=options.pdg_lr, weight_decay=0.0)
    noise = torch.Generator().manual_seed(recipe.seed + 2)
    ckpt = common.Checkpoints(staging, key)
    step, total, spent, final, history = 0, options.max_steps, 0.0, None, []
    if (saved := ckpt.load()) is not None:
        tensors, meta = saved
        with torch.no_grad():
            for n, p in lparams.items():
                p.copy_(tensors[f"lora.{n}"])
        pdg.load_state_dict({k.removeprefix("pdg."): v for k, v in tensors.items() if k.startswith("pdg.")})
        common.load_optimizer_state(opt, "opt", tensors, meta["opt"])
        common.load_optimizer_state(popt, "popt", tensors, meta["popt"])
        common.set_rng_state(tensors)
        noise.set_state(tensors["noise"])
        step, total, spent, history = meta["step"], meta["total"], meta["elapsed"], meta["history"]
        if "final.0.g" in tensors:
            final = [(tensors[f"final.{i}.g"], tensors[f"final.{i}.c"]) for i in range(units.num_layers)]
        log.info("atp: resuming at step %d of %s from %s", step, total, staging)

    def save() -> None:
        tensors = {f"lora.{n}": p for n, p in lparams.items()}
        tensors.update({f"pdg.{k}": v for k, v in pdg.state_dict().items()})
        o, om = common.optimizer_state(opt, "opt")
        po, pom = common.optimizer_state(popt, "popt")
        tensors.update({**o, **po, **common.rng_state(), "noise": noise.get_state()})
        if final is not None:
            for i, (g, c) in enumerate(final):
                tensors[f"final.{i}.g"], tensors[f"final.{i}.c"] = g, c
        ckpt.save(step, tensors, {"opt": om, "popt": pom, "total": total, "elapsed": clock.elapsed, "history": history})

    clock = common.Clock(options.time_budget, spent)
    pdg_batch = options.pdg_batch_size or options.batch_size
    bar = tqdm(total=total, initial=step, desc="atp", disable=not progress, unit="step")
    stopped = False
    while total is None or step < total:
        if clock.over():
            stopped = True
            log.info("atp: time budget of %.0f s spent at step %d of %s; finishing", options.time_budget, step, total)
            break
        started = time.perf_counter()
        entry: dict[str, Any] = {"step": step + 1}
        if final is None:  # (1) the decision generator's step: whole units masked, the LLM in eval mode
            peft_model.eval()
            for p in lparams.values():
                p.requires_grad_(False)
            logits = pdg()
            gm = [gumbel_mask(g, options.temperature, noise) for g, _ in logits]
            cm = [gumbel_mask(c, options.temperature, noise) for _, c in logits]
            masks.set(gm, cm, "full")
            ce = common.causal_ce(peft_model, common.batch_at(val, step, pdg_batch, recipe.seed + 7).to(device))
            r = units.kept(gm, cm) / units.total
            ratio = options.budget_weight * (torch.log(r) - math.log(keep_ratio)).abs()
            popt.zero_grad(set_to_none=True)
            (ce + ratio).backward()
            torch.nn.utils.clip_grad_norm_(pdg.parameters(), 3.0)
            popt.step()
            for p in lparams.values():
                p.requires_grad_(True)
            with torch.no_grad():
                keep = hard_masks(pdg())
            entry.update(pdg_ce=round(float(ce.detach()), 5), kept=round(float(r.detach()), 5))
        else:
            keep = final
        # (2) the LoRA step: mask on the frozen path only, then the proximal group lasso on the pruned units
        peft_model.train()
        masks.set([g for g, _ in keep], [c for _, c in keep], "frozen")
        lr = common.lr_at(step, total or 1, options)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = common.causal_ce(peft_model, common.batch_at(train, step, options.batch_size, recipe.seed).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lparams.values(), 1.0)
        opt.step()
        step += 1
        if total is None:  # later steps skip the generator's: about half the cost
            f = options.pdg_fraction
            total = common.planned_steps(options, time.perf_counter() - started, f + (1 - f) / 2)
            bar.total = total
            log.info("atp: %d steps planned for the %.0f s budget", total, options.time_budget)
        strength = lr * options.lasso * (math.exp(step / total) - 1) / (math.e - 1)
        _lasso(adapter, units, keep, strength)
        entry.update(loss=round(float(loss.detach()), 5), lr=lr, elapsed=round(clock.elapsed, 2))
        if final is None and step >= max(1, round(options.pdg_fraction * total)):
            with torch.no_grad():
                final = [
                    (g.float(), c.float())
                    for g, c in common.project_to_budget(units, [(g.cpu(), c.cpu()) for g, c in pdg()], recipe.sparsity)
                ]
            entry["decisions_fixed"] = True
        history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=entry["loss"], kept=entry.get("kept", ""))
        if step % options.save_steps == 0 and step < total:
            save()
    bar.close()
    if final is None:  # stopped by the time budget before the decisions were fixed
        with torch.no_grad():
            final = [
                (g.float(), c.float())
                for g, c in common.project_to_budget(units, [(g.cpu(), c.cpu()) for g, c in pdg()], recipe.sparsity)
            ]
    residual = _pruned_lora_norm(adapter, units, final)
    _lasso(adapter, units, final, math.inf)
    masks.remove()
    _bake_masks(adapter, units, final)
    merged = peft_model.merge_and_unload()
    merged.eval()
    report = {
        "method": "atp",
        "steps": step,
        "planned_steps": total,
        "stopped_by_time_budget": stopped,
        "train_seconds": round(clock.elapsed, 2),
        "lora_residual_norm_zeroed": residual,  # largest LoRA norm of a pruned unit the lasso had not yet removed
        "pruned_units_max_abs": pruned_max_abs(merged, units, final),
        "trainable_params": {
            "lora": sum(p.numel() for p in lparams.values()),
            "decision_generator": sum(p.numel() for p in pdg.parameters()),
        },
        "log": history,
    }
    return merged, [(g > 0.5, c > 0.5) for g, c in final], units, report


@TRAINING_METHODS.register("atp", options=AtpOptions)
def run(loaded, recipe, options: AtpOptions, staging, progress: bool = True):
    """Train, remove the pruned units through the plan, return (plan, report); `loaded.model` is the pruned model."""
    total_before = parameter_count(loaded.model)
    dense = dense_plan(get_adapter(loaded.model), loaded.source)
    merged, keep, _, report = train_atp(loaded, recipe, options, staging, progress)
    plan = common.plan_from_keep(get_adapter(merged), dense, keep, total_before)
    apply_plan(merged, plan)
    loaded.model = merged
    return plan, report
