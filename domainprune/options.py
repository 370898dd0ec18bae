"""Training options, declared once: type, default, constraints and help text. `domainprune prune`'s training flags
(`--method atp|loraprune`, `--iterative N`) and `domainprune recover`'s options are generated from these declarations
(domainprune.cli), as prune's recipe options are from domainprune.stages; this module imports no torch, so the CLI
builds its options without it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


def train_option(default: Any, help: str, *, cli: bool = True, flags: tuple[str, ...] = (), **constraints: Any):
    """A training option; `cli`: also a command-line option (for TrainOptions: a flag of `prune`, else only
    `--train-opt KEY=VALUE`, a name that `prune`'s own options already use, such as seq_len); `flags`: its spelling
    (default --name-with-dashes)."""
    return Field(default, description=help, json_schema_extra={"cli": cli, "flags": list(flags)}, **constraints)


def cli_options(model: type[BaseModel]) -> dict[str, Any]:
    """name -> FieldInfo of `model`'s options that are command-line options."""
    return {n: f for n, f in model.model_fields.items() if (f.json_schema_extra or {}).get("cli")}


class TrainOptions(BaseModel):
    """Options every training-aware method takes (its own on top: `--train-opt KEY=VALUE`, docs/training-aware.md)."""

    model_config = {"extra": "forbid"}

    time_budget: float | None = train_option(
        600.0, "--method atp|loraprune, --iterative: seconds of training, summed over resumed runs (default 600).", gt=0
    )
    max_steps: int | None = train_option(
        None,
        "--method atp|loraprune, --iterative: training steps (default: what fits the time budget, sized after the "
        "first step).",
        ge=1,
    )
    save_steps: int = train_option(
        20,
        "--method atp|loraprune, --iterative: checkpoint every N steps; a killed run resumes there (default 20).",
        ge=1,
    )
    samples: int = train_option(256, "Training sequences from the domain's calibration split.", cli=False, ge=1)
    seq_len: int = train_option(128, "Tokens per training sequence.", cli=False, ge=4)
    batch_size: int = train_option(4, "Training sequences per step.", cli=False, ge=1)
    lr: float = train_option(
        2e-4,
        "--method atp|loraprune, --iterative: LoRA learning rate (AdamW, warm-up, then cosine to a tenth; "
        "default 2e-4).",
        gt=0,
    )
    warmup_steps: int = train_option(5, "--method atp|loraprune, --iterative: warm-up steps (default 5).", ge=0)
    lora_r: int = train_option(8, "--method atp|loraprune, --iterative: LoRA rank (default 8).", ge=1)
    lora_alpha: float = train_option(16.0, "--method atp|loraprune, --iterative: LoRA alpha (default 16).", gt=0)
    lora_dropout: float = train_option(
        0.05, "--method atp|loraprune, --iterative: LoRA dropout (default 0.05).", ge=0, lt=1
    )

    @model_validator(mode="after")
    def _check(self):
        if self.time_budget is None and self.max_steps is None:
            raise ValueError("give --time-budget or --max-steps: a training-aware method needs an end")
        return self


class IterativeOptions(TrainOptions):
    """`--iterative N`'s tune between stages: `time_budget` (or `max_steps`) is the total over all stages."""


LIGHT_PARTS = ("norms", "biases", "lora")  # what recover's --train may name (PERP)


class RecoveryConfig(BaseModel):
    """Everything that determines a recovery (`domainprune recover`, domainprune.recover). Saved beside the recovered
    model as recovery.json."""

    data: str = train_option("code", "Domain corpus: preset (code, general), file or folder.", flags=("--data", "-d"))
    text_field: str = train_option("text", "Field holding the text in .jsonl/.parquet/datasets corpora.")
    train_format: Literal["text", "sdd", "chat"] = train_option(
        "text",
        "text: corpus sequences; sdd: the dense model answers domain requests (for code, built from the corpus's "
        "documented functions, or --train-file) and the pruned model learns the answers; chat: --train-file "
        "prompt/response rows.",
    )
    train_file: str | None = train_option(None, 'JSONL: {"prompt"} rows (sdd) or {"prompt", "response"} rows (chat).')
    answer_tokens: int = train_option(256, "sdd: new tokens at most per teacher answer.", ge=1)
    teacher: str | None = train_option(
        None, "Dense model for KD / self-distillation / selection (default: the run's recipe.json model)."
    )
    full: bool = train_option(False, "Full fine-tuning instead of LoRA.", flags=("--full",))
    train: str | None = train_option(
        None,
        "PERP-style light recovery: train only these, comma-separated: norms (RMSNorm gains), biases (compensation "
        "and q/k/v biases), lora. Default: LoRA alone.",
        flags=("--train",),
    )
    lora_r: int = train_option(8, "LoRA rank.", ge=1)
    lora_alpha: float = train_option(16.0, "LoRA alpha.", gt=0)
    lora_dropout: float = train_option(0.05, "LoRA dropout.", ge=0, lt=1)
    kd_weight: float = train_option(0.0, "Weight w of the KD loss: (1-w)·CE + w·KD, in [0, 1].", ge=0, le=1)
    kd_temperature: float = train_option(2.0, "KD temperature T.", gt=0)
    kd_top_k: int | None = train_option(None, "KD over the teacher's top-k logits only (renormalised over them).", ge=1)
    self_distill: bool = train_option(
        False, "The teacher regenerates the second half of each training sequence first.", flags=("--self-distill",)
    )
    select: bool = train_option(
        False, "PASER-style selection of the worst-hit sequences from a larger pool.", flags=("--select",)
    )
    pool_factor: int = train_option(4, "--select: candidates scored = pool-factor × samples.", ge=1)
    clusters: int = train_option(8, "--select: k-means clusters.", ge=1)
    samples: int = train_option(
        256, "Training sequences (from the corpus's calibration split), or requests for sdd.", ge=1
    )
    seq_len: int | None = train_option(
        None, "Tokens per training sequence (default 128 for text, 512 for sdd/chat).", ge=4
    )
    batch_size: int = train_option(4, "Sequences per forward pass.", ge=1)
    grad_accum: int = train_option(1, "Gradient accumulation steps.", ge=1)
    lr: float | None = train_option(None, "Learning rate (default: 2e-4 LoRA, 2e-5 --full, 5e-4 --train).", gt=0)
    epochs: float = train_option(
        1.0, "Epochs over the training sequences (when --max-steps does not stop first).", gt=0
    )
    max_steps: int | None = train_option(60, "Optimiser steps at most (0: epochs decide).", ge=1)
    time_budget: float | None = train_option(
        600.0, "Seconds of training at most, over resumed runs too (0: none).", gt=0
    )
    warmup_steps: int = train_option(5, "Learning-rate warm-up steps.", ge=0)
    save_steps: int = train_option(
        20, "Checkpoint every N steps; an interrupted recovery resumes from the last one.", ge=1
    )
    seed: int = train_option(0, "Random seed.")
    device: str = train_option("auto", "auto, cpu, cuda or cuda:N.")

    @model_validator(mode="after")
    def _check(self) -> RecoveryConfig:
        if self.kd_top_k is not None and self.kd_weight == 0:
            raise ValueError("--kd-top-k needs --kd-weight > 0")
        if self.train_format != "text" and (self.self_distill or self.select):
            raise ValueError(
                f"--self-distill and --select work on raw text; drop them with --train-format {self.train_format}"
            )
        if self.train_format == "chat" and not self.train_file:
            raise ValueError("--train-format chat needs --train-file FILE.jsonl with prompt/response rows")
        if self.train is not None:
            parts = [p.strip() for p in self.train.split(",") if p.strip()]
            if not parts or set(parts) - set(LIGHT_PARTS):
                raise ValueError(
                    f"--train takes a comma-separated subset of {','.join(LIGHT_PARTS)}, not {self.train!r}"
                )
            if self.full:
                raise ValueError("--train trains a few parts; --full trains everything: give one of them")
            self.train = ",".join(p for p in LIGHT_PARTS if p in parts)
        if self.train_format == "text" and self.train_file:
            raise ValueError("--train-file needs --train-format sdd (prompts the dense model answers) or chat")
        return self

    @property
    def sequence_length(self) -> int:
        return self.seq_len or (128 if self.train_format == "text" else 512)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if self.full else 5e-4 if self.train is not None else 2e-4  # PERP's default for light retraining

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.self_distill or self.select or self.train_format == "sdd"
