"""A recipe as an ordered list of stages, each a pydantic model declaring its own options (defaults, help text) and
refusing its own bad combinations; the CLI options of `prune`/`plan` are generated from these declarations, and every
run folder's `recipe.yaml` is a `StagedRecipe` that `domainprune prune --recipe` replays (docs/recipes.md).

The pipeline itself runs the flat `domainprune.pipeline.Recipe`: every option here names the flat field it fills
(`flat`), `StagedRecipe.fields()` gives the flat keyword arguments and `StagedRecipe.of()` the stages of a flat recipe.
Results written by planning (calib_kl, search_kl, predicted_speedup) are not options: they go to report.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DomainpruneError

EXPERTS_KEEP_MISSING = (
    "method {method!r} prunes mixture-of-experts experts: give --experts-keep (experts kept per layer, e.g. 4, "
    "or a fraction such as 0.5)"
)
RESULTS = ("calib_kl", "search_kl", "predicted_speedup")  # written by planning: report.json's "planning"
ENCODER_UNITS = ("all", "ffn")  # sentence encoders: heads + FFN channels, or FFN channels only (every head kept)
# --deploy: what the serving stack runs (../shared/SERVING.md; domainprune.pipeline.fit_deploy). transformers and
# vLLM load stock checkpoints, whose layers are all alike (`export --to vllm` writes vLLM's DeciLM form for per-layer
# MLP widths); llama.cpp runs every Llama/Qwen2 plan through its `deci` architecture (domainprune.gguf_export), but
# Qwen3, Gemma 3 and MoE models only with equal layers (checked once the model is loaded).
DEPLOY_TARGETS = ("transformers", "llamacpp", "vllm")
STOCK_TARGETS = ("transformers", "vllm")
RECONSTRUCTIONS = ("obs", "none")


def _criterion(method: str | None) -> Any:
    """The registered criterion of `method`; None for no method (the default recipe, checked once it is resolved) or
    a name that is not a criterion (training-aware and encoder methods; an unknown name is refused when resolved)."""
    from .criteria import CRITERIA  # imported here: the CLI builds its options without torch

    return CRITERIA[method] if method in CRITERIA else None


def _trains(method: str | None) -> bool:
    """A training-aware method (domainprune.training_aware): it decides its units while it tunes."""
    from .training_aware import TRAINING_METHODS

    return method in TRAINING_METHODS


def option(
    default: Any,
    help: str,
    *,
    flat: str | None = None,
    flags: tuple[str, ...] = (),
    cli: str | None = "",
    record: bool = False,
    **constraints: Any,
):
    """A stage option: `flat` names the Recipe field it fills (default: its own name), `flags` its CLI spelling
    (default: --flat-name), `cli` "count" for a 90M-style count, None for no CLI option; `record`: always in
    recipe.json (else only where it differs from the default)."""
    extra = {"flat": flat, "flags": list(flags), "cli": cli, "record": record}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def _flat(name: str, info: Any) -> str:
    """The flat Recipe field an option fills."""
    return (info.json_schema_extra or {}).get("flat") or name


class Section(BaseModel):
    """A group of options; unknown options are refused (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")
    key: ClassVar[str]
    title: ClassVar[str]
    nested: ClassVar[tuple[str, ...]] = ()  # fields that are option groups of their own (method-specific options)

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        """(own name, flat name, FieldInfo) of every option, nested groups' included."""
        out = []
        for name, info in cls.model_fields.items():
            if name in cls.nested:
                out += cls.group(name).options()
            else:
                out.append((name, _flat(name, info), info))
        return out

    @classmethod
    def group(cls, name: str) -> type[Section]:
        """The options model of nested group `name` (its field is `Model | None`)."""
        return next(t for t in cls.model_fields[name].annotation.__args__ if t is not type(None))

    @classmethod
    def of(cls, flat: dict[str, Any]):
        """This section from flat Recipe fields; None where none of its options is set."""
        values = {}
        for name, info in cls.model_fields.items():
            if name in cls.nested:
                group = cls.group(name).of(flat)
                if group is not None:
                    values[name] = group
            elif flat.get(_flat(name, info)) is not None:
                values[name] = flat[_flat(name, info)]
        return cls(**values) if values else None

    def fields(self) -> dict[str, Any]:
        """The flat Recipe fields this section fills."""
        out = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if name in self.nested:
                out |= value.fields() if value is not None else {}
            else:
                out[_flat(name, info)] = value
        return out

    def dump(self) -> dict[str, Any]:
        """What recipe.yaml holds: the options that are set (None means the method's default)."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = value.dump() if isinstance(value, Section) else value
        return out


class Input(Section):
    key, title = "input", "Input"
    model: str = option(
        "smollm2-135m",
        "Preset (smollm2-135m, qwen2.5-coder-0.5b; sentence encoder: all-minilm-l6-v2), "
        "HF folder, .gguf file or hub id.",
        flags=("--model", "-m"),
        record=True,
    )
    data: str = option(
        "code", "Domain corpus: preset (code, general), file or folder.", flags=("--data", "-d"), record=True
    )
    text_field: str = option("text", "Field holding the text in .jsonl/.parquet/datasets corpora.", record=True)
    dtype: str = option("auto", "auto, float32, bfloat16 or float16.", record=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", record=True)


class Budget(Section):
    key, title = "budget", "Budget"
    sparsity: float | None = option(None, "Fraction of attention+MLP parameters to remove, in [0, 1).", record=True)
    target_params: int | None = option(
        None, "Total parameters wanted instead of --sparsity, e.g. 90M.", cli="count", record=True
    )
    target_speedup: float | None = option(
        None,
        "Latency budget instead of --sparsity/--target-params: e.g. 1.5 prunes the least that a latency table "
        "measured on this machine (cached) predicts to run 1.5× faster than the dense model; the pruned and dense "
        "models are then measured and compared (report.json).",
    )
    speedup_phase: str = option(
        "decode",
        "--target-speedup: decode (batch 1, one token at a time) or prefill (batch 1, --prefill-tokens tokens).",
    )
    prefill_tokens: int = option(256, "--target-speedup: prompt length the prefill phase is timed at.", ge=1)
    deploy: str | None = option(
        None,
        "Serving stack the output must run on: transformers or vllm (every layer alike: uniform allocation), "
        "llamacpp (anything; export with `domainprune export --to gguf`). The default recipe adapts to it.",
    )

    @model_validator(mode="after")
    def _check(self) -> Budget:
        from .latency import PHASES as SPEEDUP_PHASES  # imported here: the CLI builds its options without torch

        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ValueError(
                "--target-speedup must be above 1 (e.g. 1.5 for 1.5× the dense model's speed), got "
                f"{self.target_speedup}"
            )
        if self.speedup_phase not in SPEEDUP_PHASES:  # what the latency table times
            raise ValueError(f"--speedup-phase must be one of {', '.join(SPEEDUP_PHASES)}, not {self.speedup_phase!r}")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.deploy is not None and self.deploy not in DEPLOY_TARGETS:
            raise ValueError(f"--deploy must be one of {', '.join(DEPLOY_TARGETS)}, not {self.deploy!r}")
        return self

    def dump(self) -> dict[str, Any]:
        out = super().dump()
        if self.target_speedup is None:  # the latency budget's own options
            out = {k: v for k, v in out.items() if k not in ("speedup_phase", "prefill_tokens")}
        return out

    @staticmethod
    def check_deploy(recipe: Any, allocation: str | None) -> None:
        """What a stock --deploy target cannot load, with the method's allocation filled in (when resolved)."""
        if recipe.deploy not in STOCK_TARGETS:
            return
        if allocation not in ("uniform", None):
            raise DomainpruneError(
                f"--deploy {recipe.deploy} runs checkpoints whose layers are all alike: use "
                f"--allocation uniform (not {allocation}), or --deploy llamacpp"
            )
        if "finercut" in (recipe.method, recipe.depth):
            raise DomainpruneError(
                f"--deploy {recipe.deploy} cannot run layers without attention or MLP "
                "(finercut): use --depth shortgpt, or --deploy llamacpp"
            )

    def given(self) -> list[str]:
        return [n for n in ("sparsity", "target_params", "target_speedup") if getattr(self, n) is not None]


class Calibration(Section):
    key, title = "calibration", "Calibration"
    samples: int = option(128, "Calibration sequences.", flat="calib_samples", ge=1, record=True)
    seq_len: int = option(256, "Tokens per sequence.", ge=2, record=True)
    batch_size: int = option(8, "Sequences per forward pass.", ge=1, record=True)
    seed: int = option(0, "Random seed.", record=True)
    general_data: str | None = option(
        None,
        "General corpus (preset, file or folder): dpruner/gaprune's second stream (default: the `general` preset), "
        "and the source of --general-ratio.",
    )
    general_ratio: float = option(
        0.0,
        "Fraction of the calibration sequences taken from general data (one-stream criteria), in [0, 1].",
        ge=0,
        le=1,
    )
    candidates: int = option(
        1,
        "NIRVANA-style selection: prune with K calibration subsets, keep the lowest KL(dense‖pruned) on held-out "
        "validation data.",
        flat="calib_candidates",
        ge=1,
    )
    candidate: int = option(
        0, "Which calibration subset this recipe uses (set by the selection).", flat="calib_candidate", cli=None, ge=0
    )

    @model_validator(mode="after")
    def _check(self) -> Calibration:
        if self.candidate >= self.candidates:
            raise ValueError(f"calib_candidate {self.candidate} is not below calib_candidates {self.candidates}")
        return self

    def dump(self) -> dict[str, Any]:
        out = super().dump()
        return out if self.candidates > 1 else {k: v for k, v in out.items() if k != "candidate"}


class Stage(Section):
    """One step of the pipeline; `STAGES` lists them in the order they run."""


class Hidden(Stage):
    key, title = "hidden", "Hidden stage"
    sparsity: float = option(
        ...,
        "Also remove this fraction of the residual-stream (hidden) channels in every layer, e.g. 0.1 (part of "
        "--sparsity: it removes that fraction of every attention/MLP weight, the width method the rest). Exports a "
        "stock config.",
        flat="hidden_sparsity",
        gt=0,
        lt=1,
    )


class Depth(Stage):
    key, title = "depth", "Depth stage"
    method: str | None = option(
        None,
        "Depth pruning before the width --method: shortgpt (whole layers) or finercut (attention/MLP sublayers); "
        "with --depth-sparsity.",
        flat="depth",
    )
    sparsity: float | None = option(
        None,
        "With --depth: the part of the budget (fraction of attention+MLP parameters) removed by depth; the width "
        "method removes the rest.",
        flat="depth_sparsity",
        ge=0,
        lt=1,
    )

    @model_validator(mode="after")
    def _check(self) -> Depth:
        if self.method is None:
            raise ValueError("give --depth and --depth-sparsity together, e.g. --depth shortgpt --depth-sparsity 0.1")
        criterion = _criterion(self.method)
        if criterion is None or not criterion.depth:
            from .criteria import CRITERIA

            names = ", ".join(sorted(n for n, c in CRITERIA.items() if c.depth))
            raise ValueError(f"--depth must be a depth method ({names}), not {self.method!r}")
        return self

    @classmethod
    def of(cls, flat: dict[str, Any]):
        if flat.get("depth") is None and flat.get("depth_sparsity") is None:
            return None
        return cls(method=flat.get("depth"), sparsity=flat.get("depth_sparsity"))


class GradientOptions(Section):
    key, title = "gradient", "Width stage"
    micro_batch: int | None = option(
        None, "Gradient criteria: sequences per forward+backward (default: 1, per-sample Fisher).", ge=1
    )
    gradient_checkpointing: bool = option(
        False,
        "Gradient criteria: recompute activations in backward to save memory.",
        flags=("--gradient-checkpointing",),
    )
    taylor_mode: str | None = option(None, "taylor: vector |Σ W·g| (default), element Σ|W·g| or param_mix.")

    @model_validator(mode="after")
    def _check(self) -> GradientOptions:
        from .criteria.gradient import TAYLOR_MODES

        if self.taylor_mode is not None and self.taylor_mode not in TAYLOR_MODES:
            raise ValueError(f"--taylor-mode must be one of {', '.join(TAYLOR_MODES)}, not {self.taylor_mode!r}")
        return self

    @classmethod
    def of(cls, flat: dict[str, Any]):
        given = flat.get("micro_batch") is not None or flat.get("gradient_checkpointing") or flat.get("taylor_mode")
        return super().of(flat) if given else None


class SearchOptions(Section):
    key, title = "search", "Width stage"
    generations: int | None = option(
        None,
        "--allocation search: generations per round (default: 8; 4 with --reconstruct obs).",
        flat="search_generations",
        ge=1,
    )
    offspring: int | None = option(
        None,
        "--allocation search: offspring per generation (default: 16; 8 with --reconstruct obs).",
        flat="search_offspring",
        ge=1,
    )
    rounds: int | None = option(
        None,
        "--allocation search: coarse-to-fine rounds, step halved each (default: 3; 2 with --reconstruct obs).",
        flat="search_rounds",
        ge=1,
    )
    samples: int | None = option(
        None,
        "--allocation search: held-out validation sequences for the KL fitness (default: 32; 16 with --reconstruct "
        "obs).",
        flat="search_samples",
        ge=1,
    )
    task_weight: float | None = option(
        None,
        "--allocation search --reconstruct obs: weight of the task-format KL (the dense model's answers to requests "
        "built from the corpus, docs/allocation.md) in the fitness (default: 0, domain text only).",
        flat="search_task_weight",
        ge=0,
    )


class TrainingOptions(Section):
    key, title = "training", "Width stage"
    iterative: int | None = option(
        None,
        "Prune in N stages (Adapt-Pruner) with the --method criterion, a short LoRA tune on --data after each "
        "(docs/training-aware.md).",
        ge=2,
    )
    # the training methods' own options (domainprune.training_aware: time budget, steps, LoRA rank, ...); on the
    # command line --time-budget, --max-steps, --save-steps and --train-opt KEY=VALUE
    train: dict[str, Any] | None = option(None, "Training options.", cli=None)


class Width(Stage):
    key, title = "width", "Width stage"
    nested = ("gradient", "search", "training")
    method: str | None = option(
        None,
        "Default: the benchmark's best recipe, cfsp with --reconstruct obs (flap where that cannot apply, e.g. "
        "mixture-of-experts models; a line says so). Importance criterion: flap, wanda-sp, magnitude, cfsp, obs, "
        "taylor, fisher, dpruner, gaprune, nirvana; depth: shortgpt, finercut; for MoE experts: expert-frequency, "
        "easy-ep, tcess. Sentence encoders (docs/embeddings.md): magnitude, wanda-sp (default), flap, fisher, "
        "gaprune, shrp; shortgpt (whole layers).",
        record=True,
    )
    allocation: str | None = option(
        None,
        "uniform, global, nirvana-ratio, owl, adapt, cfsp or search (default: global for flap, nirvana-ratio for "
        "nirvana, cfsp for cfsp, else uniform).",
        record=True,
    )
    attention_unit: str = option(
        "kv_group", "kv_group (whole KV groups) or query_head (same count per group).", record=True
    )
    encoder_units: str = option(
        "all",
        "Sentence encoders only: all (attention heads and FFN channels) or ffn (every head kept, FFN channels only: "
        "the best code-retrieval recipe with --allocation global, docs/embeddings.md).",
    )
    round_to: int | None = option(
        None,
        "Round every layer's kept MLP width to a multiple of this (64 or 128 for fast GPU kernels); the budget is "
        "then met to within half a multiple per layer.",
        ge=1,
    )
    bias_compensation: bool | None = option(
        None,
        "FLAP bias compensation (default: on for flap).",
        flags=("--bias-compensation/--no-bias-compensation",),
        record=True,
    )
    reconstruct: str | None = option(
        None,
        "obs: refit the kept o_proj/down_proj columns by least squares on the calibration data, layer by layer "
        "(structured OBS); none: off (default: obs for method obs, else none).",
    )
    gradient: GradientOptions | None = None
    search: SearchOptions | None = None
    training: TrainingOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> Width:
        from .allocation import ALLOCATIONS, ATTENTION_UNITS

        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; available: {', '.join(sorted(ALLOCATIONS))}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"--attention-unit must be one of {', '.join(ATTENTION_UNITS)}")
        if self.encoder_units not in ENCODER_UNITS:
            raise ValueError(f"--encoder-units must be one of {', '.join(ENCODER_UNITS)}, not {self.encoder_units!r}")
        if self.reconstruct not in (None, *RECONSTRUCTIONS):
            raise ValueError(f"--reconstruct must be obs or none, not {self.reconstruct!r}")
        if self.search is not None and self.allocation not in (None, "search"):
            raise ValueError(f"search options (--search-*) need --allocation search, not {self.allocation}")
        criterion = _criterion(self.method)
        if criterion is not None and criterion.depth:
            if self.allocation is not None:
                raise ValueError(
                    f"method {self.method!r} removes whole layers/sublayers; --allocation applies to width methods, "
                    "leave it out"
                )
            if self.reconstruct not in (None, "none"):
                raise ValueError(
                    f"method {self.method!r} removes layers without reconstruction; leave out --reconstruct"
                )
        if criterion is not None and self.search is not None and self.search.task_weight:
            allocation = self.allocation or criterion.default_allocation
            if allocation != "search" or (self.reconstruct or criterion.default_reconstruct) != "obs":
                raise ValueError("--search-task-weight needs --allocation search --reconstruct obs; leave it out")
        self._check_training()
        return self

    def _check_training(self) -> None:
        """A training-aware method decides its own units; training options need one (or --iterative)."""
        training = self.training or TrainingOptions()
        if _trains(self.method):
            what = f"--method {self.method}"
            if training.iterative:
                raise ValueError(
                    f"--iterative runs a width criterion in stages; {what} decides while it trains: give one of them"
                )
            gradient = self.gradient or GradientOptions()
            for name, value in (
                ("allocation", self.allocation),
                ("reconstruct", self.reconstruct),
                ("bias_compensation", self.bias_compensation),
                ("taylor_mode", gradient.taylor_mode),
                ("micro_batch", gradient.micro_batch),
            ):
                if value not in (None, False):
                    raise ValueError(f"{what} decides its own units and widths; leave out --{name.replace('_', '-')}")
        elif training.train is not None and not training.iterative:
            raise ValueError(
                "training options (--time-budget, --max-steps, --save-steps, --train-opt) need "
                "--method atp, --method loraprune or --iterative N"
            )
        else:
            return
        from .training_aware import train_options

        try:
            train_options(self.method, training.iterative, training.train)
        except DomainpruneError as e:
            raise ValueError(str(e)) from None

    def trains(self) -> str | None:
        """How this stage names its training-aware pruning in messages (None: it has none)."""
        if _trains(self.method):
            return f"--method {self.method}"
        if self.training is not None and self.training.iterative:
            return f"--iterative {self.training.iterative}"
        return None

    @staticmethod
    def check_method(recipe: Any, criterion: Any, reconstruct: str | None) -> None:
        """The width method's own combinations, from its registered capabilities (when the recipe is resolved)."""
        if criterion.chooses_units:
            if reconstruct != "obs":
                raise DomainpruneError(f"method {recipe.method!r} always reconstructs; leave out --reconstruct none")
            if (recipe.allocation or criterion.default_allocation) != "uniform":
                raise DomainpruneError(
                    f"method {recipe.method!r} fills each layer's uniform budget greedily; use --allocation uniform "
                    "(or another method with --reconstruct obs)"
                )
        if reconstruct == "obs" and criterion.scores_experts:
            raise DomainpruneError(
                "--reconstruct obs refits dense heads and MLP channels, not experts; leave it out with an expert method"
            )


class Experts(Stage):
    key, title = "experts", "Experts stage"
    method: str | None = option(None, "Expert method (expert-frequency, easy-ep, tcess).", cli=None)
    keep: int | float | None = option(
        None,
        "MoE models: routed experts kept per layer, a count (4) or a fraction (0.5); with an expert method.",
        flat="experts_keep",
        cli="float",
    )

    @model_validator(mode="after")
    def _check(self) -> Experts:
        if self.keep is None:
            raise ValueError(EXPERTS_KEEP_MISSING.format(method=self.method))
        if not (0 < self.keep < 1 or float(self.keep).is_integer() and self.keep >= 1):
            raise ValueError(f"--experts-keep must be a whole count ≥ 1 or a fraction in (0, 1), got {self.keep}")
        if self.keep >= 1:
            self.keep = int(self.keep)
        return self

    @staticmethod
    def check_method(recipe: Any, criterion: Any) -> None:
        """Experts need an expert method and it nothing else (when the recipe is resolved: registered capabilities)."""
        if criterion.scores_experts:
            if recipe.experts_keep is None:
                raise DomainpruneError(EXPERTS_KEEP_MISSING.format(method=recipe.method))
            if recipe.sparsity or recipe.target_params is not None:
                raise DomainpruneError(
                    f"method {recipe.method!r} scores experts only; leave out --sparsity and --target-params"
                )
            if recipe.hidden_sparsity:
                raise DomainpruneError(
                    f"method {recipe.method!r} scores experts only; prune hidden channels in a second run"
                )
        elif recipe.experts_keep is not None:
            raise DomainpruneError(
                f"--experts-keep needs an expert method (expert-frequency, easy-ep, tcess), not {recipe.method!r}; to "
                "prune experts and channels, run prune twice: experts first (docs/moe.md)"
            )

    @classmethod
    def of(cls, flat: dict[str, Any]):
        return None if flat.get("experts_keep") is None else cls(method=flat.get("method"), keep=flat["experts_keep"])


class Vocab(Stage):
    key, title = "vocab", "Vocab stage"
    coverage: float | None = option(
        None,
        "Then trim the vocabulary to the tokens covering this fraction of the domain's calibration tokens, e.g. "
        "0.999 (as `domainprune vocab`).",
        flat="vocab_coverage",
        gt=0,
        le=1,
    )
    size: int | None = option(
        None,
        "Then trim the vocabulary to exactly this many tokens (as `domainprune vocab --size`).",
        flat="vocab_size",
        ge=1,
    )

    @model_validator(mode="after")
    def _check(self) -> Vocab:
        if self.coverage is not None and self.size is not None:
            raise ValueError("give at most one of --vocab-coverage and --vocab-size")
        return self


SECTIONS: tuple[type[Section], ...] = (Input, Budget, Calibration)
STAGES: tuple[type[Stage], ...] = (Hidden, Depth, Width, Experts, Vocab)  # the order they run in


def _depth_alone(method: str | None) -> bool:
    from .criteria import CRITERIA

    return bool(method) and method in CRITERIA and CRITERIA[method].depth


class StagedRecipe(BaseModel):
    """A whole recipe: input, budget and calibration settings, then the stages in the order they run."""

    model_config = ConfigDict(extra="forbid")
    input: Input = Input()
    budget: Budget = Budget()
    calibration: Calibration = Calibration()
    stages: list[Stage] = []
    # then `domainprune recover` on the output, with these options (domainprune.options.RecoveryConfig); recorded by
    # `recover RUN` in the run's recipe.yaml, run by `prune --recipe` after the pruning stages
    recover: dict[str, Any] | None = None
    # then an export beside the output: {"to": exporter name, its options...} (domainprune.exporters), as prune's
    # --export; recorded by prune --export in the run's recipe.yaml
    export: dict[str, Any] | None = None

    def stage(self, kind: type[Stage]) -> Stage | None:
        return next((s for s in self.stages if isinstance(s, kind)), None)

    @model_validator(mode="after")
    def _check(self) -> StagedRecipe:
        """The combinations that span stages."""
        kinds = [type(s) for s in self.stages]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"stage {kind.key!r} appears {kinds.count(kind)} times; give it once")
        if kinds != sorted(kinds, key=STAGES.index):
            raise ValueError(f"stages run in the order {', '.join(k.key for k in STAGES)}; reorder them")
        if Width in kinds and Experts in kinds:
            raise ValueError(
                "a width stage and an experts stage do not combine in one run: run prune twice, experts first "
                "(docs/moe.md)"
            )
        budget, depth, hidden = self.budget, self.stage(Depth), self.stage(Hidden)
        given = budget.given()
        experts_alone = self.stage(Experts) is not None and budget.sparsity is None
        if len(given) != 1 and not experts_alone:
            width = self.stage(Width)
            if not given and width is not None:
                from .criteria import CRITERIA

                if width.method in CRITERIA and CRITERIA[width.method].scores_experts:
                    raise ValueError(EXPERTS_KEEP_MISSING.format(method=width.method))
            got = f" (got {' and '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of sparsity, target_params and target_speedup{got}")
        if depth is not None and depth.sparsity is None and self.stage(Width) is not None:
            raise ValueError("give --depth and --depth-sparsity together, e.g. --depth shortgpt --depth-sparsity 0.1")
        for stage, option in ((depth, "--depth-sparsity"), (hidden, "--hidden-sparsity")):
            if stage is not None and stage.sparsity is not None and budget.sparsity is not None:
                if stage.sparsity > budget.sparsity:
                    raise ValueError(
                        f"{option} {stage.sparsity} is part of --sparsity {budget.sparsity}; it cannot be larger"
                    )
        self._check_depth()
        self._check_speedup()
        self._check_training()
        return self

    def _width(self) -> tuple[Width | None, Any, str | None, str | None]:
        """The width stage, its criterion, and its allocation and reconstruction with the method's defaults."""
        width = self.stage(Width)
        criterion = _criterion(width.method) if width is not None else None
        if width is None:
            return None, None, None, None
        allocation = width.allocation or (criterion.default_allocation if criterion is not None else None)
        reconstruct = width.reconstruct or (criterion.default_reconstruct if criterion is not None else None)
        return width, criterion, allocation, reconstruct

    def _check_depth(self) -> None:
        """A depth stage before a width stage: the width method prunes widths, with an allocation that can spend
        the rest of the budget, and no reconstruction yet."""
        from .depth import DEPTH_ALLOCATIONS

        width, criterion, allocation, reconstruct = self._width()
        if self.stage(Depth) is None or criterion is None:
            return
        if criterion.depth:
            raise ValueError(
                f"method {width.method!r} already prunes depth; give --depth with a width method (e.g. --method flap)"
            )
        if criterion.scores_experts:
            raise ValueError("--depth cannot be combined with an expert method")
        if criterion.chooses_units or reconstruct not in (None, "none"):
            raise ValueError("--depth cannot be combined with --reconstruct obs yet; leave one of them out")
        if allocation not in DEPTH_ALLOCATIONS:
            raise ValueError(f"--depth needs --allocation global or uniform for the width part, not {allocation!r}")

    def _check_speedup(self) -> None:
        """--target-speedup budgets attention and MLP widths at the full hidden size, solved by bisection."""
        if self.budget.target_speedup is None:
            return
        width, criterion, allocation, _ = self._width()
        experts, depth = self.stage(Experts), self.stage(Depth)
        if experts is not None or (criterion is not None and criterion.scores_experts):
            method = experts.method if experts is not None else width.method
            raise ValueError(
                f"--target-speedup budgets attention and MLP widths; method {method!r} removes whole experts "
                "(--experts-keep): leave --target-speedup out"
            )
        if depth is not None and width is None:
            raise ValueError(
                f"--target-speedup needs a width method, not the depth method {depth.method!r}; give depth beside "
                f"one, e.g. --method flap --depth {depth.method} --depth-sparsity 0.1"
            )
        if allocation == "search":
            raise ValueError(
                "--target-speedup cannot be combined with --allocation search (it searches at one parameter budget); "
                "use uniform, global, nirvana-ratio, owl, adapt or cfsp"
            )
        if self.stage(Hidden) is not None:
            raise ValueError("--target-speedup times blocks at the full hidden size; leave out --hidden-sparsity")

    def _check_training(self) -> None:
        """Training-aware pruning (a training method or --iterative) spends a --sparsity on widths alone."""
        width, experts = self.stage(Width), self.stage(Experts)
        what = width.trains() if width is not None else None
        if experts is not None and _trains(experts.method):
            what = f"--method {experts.method}"
        if what is None:
            return
        for given, option in (
            (self.stage(Depth), "--depth"),
            (self.stage(Hidden), "--hidden-sparsity"),
            (experts, "--experts-keep"),
            (self.budget.target_speedup, "--target-speedup"),
            (self.budget.target_params, "--target-params"),
        ):
            if given is not None:
                raise ValueError(f"{what} does not combine with {option}; give --sparsity alone")
        if self.budget.sparsity is None:
            raise ValueError(f"{what} needs --sparsity (the fraction of attention+MLP parameters removed)")
        if self.calibration.candidates > 1:
            raise ValueError(f"{what} does not combine with --calib-candidates")

    def fields(self) -> dict[str, Any]:
        """The flat `Recipe` keyword arguments (domainprune.prune's) of this recipe."""
        out: dict[str, Any] = {}
        for part in (self.input, self.budget, self.calibration, *self.stages):
            out |= part.fields()
        depth, width = self.stage(Depth), self.stage(Width)
        if depth is not None and width is None:  # a depth method alone: it is the run's method, over the whole budget
            out["method"], out["depth"], out["depth_sparsity"] = out.pop("depth"), None, None
        return out

    @classmethod
    def of(cls, flat: dict[str, Any]) -> StagedRecipe:
        """The stages of flat Recipe fields (a dict or a Recipe). A --target-speedup recipe that planning solved
        (predicted_speedup recorded) becomes the sparsity it solved for: replayed, it gives the same weights
        anywhere."""
        if isinstance(flat, BaseModel):
            flat = dict(flat)
        if flat.get("target_speedup") is not None and flat.get("predicted_speedup") is not None:
            flat = {**flat, "target_speedup": None}  # solved: its sparsity is the budget
        flat = {k: v for k, v in flat.items() if k not in RESULTS}
        stages: list[Stage] = []
        method = flat.get("method")
        if flat.get("hidden_sparsity") is not None:
            stages.append(Hidden(sparsity=flat["hidden_sparsity"]))
        if flat.get("experts_keep") is not None:
            stages.append(Experts.of(flat))
        elif _depth_alone(method) and flat.get("depth") is None and flat.get("depth_sparsity") is None:
            stages.append(Depth(method=method, sparsity=None))
        if stages and isinstance(stages[-1], (Experts, Depth)):
            width = Width.of(flat)  # its options' own checks still apply to what a flat recipe gives (unused here)
            if width is not None and width.training is not None and width.training.iterative:
                what = "--experts-keep" if isinstance(stages[-1], Experts) else f"the depth method {method!r}"
                raise ValueError(f"--iterative {width.training.iterative} does not combine with {what}")
        else:
            depth = Depth.of(flat)
            stages += [depth] if depth is not None else []
            stages.append(Width.of(flat) or Width())
        vocab = Vocab.of(flat)
        stages += [vocab] if vocab is not None else []
        return cls(
            input=Input.of(flat) or Input(),
            budget=Budget.of(flat) or Budget(),
            calibration=Calibration.of(flat) or Calibration(),
            stages=stages,
        )

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {part.key: part.dump() for part in (self.input, self.budget, self.calibration)}
        out["stages"] = [{s.key: s.dump()} for s in self.stages]
        if self.recover is not None:
            out["recover"] = self.recover
        if self.export is not None:
            out["export"] = self.export
        return out

    def to_yaml(self) -> str:
        import yaml

        head = "# domainprune recipe: `domainprune prune --recipe THIS_FILE --out DIR` replays it (docs/recipes.md)\n"
        return head + yaml.safe_dump(self.dump(), sort_keys=False, allow_unicode=True)


def _section(kind: type[Section], where: str, values: Any) -> Section:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise DomainpruneError(f"{where}: expected a mapping of options, got {values!r}")
    names = list(kind.model_fields)
    for name in values:
        if name not in names:
            raise DomainpruneError(f"{where}: unknown option {name!r}; options: {', '.join(names)}")
    for name in kind.nested:
        if name in values:
            values = {
                **values,
                name: _section(kind.group(name), f"{where}.{name}", values[name]),
            }
    return _validated(kind, where, values)


def _validated(kind: type[BaseModel], where: str, values: dict) -> BaseModel:
    try:
        return kind(**values)
    except ValidationError as e:
        raise DomainpruneError(_one_line(e, where)) from None


def _one_line(e: ValidationError, where: str = "") -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return ": ".join(p for p in (where, loc, err["msg"].removeprefix("Value error, ")) if p)


def parse_recipe(data: Any, where: str = "recipe") -> StagedRecipe:
    """A StagedRecipe from recipe.yaml's contents; an unknown section, stage or option or a bad combination is refused
    in one line naming it."""
    if not isinstance(data, dict):
        raise DomainpruneError(f"{where}: expected a mapping with input, budget, calibration and stages")
    known = {k.key: k for k in SECTIONS}
    for name in data:
        if name not in (*known, "stages", "recover", "export"):
            sections = ", ".join([*known, "stages", "recover", "export"])
            raise DomainpruneError(f"{where}: unknown section {name!r}; sections: {sections}")
    parts: dict[str, Any] = {k: _section(known[k], f"{where} {k}", data.get(k)) for k in known}
    stages = []
    kinds = {k.key: k for k in STAGES}
    for i, entry in enumerate(data.get("stages") or []):
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise DomainpruneError(f"{where} stage {i + 1}: write it as `- NAME: {{options}}`, got {entry!r}")
        ((name, values),) = entry.items()
        if name not in kinds:
            raise DomainpruneError(f"{where}: unknown stage {name!r}; stages: {', '.join(kinds)}")
        stages.append(_section(kinds[name], f"{where} stage {name}", values))
    recover = _recover_section(f"{where} recover", data["recover"]) if "recover" in data else None
    export = _export_section(f"{where} export", data["export"]) if "export" in data else None
    try:
        return StagedRecipe(**parts, stages=stages, recover=recover, export=export)
    except ValidationError as e:
        raise DomainpruneError(_one_line(e, where).replace(f"{where}: stages: ", f"{where}: ")) from None


def _recover_section(where: str, values: Any) -> dict[str, Any]:
    """recipe.yaml's `recover:` options, checked as `domainprune recover` checks them (one line naming a bad one)."""
    from .options import RecoveryConfig

    values = values or {}
    if not isinstance(values, dict):
        raise DomainpruneError(f"{where}: expected a mapping of options, got {values!r}")
    for name in values:
        if name not in RecoveryConfig.model_fields:
            known = ", ".join(RecoveryConfig.model_fields)
            raise DomainpruneError(f"{where}: unknown option {name!r}; options: {known}")
    _validated(RecoveryConfig, where, values)
    return values


def _export_section(where: str, values: Any) -> dict[str, Any]:
    """recipe.yaml's `export:` (`to: NAME` and the exporter's options), checked as `domainprune export` checks them."""
    if not isinstance(values, dict) or not isinstance(values.get("to"), str):
        raise DomainpruneError(f"{where}: expected `to: NAME` (an exporter, e.g. gguf) and its options, got {values!r}")
    export_stage(values, where)
    return values


def export_stage(values: dict[str, Any], where: str = "export") -> Any:
    """The exporters.ExportStage of an `export:` section; an unknown exporter or option is refused in one line."""
    from .exporters import EXPORTERS, ExportStage
    from .exporters.base import options_of

    try:
        exporter = EXPORTERS.lookup(values["to"])()
        options = options_of(exporter, {k: v for k, v in values.items() if k != "to"})
    except DomainpruneError as e:
        raise DomainpruneError(f"{where}: {e}") from None
    return ExportStage(exporter, options)


def load_recipe(path: str | Path) -> StagedRecipe:
    """Read a recipe.yaml (domainprune prune --recipe)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DomainpruneError(f"--recipe {path}: no such file; give a recipe.yaml, e.g. a run folder's")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DomainpruneError(f"--recipe {path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_recipe(data, str(path))


def recipe_files(recipe: Any) -> dict[str, str]:
    """A run folder's recipe files: recipe.yaml (the stages; `prune --recipe` replays it) and recipe.json (the flat,
    resolved record, with what planning recorded, that compare/recover/eval read)."""
    return {"recipe.yaml": StagedRecipe.of(recipe).to_yaml(), "recipe.json": recipe.model_dump_json(indent=1) + "\n"}


def planning_results(recipe: Any) -> dict[str, Any]:
    """What planning recorded on the recipe (report.json's "planning"); the default recipe's choice too."""
    out = {k: getattr(recipe, k) for k in RESULTS if getattr(recipe, k) is not None}
    if recipe.target_speedup is not None and recipe.predicted_speedup is not None:
        out["solved_sparsity"] = recipe.sparsity  # recipe.yaml replays this sparsity
    if recipe.default_recipe:
        out["default_recipe"] = True  # no --method given: the default (or its fallback) chose it
    return out


def flat_fields() -> dict[str, tuple[Any, Any]]:
    """The flat Recipe's fields (domainprune.pipeline.Recipe), one per flat name, generated from the declarations:
    type and constraints as declared, a required stage option optional there (its stage may be absent)."""
    out: dict[str, tuple[Any, Any]] = {}
    for kind in (*SECTIONS, *STAGES):
        for _, flat, info in kind.options():
            if flat in out:  # the experts stage's method is the width stage's `method`
                continue
            kind_ = info.annotation | None if info.is_required() else info.annotation
            default = None if info.is_required() else info.default
            hide = None if info.json_schema_extra["record"] else (lambda v, d=default: v == d)
            typed = Annotated[(kind_, *info.metadata)] if info.metadata else kind_
            out[flat] = (typed, Field(default, exclude_if=hide))
    return out


def check_flat(recipe: Any) -> None:
    """Run the stage checks on a flat Recipe (pipeline.Recipe's validator); raises ValueError with the message."""
    try:
        StagedRecipe.of(recipe)
    except ValidationError as e:
        raise ValueError(_one_line(e)) from None


def cli_options() -> list[tuple[str, str, Any, type[Section]]]:
    """(flat name, own name, FieldInfo, section) of every option that is a CLI option of prune/plan, in help order."""
    out = []
    for kind in (Input, Width, Budget, Depth, Hidden, Experts, Calibration, Vocab):
        for name, flat, info in kind.options():
            if (info.json_schema_extra or {}).get("cli", "") is not None:
                out.append((flat, name, info, kind))
    return out


def options_markdown() -> str:
    """docs/recipes.md's option tables, from the declarations (tests/test_recipes.py keeps the doc equal to it)."""
    lines = []
    for kind in (*SECTIONS, *STAGES):
        lines += [f"#### `{kind.key}`", "", "| option | CLI | default | meaning |", "|---|---|---|---|"]
        for name, info in kind.model_fields.items():
            if name in kind.nested:
                group = kind.group(name)
                rows = [(f"{name}.{n}", f, i) for n, f, i in group.options()]
            else:
                rows = [(name, _flat(name, info), info)]
            for own, flat, field in rows:
                extra = field.json_schema_extra or {}
                flag = (
                    (extra.get("flags") or [f"--{flat.replace('_', '-')}"])[0]
                    if extra.get("cli", "") is not None
                    else ""
                )
                default = "required" if field.is_required() else "" if field.default is None else f"`{field.default}`"
                text = (field.description or "").replace("|", "\\|")
                lines.append(f"| `{own}` | {f'`{flag}`' if flag else ''} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)
