"""Recovery: repair a pruned model on domain data (LoRA or full fine-tuning, optional distillation
from the dense model).

`recover()` is the Python API of `domainprune recover` (and of `domainprune prune --recover`). See docs/recovery.md.

Pipeline: load the pruned run -> training data in one of three formats (`train_format`):
- "text": sequences from the domain corpus (calibration split), with optional PASER-style selection (score by loss
  rise pruned vs dense, k-means on dense hidden states, spend the budget on the worst-hit clusters) and optional
  self-data distillation of raw text (the dense teacher regenerates each sequence's second half);
- "sdd": self-data distillation in the task's format (domainprune.task_data): requests built from the corpus (for
  code: each documented function's signature and docstring) or read from `train_file`, answered greedily by the
  dense teacher, trained on with the loss on the answers;
- "chat": the user's own instruction data (`train_file` with prompt/response rows), loss on the responses;
-> training
with `transformers.Trainer` (cross-entropy, plus KL to the teacher's logits with `kd_weight`) -> LoRA merged into the
weights -> `runfolder.save_pruned` (atomic, verified) with the same shapes as the pruned model.

Interrupted runs resume: Trainer checkpoints (every `save_steps`) and the prepared training data live in a staging
folder beside the output, `.<out name>.recovery/`, which is removed once the output is in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from . import cache, faults
from .errors import DomainpruneError
from .options import LIGHT_PARTS, RecoveryConfig  # noqa: F401  (declared there, without torch, for the CLI)

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOG_FILE = "recovery_log.json"
DATA_FILE = "recovery_data.safetensors"


def make_config(**kwargs: Any) -> RecoveryConfig:
    try:
        return RecoveryConfig(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise DomainpruneError(f"{loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}") from None


@dataclass
class RecoveryResult:
    model: torch.nn.Module  # the merged (plain) model
    tokenizer: Any
    config: RecoveryConfig
    out: Path | None = None
    log: list[dict[str, float]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


# --- losses --------------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Mean over (masked) positions of T² · KL(p_teacher^T ‖ p_student^T), the temperature-softened distributions.

    With `top_k`, only the teacher's k largest logits take part: both the teacher's and the student's logits are
    restricted to that set and renormalised over it (a softmax over the k logits), so the KL is between two
    distributions on the same k tokens; the teacher logits can then be kept as (values, indices) of size k.
    """
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    if top_k is not None and top_k < t.shape[-1]:
        t, idx = t.topk(top_k, dim=-1)
        s = s.gather(-1, idx)
    log_p = F.log_softmax(t, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    per_pos = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    if mask is None:
        return per_pos.mean()
    mask = mask.to(per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp_min(1)


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels -100 are ignored (labels are the input ids, shifted here)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# --- data ----------------------------------------------------------------------------------------------------


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, seqs: torch.Tensor, batch_size: int = 8, hidden: bool = False):
    """Per-sequence mean next-token loss (and, with `hidden`, the mean-pooled last hidden state)."""
    device = next(model.parameters()).device
    losses, pooled = [], []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size].to(device)
        out = model(input_ids=batch, use_cache=False, output_hidden_states=hidden)
        ce = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none").mean(1)
        losses.append(ce.cpu())
        if hidden:
            pooled.append(out.hidden_states[-1].float().mean(1).cpu())
    return torch.cat(losses), (torch.cat(pooled) if hidden else None)


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on the rows of `x` (k-means++ initialisation, seeded); returns a cluster index per row."""
    n = len(x)
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values.pow(2)
        if float(d2.sum()) <= 0:
            break
        centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centers)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(len(c)):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return assign


def allocate_budget(degradation: torch.Tensor, assign: torch.Tensor, budget: int) -> list[int]:
    """PASER, simplified: each cluster gets a share of `budget` proportional to its mean degradation (clamped at a
    small positive floor), capped at its size (the rest goes to the next worst clusters); within a cluster the
    most degraded sequences are taken first. Returns the chosen indices, worst cluster first."""
    clusters = sorted(assign.unique().tolist(), key=lambda c: -float(degradation[assign == c].mean()))
    members = {c: (assign == c).nonzero().flatten() for c in clusters}
    weight = {c: max(float(degradation[members[c]].mean()), 1e-6) for c in clusters}
    quota = {c: 0 for c in clusters}
    left = min(budget, len(degradation))
    while left > 0:
        open_ = [c for c in clusters if quota[c] < len(members[c])]
        total = sum(weight[c] for c in open_)
        shares = {c: left * weight[c] / total for c in open_}
        given = 0
        for c in open_:  # floors first, then the remainders to the worst clusters
            add = min(int(shares[c]), len(members[c]) - quota[c])
            quota[c] += add
            given += add
        for c in sorted(open_, key=lambda c: -(shares[c] - int(shares[c]))):
            if given >= left:
                break
            if quota[c] < len(members[c]):
                quota[c] += 1
                given += 1
        left -= given
    chosen = []
    for c in clusters:
        idx = members[c]
        chosen.extend(idx[degradation[idx].argsort(descending=True)[: quota[c]]].tolist())
    return chosen


def select_sequences(
    student, teacher, candidates: torch.Tensor, budget: int, clusters: int, batch_size: int, seed: int = 0
):
    """Indices of `budget` candidates chosen PASER-style, and a summary for recovery.json."""
    loss_s, _ = sequence_losses(student, candidates, batch_size)
    loss_t, pooled = sequence_losses(teacher, candidates, batch_size, hidden=True)
    degradation = loss_s - loss_t
    pooled = F.normalize(pooled, dim=-1)
    assign = kmeans(pooled, clusters, seed=seed)
    chosen = allocate_budget(degradation, assign, budget)
    summary = {
        "candidates": len(candidates),
        "selected": len(chosen),
        "mean_degradation_all": round(float(degradation.mean()), 4),
        "mean_degradation_selected": round(float(degradation[chosen].mean()), 4),
        "clusters": {
            int(c): {
                "size": int((assign == c).sum()),
                "mean_degradation": round(float(degradation[assign == c].mean()), 4),
                "selected": int(sum(1 for i in chosen if assign[i] == c)),
            }
            for c in assign.unique().tolist()
        },
    }
    return chosen, summary


@torch.no_grad()
def self_distill(
    teacher: torch.nn.Module, seqs: torch.Tensor, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-data distillation for plain text: keep each sequence's first half as the prompt and let the teacher
    regenerate the second half greedily (exactly as many tokens, EOS suppressed). Labels cover the regenerated
    half only (-100 on the prompt), as in supervised fine-tuning on responses."""
    device = next(teacher.parameters()).device
    half = seqs.shape[1] // 2
    new = seqs.shape[1] - half
    eos = getattr(teacher.generation_config, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    out = []
    for start in range(0, len(seqs), batch_size):
        prompt = seqs[start : start + batch_size, :half].to(device)
        gen = teacher.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        out.append(gen[:, : seqs.shape[1]].cpu())
    ids = torch.cat(out)
    labels = ids.clone()
    labels[:, :half] = -100
    return ids, labels


# --- training ------------------------------------------------------------------------------------------------


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    class RecoveryTrainer(Trainer):
        """Trainer with CE + temperature-softened KL to a frozen teacher (not part of the saved model)."""

        def __init__(self, *args, teacher=None, config: RecoveryConfig, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.rconfig = teacher, config
            # compute_loss returns each micro-batch's mean, so Trainer must divide by the accumulation steps (it would
            # not: the model's forward takes **kwargs, which Trainer reads as "the loss is normalised already")
            self.loss_is_scaled_for_ga = False
            self._parts = {"ce": 0.0, "kd": 0.0, "n": 0}
            self.time_offset, self.started = 0.0, time.perf_counter()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], use_cache=False)
            ce = causal_ce(outputs.logits, labels)
            loss = ce
            w = self.rconfig.kd_weight
            kd = torch.zeros(())
            if w > 0 and self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=inputs["input_ids"], use_cache=False).logits
                mask = labels[:, 1:] != -100
                kd = kd_loss(
                    outputs.logits[:, :-1],
                    t_logits[:, :-1],
                    mask,
                    temperature=self.rconfig.kd_temperature,
                    top_k=self.rconfig.kd_top_k,
                )
                loss = (1 - w) * ce + w * kd
            if model.training:
                self._parts["ce"] += float(ce.detach())
                self._parts["kd"] += float(kd.detach())
                self._parts["n"] += 1
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                n = max(self._parts["n"], 1)
                logs["ce"] = round(self._parts["ce"] / n, 6)
                logs["kd"] = round(self._parts["kd"] / n, 6)
                logs["elapsed"] = round(self.time_offset + time.perf_counter() - self.started, 3)
                self._parts = {"ce": 0.0, "kd": 0.0, "n": 0}
            super().log(logs, start_time)

    class Progress(TrainerCallback):
        """Writes recovery_log.json (step, loss, lr, elapsed, ce, kd) on every log and stops at the time budget.

        The log is rebuilt from Trainer's log_history, which a resumed run restores from its checkpoint, so after
        a resume the curve continues from the checkpoint's step. Elapsed time adds up over resumed runs."""

        def __init__(self, trainer, path: Path, budget: float | None):
            self.trainer, self.path, self.budget = trainer, path, budget

        def on_train_begin(self, args, state, control, **kwargs):
            previous = [e["elapsed"] for e in state.log_history if "elapsed" in e]
            self.trainer.time_offset = previous[-1] if previous else 0.0
            self.trainer.started = time.perf_counter()

        def elapsed(self) -> float:
            return self.trainer.time_offset + time.perf_counter() - self.trainer.started

        def on_step_end(self, args, state, control, **kwargs):
            spent = self.budget is not None and self.elapsed() >= self.budget
            if args.world_size > 1:  # every process stops at the same step, or the others wait in the next all-reduce
                flag = torch.tensor([float(spent)], device=args.device)
                spent = bool(self.trainer.accelerator.reduce(flag, reduction="sum").item())
            if spent:
                log.info("time budget of %.0f s spent at step %d; stopping", self.budget, state.global_step)
                control.should_training_stop = True
                self.trainer.stopped_by_budget = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            write_log(self.path, training_log(state.log_history))

        def on_save(self, args, state, control, **kwargs):
            faults.point(f"recovery:{state.global_step}")

    return RecoveryTrainer, Progress


def training_log(history: list[dict]) -> list[dict]:
    return [
        {
            "step": e["step"],
            "loss": e["loss"],
            "lr": e.get("learning_rate"),
            "elapsed": e.get("elapsed"),
            "ce": e.get("ce"),
            "kd": e.get("kd"),
        }
        for e in history
        if "loss" in e and "step" in e
    ]


def write_log(path: Path, entries: list[dict]) -> None:
    cache.atomic_write_bytes(path, (json.dumps(entries, indent=1) + "\n").encode())


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Full names of the q/k/v/o/gate/up/down Linear modules that exist and have non-zero width."""
    names = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(module, torch.nn.Linear):
            if module.in_features > 0 and module.out_features > 0:
                names.append(name)
    return names


def _is_norm(module: torch.nn.Module) -> bool:
    # RMSNorm classes are per architecture (LlamaRMSNorm, Qwen3RMSNorm, Gemma3RMSNorm, ...): match the name, not a list
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def norm_names(model: torch.nn.Module) -> set[str]:
    """Last name parts of the model's norm modules (input_layernorm, q_norm, norm, ...), as peft's modules_to_save."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_norm(m)}


def light_parameters(model: torch.nn.Module, parts: set[str]) -> list[torch.nn.Parameter]:
    """The norms' gains and every bias (compensation biases, q/k/v biases, removed sublayers' biases)."""
    out = []
    if "norms" in parts:
        out += [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)]
    if "biases" in parts:
        out += [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
    return out


def trained_counts(model: torch.nn.Module, parts: set[str]) -> dict[str, int]:
    """Trainable parameters by kind, and of the whole model (shared tensors once)."""
    counts = {"norms": 0, "biases": 0, "lora": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "lora" if "lora_" in name else "biases" if name.rsplit(".", 1)[-1] == "bias" else "norms"
        counts[kind] += p.numel()
    counts["total"] = sum(counts.values())
    counts["model"] = sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    )
    return counts


def _vocab(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_teacher(student, student_tok, teacher, teacher_tok, name: str) -> None:
    sv, tv = _vocab(student), _vocab(teacher)
    if sv != tv:
        raise DomainpruneError(
            f"teacher {name!r} has a vocabulary of {tv:,} tokens but the pruned model has {sv:,}; "
            "distillation needs the model the run was pruned from (same tokenizer)"
        )
    if student_tok is not None and teacher_tok is not None:
        # the token -> id maps, not the tokenizer classes: a saved run may reload under another tokenizer class
        if student_tok.get_vocab() != teacher_tok.get_vocab():
            raise DomainpruneError(
                f"teacher {name!r} uses a different tokenizer from the pruned model; give the dense model it was "
                "pruned from"
            )


def _load_run(run_dir: Path, device: str):
    from .models import LoadedModel, load_model

    if isinstance(run_dir, LoadedModel):
        return run_dir
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DomainpruneError(f"run folder {run_dir} not found; give the --out folder of `domainprune prune`")
    if not (run_dir / "config.json").is_file():
        raise DomainpruneError(f"{run_dir} has no config.json; give the --out folder of `domainprune prune`")
    return load_model(run_dir, dtype="float32", device=device)


def recover(
    run: str | Path | Any,
    *,
    out: str | Path,
    teacher: str | Path | Any | None = None,
    force: bool = False,
    verify: bool = True,
    keep_checkpoints: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
    in_place: bool = False,
    **config_fields: Any,
) -> RecoveryResult:
    """Recover the pruned model in `run` (a run folder or a LoadedModel) on `data`; write a plain checkpoint to `out`.

    `teacher` is the dense model (a path/preset, or a LoadedModel / module); by default the run's recipe.json
    `model`, loaded only when KD, self-distillation or selection needs it. `out` must not be or hold an input (the
    run folder included) unless `in_place` (what `prune --recover` uses for the run it has just written); the run's
    plan/recipe/report files are carried over in any case. Config fields: see RecoveryConfig.
    """
    from .models import LoadedModel, load_model, resolve_device
    from .outputs import check_output, local_inputs
    from .runfolder import RUN_FILES, save_pruned

    if isinstance(teacher, (str, Path)):
        config_fields["teacher"] = str(teacher)
    config = make_config(**config_fields)
    out = Path(out)
    run_dir = None if isinstance(run, LoadedModel) else Path(run)
    same_folder = run_dir is not None and out.resolve() == run_dir.resolve()
    if not (same_folder and in_place):  # in place only for `prune --recover`, whose run this is
        check_output(out, force=force, inputs=local_inputs(run_dir, config.data, config.teacher, config.train_file))
    loaded = _load_run(run, config.device)
    student, tokenizer = loaded.model, loaded.tokenizer
    device = resolve_device(config.device)
    student.to(device)
    extra = {}
    if run_dir is not None:
        extra = {n: (run_dir / n).read_text() for n in RUN_FILES if (run_dir / n).is_file()}

    # The dense teacher: only loaded when something needs it.
    t_model = t_tok = None
    t_name = None
    t_home = None  # a caller's teacher goes back to its own device afterwards; one loaded here is dropped
    if config.needs_teacher:
        if teacher is None or isinstance(teacher, (str, Path)):
            t_name = config.teacher
            if t_name is None and "recipe.json" in extra:
                t_name = json.loads(extra["recipe.json"]).get("model")
            if not t_name:
                raise DomainpruneError("distillation and selection need the dense model: give --teacher")
            t = load_model(t_name, dtype="float32", device=str(device))
            t_model, t_tok = t.model, t.tokenizer
        elif isinstance(teacher, LoadedModel):
            t_model, t_tok, t_name = teacher.model, teacher.tokenizer, teacher.source
        else:
            t_model, t_name = teacher, "teacher"
        check_teacher(student, tokenizer, t_model, t_tok, t_name)
        if teacher is not None and not isinstance(teacher, (str, Path)):
            t_home = next(t_model.parameters()).device
        t_model.to(device).eval().requires_grad_(False)

    staging = out.parent / f".{out.name}.recovery"
    staging.mkdir(parents=True, exist_ok=True)
    fingerprint = cache.fingerprint(config.model_dump(exclude={"max_steps", "time_budget", "save_steps", "device"}))
    started = time.perf_counter()
    report: dict[str, Any] = {}
    data_path = staging / DATA_FILE
    saved = cache.load_tensors(data_path)
    meta = saved[1] if saved is not None and isinstance(saved[1], dict) else {}
    if meta.get("fingerprint") == fingerprint and {"input_ids", "labels"} <= set(saved[0]):
        input_ids, labels, report = saved[0]["input_ids"], saved[0]["labels"], meta["report"]
        log.info("resuming: reusing the prepared recovery data in %s", staging)
    else:
        # A staging folder from a different recovery holds checkpoints that do not apply: start clean.
        for ckpt in staging.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
        (staging / LOG_FILE).unlink(missing_ok=True)
        try:
            input_ids, labels, report = prepare_data(config, student, tokenizer, t_model, staging, progress)
        except BaseException:
            if not (staging / ANSWERS_FILE).is_file():  # teacher answers are worth resuming; nothing else is yet
                shutil.rmtree(staging, ignore_errors=True)
            raise
        cache.save_tensors(
            data_path, {"input_ids": input_ids, "labels": labels}, {"fingerprint": fingerprint, "report": report}
        )
    report["data_seconds"] = round(time.perf_counter() - started, 2)

    model = student
    parts = set(config.train.split(",")) if config.train else {"lora"}
    if config.full:
        student.requires_grad_(True)
    elif "lora" in parts:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(student)
        if not targets:
            raise DomainpruneError("the pruned model has no q/k/v/o/gate/up/down projections for LoRA; use --full")
        # PERP with LoRA: peft trains and checkpoints the norms (modules_to_save) and biases (bias="all") beside it
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias="all" if "biases" in parts else "none",
            task_type="CAUSAL_LM",
            modules_to_save=sorted(norm_names(student)) if "norms" in parts else None,
        )
        torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here: same seed, same weights
        model = get_peft_model(student, lora)
    else:  # norms and/or biases alone: the plain model with everything else frozen (Trainer checkpoints it whole)
        student.requires_grad_(False)
        for p in light_parameters(student, parts):
            p.requires_grad_(True)
    if config.train:
        report["trained_params"] = trained_counts(model, parts)
        if report["trained_params"]["total"] == 0:
            raise DomainpruneError(
                f"--train {config.train}: this model has none of those parameters (e.g. no biases "
                "without bias compensation); add norms or lora"
            )
    model.train()

    from transformers import TrainingArguments

    RecoveryTrainer, Progress = _trainer_classes()
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(staging),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        bf16=use_bf16,
        use_cpu=device.type == "cpu",
    )
    trainer = RecoveryTrainer(
        model=model,
        args=args,
        train_dataset=SequenceDataset(input_ids, labels),
        teacher=t_model,
        config=config,
    )
    trainer.stopped_by_budget = False
    report["distributed"] = check_sharding(trainer.accelerator)
    if t_model is not None:
        t_model.to(args.device)  # under `accelerate launch` / torchrun: this process's device
    trainer.add_callback(Progress(trainer, staging / LOG_FILE, config.time_budget))
    if not progress:  # Trainer prints every log dict to stdout when its bars are off
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    for cb in callbacks or []:
        trainer.add_callback(cb)
    has_checkpoint = any(staging.glob("checkpoint-*/trainer_state.json"))
    if has_checkpoint:
        log.info("resuming recovery from the last checkpoint in %s", staging)
    trained = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    train_seconds = time.perf_counter() - trained
    entries = training_log(trainer.state.log_history)
    write_log(staging / LOG_FILE, entries)

    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.eval()
    if t_model is not None and t_home is not None:
        t_model.to(t_home)
    trainer.teacher = t_model = None
    report.update(
        {
            "steps": trainer.state.global_step,
            "resumed": has_checkpoint,
            "stopped_by_time_budget": trainer.stopped_by_budget,
            "train_seconds": round(train_seconds, 2),
            "train_loss": round(float(output.training_loss), 6) if output.training_loss is not None else None,
            "first_loss": entries[0]["loss"] if entries else None,
            "last_loss": entries[-1]["loss"] if entries else None,
            "teacher": t_name,
            "trainable": "full" if config.full else config.train or f"lora r={config.lora_r} alpha={config.lora_alpha}",
            "processes": trainer.args.world_size,  # data-parallel processes (accelerate launch / torchrun)
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    if run_dir is not None and (run_dir / "recipe.yaml").is_file():  # the run's recipe, with this recovery after it
        extra["recipe.yaml"] = recipe_with_recovery((run_dir / "recipe.yaml").read_text(), config)
    files = {
        **extra,
        "recovery.json": json.dumps({"config": config.model_dump(), "report": report}, indent=1) + "\n",
        LOG_FILE: json.dumps(entries, indent=1) + "\n",
    }
    result = RecoveryResult(merged, tokenizer, config, out=out, log=entries, report=report)
    # under `accelerate launch` / torchrun every process holds the same merged weights: the first one writes them
    if trainer.is_world_process_zero():
        result.out = save_pruned(merged, tokenizer, out, extra_files=files, force=force or same_folder, verify=verify)
        if not keep_checkpoints:
            shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return result


def check_sharding(accelerator) -> str:
    """How the processes train (accelerate's distributed type, e.g. NO, MULTI_CPU, MULTI_GPU), before any step.

    Weight sharding (FSDP, DeepSpeed ZeRO-3) is refused: each process would merge LoRA into its own shard and the first
    would write that shard as the model (gathering the full state dict first is not implemented; docs/recovery.md).
    `accelerate launch --use_fsdp` on CPUs is not FSDP at all: accelerate 1.15 turns FSDP on only for GPU-type
    devices and trains the CPU processes data-parallel (DDP over gloo), which is said in a warning."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = accelerator.state.deepspeed_plugin if kind == DistributedType.DEEPSPEED else None
    if kind == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3):
        raise DomainpruneError(
            "recover does not gather weights sharded by FSDP or ZeRO-3 before merging and writing them: launch it "
            "data-parallel instead (accelerate launch --multi_gpu, or DeepSpeed --zero_stage 2)"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        log.warning(
            "accelerate launch --use_fsdp: accelerate shards with FSDP on GPUs only; these processes train "
            "data-parallel instead (%s), each holding the whole model",
            kind.value,
        )
    return kind.value


def recipe_with_recovery(text: str, config: RecoveryConfig) -> str:
    """recipe.yaml's text with `recover:` recording `config` (options that differ from their defaults), so that
    `domainprune prune --recipe` replays pruning and this recovery."""
    import yaml

    head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text) or {}
    data["recover"] = config.model_dump(exclude_defaults=True)
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def prepare_data(
    config: RecoveryConfig, student, tokenizer, teacher, staging: Path | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training sequences (input ids, labels) in the configured format, and a summary for recovery.json."""
    if config.train_format != "text":
        return task_format_data(config, tokenizer, teacher, staging, progress)
    from .data import load_corpus

    corpus = load_corpus(config.data, text_field=config.text_field)
    report: dict[str, Any] = {"format": "text"}
    if config.select:
        stream = corpus.token_stream(tokenizer, "calibration")
        pool = min(config.samples * config.pool_factor, len(stream) // config.sequence_length)
        candidates = corpus.sequences(
            tokenizer, "calibration", max(pool, 1), config.sequence_length, samples_option="--samples"
        )
        was_training = student.training
        student.eval()
        chosen, report["selection"] = select_sequences(
            student, teacher, candidates, config.samples, config.clusters, config.batch_size, config.seed
        )
        student.train(was_training)
        seqs = candidates[chosen]
    else:
        seqs = corpus.sequences(
            tokenizer, "calibration", config.samples, config.sequence_length, samples_option="--samples"
        )
    if config.self_distill:
        t0 = time.perf_counter()
        input_ids, labels = self_distill(teacher, seqs, config.batch_size)
        report["self_distill_seconds"] = round(time.perf_counter() - t0, 2)
    else:
        input_ids, labels = seqs.clone(), seqs.clone()
    report["sequences"] = len(input_ids)
    report["tokens"] = int(input_ids.numel())
    return input_ids, labels, report


ANSWERS_FILE = "answers.json"
ANSWER_CHUNK = 64  # teacher answers saved after every chunk, so an interrupted run keeps what it generated


def teacher_answers(
    config: RecoveryConfig,
    prompts: list[str],
    tokenizer,
    teacher,
    staging: Path | None,
    stop_after_code_block: bool,
    progress: bool,
) -> list[str]:
    """The dense teacher's greedy answers to `prompts`, resumed from `staging/answers.json` when it matches."""
    from .generation import default_batch, greedy_answers
    from .task_data import chat_prompt, is_chat

    key = cache.fingerprint(
        {"prompts": prompts, "tokens": config.answer_tokens, "teacher": config.teacher, "stop": stop_after_code_block}
    )
    path = staging / ANSWERS_FILE if staging is not None else None
    saved = cache.load_json(path) if path is not None else None
    answers: list[str] = saved["answers"] if isinstance(saved, dict) and saved.get("key") == key else []
    if answers:
        log.info("resuming: %d of %d teacher answers already written", len(answers), len(prompts))
    for first in range(len(answers), len(prompts), ANSWER_CHUNK):
        batch = max(config.batch_size, default_batch(teacher))
        chunk = [(chat_prompt(tokenizer, p), "") for p in prompts[first : first + ANSWER_CHUNK]]
        got = greedy_answers(
            teacher,
            tokenizer,
            chunk,
            config.answer_tokens,
            batch_size=batch,
            add_special_tokens=not is_chat(tokenizer),
            stop_after_code_block=stop_after_code_block,
            progress=progress,
            desc=f"teacher answers {first + len(chunk)}/{len(prompts)}",
        )
        answers += [text for text, _ in got]
        if path is not None:
            cache.save_json(path, {"key": key, "answers": answers})
        faults.point(f"answers:{len(answers)}")
    return answers


def task_format_data(config: RecoveryConfig, tokenizer, teacher, staging: Path | None, progress: bool):
    """sdd: requests (from train_file, else built from the corpus's code) answered by the teacher; chat: the
    train_file's prompt/response pairs. Sequences are right-padded to the longest, labels `IGNORE` off the answer."""
    from .data import load_corpus
    from .task_data import IGNORE, code_prompts, read_jsonl, sample, training_example

    report: dict[str, Any] = {"format": config.train_format}
    t0 = time.perf_counter()
    if config.train_format == "chat":
        rows = sample(read_jsonl(config.train_file, response=True), config.samples, config.seed)
        pairs = [(r["prompt"], r["response"]) for r in rows]
    else:
        if config.train_file:
            prompts = [r["prompt"] for r in read_jsonl(config.train_file, response=False)]
            report["prompts_from"] = str(config.train_file)
        else:
            prompts = code_prompts(load_corpus(config.data, text_field=config.text_field))
            report["prompts_from"] = f"documented functions in {config.data!r} (calibration split)"
            if not prompts:
                raise DomainpruneError(
                    f"corpus {config.data!r} has no documented Python functions to build requests from; give "
                    '--train-file FILE.jsonl with one {"prompt": ...} per line (or use --train-format text)'
                )
        report["prompts_available"] = len(prompts)
        prompts = sample(prompts, config.samples, config.seed)
        answers = teacher_answers(
            config, prompts, tokenizer, teacher, staging, stop_after_code_block=not config.train_file, progress=progress
        )
        pairs = list(zip(prompts, answers))
        report["answer_seconds"] = round(time.perf_counter() - t0, 2)
    examples = [training_example(tokenizer, p, a, config.sequence_length) for p, a in pairs]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise DomainpruneError(f"every request is longer than --seq-len {config.sequence_length}; raise --seq-len")
    width = max(len(ids) for ids, _ in kept)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(kept), width), pad, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(kept):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
    report.update(
        sequences=len(kept),
        skipped_too_long=len(examples) - len(kept),
        answer_tokens_trained=int((labels != IGNORE).sum()),
        tokens=int(input_ids.numel()),
    )
    return input_ids, labels, report
