"""What the training-aware methods share: options, the domain batches, LoRA on the seven projections, our pruning units
(KV groups with their query heads, MLP channels) with their exact parameter costs, masks on those units, a plan from
kept units, and resumable checkpoints (safetensors + JSON, no pickle)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import cache, faults
from ..adapters import DecoderAdapter
from ..errors import DomainpruneError
from ..options import IterativeOptions, TrainOptions  # noqa: F401  (the methods' options build on them)
from ..plan import LayerPlan, Plan
from ..registry import Registry

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"


# `--method NAME` of the methods that decide while they tune: each registers its
# run(loaded, recipe, options, staging, progress) -> (plan, report) with its options class (`options`)
TRAINING_METHODS = Registry("training method")


def parse_options(cls: type[TrainOptions], fields: dict[str, Any] | None, what: str) -> TrainOptions:
    """`fields` validated as `cls`, errors as one line naming the option."""
    from pydantic import ValidationError

    try:
        return cls(**(fields or {}))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            msg = f"is not an option of {what} (options: {known})"
        raise DomainpruneError(f"{what}: {loc + ' ' if loc else ''}{msg}") from None


# --- data ----------------------------------------------------------------------------------------------------


def domain_sequences(data: str, text_field: str, tokenizer, split: str, n: int, seq_len: int) -> torch.Tensor:
    from ..data import load_corpus

    return load_corpus(data, text_field=text_field).sequences(tokenizer, split, n, seq_len, samples_option="samples")


def batch_at(seqs: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of step `step`: epochs of seeded permutations, a function of the step alone (so a resumed run
    reads exactly the batches an uninterrupted one reads)."""
    n = len(seqs)
    picks = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        picks.append(int(perm[pos]))
    return seqs[picks]


def causal_ce(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def lr_at(step: int, total: int, options: TrainOptions) -> float:
    """Linear warm-up, then cosine from lr to lr/10 over the planned steps."""
    if step < options.warmup_steps:
        return options.lr * (step + 1) / (options.warmup_steps + 1)
    frac = min(1.0, (step - options.warmup_steps) / max(1, total - options.warmup_steps))
    return options.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# --- LoRA ----------------------------------------------------------------------------------------------------

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: torch.nn.Module, options: TrainOptions, seed: int):
    """peft LoRA on every q/k/v/o/gate/up/down projection (the base weights frozen); A drawn from `seed`."""
    from peft import LoraConfig, get_peft_model

    from ..recover import lora_targets

    targets = lora_targets(model)
    if not targets:
        raise DomainpruneError("the model has no q/k/v/o/gate/up/down projections for LoRA")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_setup(method: str, model: torch.nn.Module, recipe, options: TrainOptions, units: Units):
    """What ATP and LoRAPrune start from: the run's resume key (the method, its data, budget, seed, options and the
    model's weights), the model with LoRA adapters, its adapter, the unit masks, and AdamW over the LoRA weights."""
    from ..adapters import get_adapter
    from ..stats import model_fingerprint

    key = cache.fingerprint(
        method,
        1,
        recipe.data,
        recipe.sparsity,
        recipe.seed,
        options.model_dump(exclude={"time_budget", "save_steps"}),
        model_fingerprint(model),
    )
    peft_model = add_lora(model, options, recipe.seed)
    adapter = get_adapter(peft_model.base_model.model)
    lparams = lora_params(peft_model)
    opt = torch.optim.AdamW(lparams.values(), lr=options.lr, weight_decay=0.0)
    return key, peft_model, adapter, UnitMasks(adapter, units), lparams, opt


def lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def lora_parts(module) -> tuple[torch.nn.Parameter, torch.nn.Parameter, float]:
    """(B, A, scaling) of a peft LoRA Linear's default adapter: the update is scaling · B @ A."""
    return module.lora_B["default"].weight, module.lora_A["default"].weight, module.scaling["default"]


# --- units -----------------------------------------------------------------------------------------------------


@dataclass
class Units:
    """Per layer: KV groups (each with its query heads) and MLP channels, and what each costs in parameters."""

    groups: list[int]  # KV groups per layer
    group_size: list[int]  # query heads per KV group
    channels: list[int]  # MLP channels per layer
    group_cost: list[int]  # parameters of one KV group with its query heads (q/k/v biases included)
    channel_cost: int  # parameters of one MLP channel (gate row, up row, down column)
    head_dim: int

    @classmethod
    def of(cls, adapter: DecoderAdapter) -> "Units":
        shapes = adapter.shapes()
        if adapter.has_experts() or any(s.num_kv_heads == 0 or s.intermediate_size == 0 for s in shapes):
            raise DomainpruneError(
                "training-aware pruning works on dense decoders whose every layer has attention "
                "and an MLP (no mixture-of-experts or removed sublayers)"
            )
        if not adapter.prunable_heads:
            raise DomainpruneError(f"attention heads of {adapter.model_type!r} models cannot be pruned exactly")
        return cls(
            [s.num_kv_heads for s in shapes],
            [s.group_size for s in shapes],
            [s.intermediate_size for s in shapes],
            [adapter.attention_params(s.group_size, 1) for s in shapes],
            adapter.mlp_params(1),
            adapter.head_dim,
        )

    @property
    def num_layers(self) -> int:
        return len(self.groups)

    @property
    def total(self) -> int:
        """Attention + MLP parameters (what --sparsity is a fraction of)."""
        return sum(g * c for g, c in zip(self.groups, self.group_cost)) + sum(self.channels) * self.channel_cost

    def kept(self, groups: list[torch.Tensor], channels: list[torch.Tensor]) -> torch.Tensor:
        """Attention + MLP parameters kept by (possibly soft) masks: differentiable in the masks."""
        out = 0
        for i in range(self.num_layers):
            out = out + groups[i].sum() * self.group_cost[i] + channels[i].sum() * self.channel_cost
        return out

    def q_rows(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """Group mask -> mask over q_proj rows (o_proj columns): every query head of a group, head_dim each."""
        return g.repeat_interleave(self.group_size[i] * self.head_dim)

    def kv_rows(self, g: torch.Tensor) -> torch.Tensor:
        return g.repeat_interleave(self.head_dim)


def project_to_budget(units: Units, scores: list[tuple[torch.Tensor, torch.Tensor]], sparsity: float):
    """Keep masks meeting the budget within half a unit: units removed in ascending score (ties: layer, kind, index)
    while that brings the removed parameters closer to `sparsity` of the total; every layer keeps its best KV group
    and its best MLP channel. Scores are comparable across layers and kinds (e.g. a decision generator's logits)."""
    target = sparsity * units.total
    keep = [
        (torch.ones(units.groups[i], dtype=torch.bool), torch.ones(units.channels[i], dtype=torch.bool))
        for i in range(units.num_layers)
    ]
    candidates = []
    for i, (g, c) in enumerate(scores):
        g, c = g.detach().double().cpu(), c.detach().double().cpu()
        best_g, best_c = int(g.argmax()), int(c.argmax())
        candidates += [(float(g[k]), i, 0, k) for k in range(len(g)) if k != best_g]
        candidates += [(float(c[k]), i, 1, k) for k in range(len(c)) if k != best_c]
    removed = 0.0
    for _, i, kind, k in sorted(candidates):
        cost = units.group_cost[i] if kind == 0 else units.channel_cost
        if removed + cost / 2 <= target:
            keep[i][kind][k] = False
            removed += cost
    return keep


def plan_from_keep(adapter: DecoderAdapter, dense: Plan, keep, total_before: int) -> Plan:
    """The plan keeping, in every layer, the KV groups and MLP channels whose keep mask is True."""
    layers = []
    for i, (g, c) in enumerate(keep):
        s = adapter.shape(i)
        kv = [k for k in range(s.num_kv_heads) if bool(g[k])]
        heads = [h for h in range(s.num_heads) if h // s.group_size in kv]
        layers.append(
            LayerPlan(
                index=i,
                kv_heads=kv,
                query_heads=heads,
                mlp_channels=[j for j in range(s.intermediate_size) if bool(c[j])],
            )
        )
    plan = dense.model_copy(update={"layers": layers})
    plan.params = plan.count_params(adapter, total_before)
    return plan


class UnitMasks:
    """Masks over every layer's KV groups and MLP channels, applied by forward hooks on a peft-LoRA model.

    mode "frozen": only the frozen path is masked, y = (W₀x)⊙m + BAx (q/k/v/gate/up rows; o/down input columns of
    W₀ alone), ATP's LoRA-aware forward. mode "full": the unit's whole contribution (its o_proj/down_proj input,
    LoRA included) is masked, i.e. exactly what removing the unit does. mode None: no masking."""

    def __init__(self, adapter: DecoderAdapter, units: Units):
        self.units, self.mode = units, None
        self.groups: list[torch.Tensor] = [torch.ones(n) for n in units.groups]
        self.channels: list[torch.Tensor] = [torch.ones(n) for n in units.channels]
        self.handles = []
        for i in range(units.num_layers):
            q, k, v = adapter.attention_in_projs(i)
            gate, up = adapter.mlp_in_projs(i)
            o, down = adapter.o_proj(i), adapter.down_proj(i)
            for mod, rows in ((q, self._q), (k, self._kv), (v, self._kv), (gate, self._ch), (up, self._ch)):
                self.handles.append(mod.base_layer.register_forward_hook(self._out_hook(i, rows)))
            for mod, cols in ((o, self._q), (down, self._ch)):
                self.handles.append(mod.base_layer.register_forward_pre_hook(self._in_hook(i, cols, "frozen")))
                self.handles.append(mod.register_forward_pre_hook(self._in_hook(i, cols, "full")))

    def _q(self, i):
        return self.units.q_rows(i, self.groups[i])

    def _kv(self, i):
        return self.units.kv_rows(self.groups[i])

    def _ch(self, i):
        return self.channels[i]

    def _out_hook(self, i, rows):
        def hook(module, args, output):
            if self.mode == "frozen":
                return output * rows(i).to(output.device, output.dtype)
            return None

        return hook

    def _in_hook(self, i, cols, mode):
        def hook(module, args):
            if self.mode == mode:
                return (args[0] * cols(i).to(args[0].device, args[0].dtype), *args[1:])
            return None

        return hook

    def set(self, groups, channels, mode: str | None) -> None:
        self.groups, self.channels, self.mode = list(groups), list(channels), mode

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def lora_unit_slices(adapter: DecoderAdapter, units: Units, i: int):
    """Layer i's LoRA tensors cut by unit: [(tensor, dim, width, per_unit)] for the KV groups and for the channels.
    A KV group owns B rows of q (its query heads), k and v and A columns of o; a channel owns B rows of gate and up
    and an A column of down. `tensor.narrow(dim, unit * width, width)` is that unit's slice."""
    q, k, v = adapter.attention_in_projs(i)
    gate, up = adapter.mlp_in_projs(i)
    qw, kvw = units.group_size[i] * units.head_dim, units.head_dim
    groups = [
        (lora_parts(q)[0], 0, qw),
        (lora_parts(k)[0], 0, kvw),
        (lora_parts(v)[0], 0, kvw),
        (lora_parts(adapter.o_proj(i))[1], 1, qw),
    ]
    channels = [(lora_parts(gate)[0], 0, 1), (lora_parts(up)[0], 0, 1), (lora_parts(adapter.down_proj(i))[1], 1, 1)]
    return groups, channels


def unit_norms(parts, n: int) -> torch.Tensor:
    """‖·‖₂ over each unit's slices of every tensor in `parts`: (n,)."""
    sq = 0
    for t, dim, w in parts:
        x = t.detach().float()
        x = x.reshape(n, w, -1) if dim == 0 else x.reshape(x.shape[0], n, w).transpose(0, 1)
        sq = sq + x.pow(2).flatten(1).sum(1)
    return torch.as_tensor(sq).sqrt()


@torch.no_grad()
def scale_units(parts, factor: torch.Tensor) -> None:
    """Multiply each unit's slices of every tensor in `parts` by factor[unit] (proximal steps, hard zeroing)."""
    for t, dim, w in parts:
        f = factor.to(t.device, t.dtype).repeat_interleave(w)
        t.mul_(f[:, None] if dim == 0 else f[None, :])


# --- checkpoints ---------------------------------------------------------------------------------------------


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state = {int(i): {k: tensors[f"{prefix}.{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


class Checkpoints:
    """One resumable state in `folder/state.safetensors`, valid only for the run whose fingerprint is `key`."""

    def __init__(self, folder: Path | None, key: str):
        self.folder, self.key = folder, key

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        if self.folder is None:
            return None
        saved = cache.load_tensors(self.folder / STATE_FILE)
        if saved is None or not isinstance(saved[1], dict) or saved[1].get("key") != self.key:
            return None
        return saved[0], saved[1]

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        cache.save_tensors(self.folder / STATE_FILE, tensors, {**meta, "key": self.key, "step": step})
        faults.point(f"train:{step}")


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


class Clock:
    """Training seconds summed over resumed runs, against the time budget."""

    def __init__(self, budget: float | None, spent: float = 0.0):
        self.budget, self.spent, self.started = budget, spent, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.started

    def over(self) -> bool:
        return self.budget is not None and self.elapsed >= self.budget


def planned_steps(options: TrainOptions, first_step_seconds: float, relative_cost: float = 1.0) -> int:
    """Steps to plan when only a time budget is given: what fits at the first step's speed (`relative_cost`: the
    mean cost of a step relative to the first one, for methods whose later steps are cheaper)."""
    if options.max_steps is not None:
        return options.max_steps
    return max(2, int(options.time_budget / max(first_step_seconds * relative_cost, 1e-6)))
