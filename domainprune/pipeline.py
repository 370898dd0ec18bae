"""The planning core: recipe -> statistics -> scores -> plan -> surgery.

`make_plan()` and `apply()` are the two halves that `domainprune plan` and `domainprune apply` run separately, so a
plan can be read and edited in between; `domainprune.run.prune()` (the Python API of `domainprune prune`, exported as
`domainprune.prune`) runs both and writes the run folder, handing over to streamed or training-aware pruning.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, create_model, model_validator

from .adapters import DecoderAdapter, get_adapter
from .allocation import (
    align_counts,
    align_widths,
    allocate,
    allocation_needs_statistics,
    budget_tolerance,
    cfsp_mlp_fraction,
    keep_top_experts,
    max_width_sparsity,
    uniform_counts,
    uniform_layer,
)
from .criteria import CRITERIA, get_criterion
from .criteria.depth import depth_stage
from .criteria.gradient import GradientContext
from .data import load_corpus
from .depth import plan_frozen, zero_removed
from .errors import DomainpruneError
from .evaluate import parameter_count
from .models import LoadedModel
from .plan import Plan, dense_plan, validate_plan
from .stages import (
    STOCK_TARGETS,
    Budget,
    Experts,
    Width,
    check_flat,
    flat_fields,
    planning_results,
)
from .stats import collect_statistics, derived
from .surgery import apply_plan, finish, prune_layer
from .training_aware import TRAINING_METHODS, is_training, train_options

log = logging.getLogger(__name__)


# With no --method, `prune` and `plan` run the best recipe of the benchmark (README, "Which method by default"):
# cfsp + OBS has the lowest domain perplexity of every baseline at 20/35/50 % on SmolLM2 and no lower zero-shot
# accuracy (bench/results/quality.md), and ties the best baseline on MBPP pass@1 on Qwen2.5-Coder at 35 %
# (bench/results/skill.md). Where it cannot apply, FALLBACK_METHOD runs instead, and a log line says why.
DEFAULT_RECIPE = {"method": "cfsp", "reconstruct": "obs"}
FALLBACK_METHOD = "flap"
# the default where every layer must keep the same widths: no biases, so every family's stock config holds it
# (README "Which method by default": best uniform perplexity without biases; zero-shot rule met at 20 and 35 % only)
DEFAULT_UNIFORM_RECIPE = {"method": "cfsp", "allocation": "uniform", "reconstruct": "obs"}


class RecipeBase(BaseModel):
    """Everything that determines a pruned model, as one flat record: saved beside it as recipe.json (recipe.yaml holds
    the same as stages). The option fields are generated from the stages' declarations (`Recipe` below,
    domainprune.stages); declared here is only what resolution and planning record."""

    default_recipe: bool = Field(False, exclude_if=lambda v: not v)  # the method was not given: the default chose it
    # written by planning, not options (report.json's "planning"; not in recipe.yaml): a solved --target-speedup's
    # prediction (`sparsity` then holds the solution), the calibration candidates' KL, --allocation search's KL
    predicted_speedup: float | None = Field(default=None, exclude_if=lambda v: v is None)
    calib_kl: list[float] | None = Field(default=None, exclude_if=lambda v: v is None)
    search_kl: list[float] | None = Field(default=None, exclude_if=lambda v: v is None)  # uniform start, result

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        check_flat(self)  # each stage's own checks, and those spanning stages (domainprune.stages)
        if self.experts_keep is not None and self.experts_keep >= 1:
            self.experts_keep = int(self.experts_keep)
        return self

    def fallback(self, why: str) -> "Recipe":
        """The recipe with FALLBACK_METHOD in place of the default one, which cannot apply for reason `why`."""
        log.warning("the default recipe (cfsp + OBS) cannot apply: %s; running method %s instead", why, FALLBACK_METHOD)
        stock = self.deploy in STOCK_TARGETS  # uniform widths, and no biases most stock configs lack
        undo = {
            "method": FALLBACK_METHOD,
            "default_recipe": True,
            "reconstruct": None,
            "bias_compensation": False if stock else None,
            "allocation": ("uniform" if stock else None) if self.allocation in (None, "cfsp") else self.allocation,
        }
        return self.model_copy(update=undo).resolved()

    def search_defaults(self, reconstruct: str | None = None) -> dict[str, int]:
        from .search import SearchSettings
        from .tyr import RECONSTRUCT_DEFAULTS

        d = SearchSettings(**(RECONSTRUCT_DEFAULTS if reconstruct == "obs" else {}))
        return {
            "search_generations": self.search_generations or d.generations,
            "search_offspring": self.search_offspring or d.offspring,
            "search_rounds": self.search_rounds or d.rounds,
            "search_samples": self.search_samples or d.samples,
        }

    def checked(self) -> "Recipe":
        """The stages' checks again (domainprune.stages), on a copy that pydantic did not validate (model_copy)."""
        try:
            check_flat(self)
        except ValueError as e:
            raise DomainpruneError(str(e)) from None
        return self

    def resolved(self) -> "Recipe":
        """Fill the method-dependent defaults so the saved recipe says exactly what ran."""
        self.checked()  # the default recipe and the fallback are copies
        if self.encoder_units != "all":
            raise DomainpruneError("--encoder-units applies to sentence encoders only; drop it for a decoder")
        if self.method is None:
            best = DEFAULT_UNIFORM_RECIPE if self.deploy in STOCK_TARGETS else DEFAULT_RECIPE
            best = {
                **best,
                "reconstruct": self.reconstruct or best["reconstruct"],
                "allocation": self.allocation or best.get("allocation"),
            }
            try:
                return self.model_copy(update={**best, "default_recipe": True}).resolved()
            except DomainpruneError as e:
                return self.fallback(str(e))
        if self.method in TRAINING_METHODS:
            return self.model_copy(update={"train": train_options(self.method, None, self.train)})
        criterion = get_criterion(self.method)
        Experts.check_method(self, criterion)
        gradient = criterion.needs_gradients
        reconstruct = self.reconstruct or criterion.default_reconstruct
        Width.check_method(self, criterion, reconstruct)
        stock = self.deploy in STOCK_TARGETS
        depth_method = criterion.depth
        allocation = self.allocation or (None if depth_method else "uniform" if stock else criterion.default_allocation)
        Budget.check_deploy(self, allocation)
        train = train_options(self.method, self.iterative, self.train) if self.iterative else None
        return self.model_copy(
            update={
                "train": train,
                "reconstruct": None if reconstruct == "none" else reconstruct,
                "micro_batch": self.micro_batch or (1 if gradient else None),
                "taylor_mode": self.taylor_mode or ("vector" if self.method == "taylor" else None),
                "allocation": allocation,
                **(self.search_defaults(reconstruct) if allocation == "search" else {}),
                "bias_compensation": criterion.default_bias_compensation
                if self.bias_compensation is None
                else self.bias_compensation,
            }
        )


Recipe = create_model("Recipe", __base__=RecipeBase, __module__=__name__, **flat_fields())


def search_context(loaded: LoadedModel, recipe: Recipe, sequences: torch.Tensor, stats: list[dict], progress: bool):
    """The dense model, held-out validation sequences of the domain and the settings `--allocation search` uses."""
    from . import cache
    from .search import SEARCH_VERSION, SearchContext, SearchSettings
    from .stats import model_fingerprint, tensor_fingerprint

    held_out = load_corpus(recipe.data, text_field=recipe.text_field).sequences(
        loaded.tokenizer, "validation", recipe.search_samples, recipe.seq_len, samples_option="--search-samples"
    )
    settings = SearchSettings(
        generations=recipe.search_generations,
        offspring=recipe.search_offspring,
        rounds=recipe.search_rounds,
        batch_size=recipe.batch_size,
    )
    key = cache.fingerprint(
        "search",
        SEARCH_VERSION,
        model_fingerprint(loaded.model),
        tensor_fingerprint(sequences),
        tensor_fingerprint(held_out),
        recipe.method,
        recipe.sparsity,
        recipe.target_params,
        recipe.attention_unit,
        recipe.bias_compensation,
        recipe.seed,
        recipe.taylor_mode,
        recipe.general_ratio,
        repr(settings),
    )
    means = [derived(s) for s in stats] if recipe.bias_compensation else None
    context = SearchContext(loaded.model, held_out, settings, means, key, seed=recipe.seed, progress=progress)
    if recipe.reconstruct == "obs":  # judge candidates after their refit (domainprune.tyr)
        from .tyr import reconstruction

        context.reconstruction = reconstruction(loaded, recipe, sequences, progress)
        context.cache_key = cache.fingerprint(key, context.reconstruction.key)
    return context


def make_recipe(**kwargs: Any) -> Recipe:
    """Build a Recipe, turning validation errors into one-line DomainpruneErrors."""
    from pydantic import ValidationError

    try:
        return Recipe(**kwargs).resolved()
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise DomainpruneError(f"{loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}") from None


def target_sparsity(recipe: Recipe, adapter: DecoderAdapter, total_params: int) -> float:
    if recipe.sparsity is not None:
        return recipe.sparsity
    if recipe.target_speedup is not None:  # solved in _make_plan_once (domainprune.latency); depth's part meanwhile
        return recipe.depth_sparsity or 0.0
    if recipe.target_params is None:  # expert pruning alone (experts_keep)
        return 0.0
    attn_mlp = sum(adapter.layer_params(s) for s in adapter.shapes())
    kept = hidden_kept_fraction(recipe, adapter)
    fixed = round((total_params - attn_mlp) * kept)  # embeddings, LM head, norms: they shrink with the hidden size
    if not fixed < recipe.target_params <= total_params:
        raise DomainpruneError(
            f"--target-params {recipe.target_params:,} is out of reach: the model has {total_params:,} parameters, "
            f"{fixed:,} of them outside attention and MLP" + (" after hidden pruning" if kept < 1 else "")
        )
    return 1 - (recipe.target_params - fixed) / attn_mlp


def check_reachable(recipe: Recipe, adapter: DecoderAdapter, criterion, sparsity: float, total_params: int) -> None:
    """Refuse, before any statistics, a width budget no allocation can meet (every layer keeps one attention unit and
    one MLP channel), saying what the closest reachable budget is."""
    if criterion.scores_experts or recipe.depth or recipe.hidden_sparsity or criterion.depth:
        return  # expert counts, whole layers and hidden channels reach further: the plan is checked afterwards
    reachable = max_width_sparsity(adapter, recipe.attention_unit)
    if sparsity <= reachable + budget_tolerance(adapter, recipe.attention_unit, recipe.round_to, False) / 2:
        return
    unit = "KV group" if recipe.attention_unit == "kv_group" else "query head per KV group"
    why = f"every layer keeps one {unit} and one MLP channel; add --depth shortgpt --depth-sparsity F to remove layers"
    if recipe.target_params is not None:
        attn_mlp = sum(adapter.layer_params(s) for s in adapter.shapes())
        smallest = total_params - int(reachable * attn_mlp)
        raise DomainpruneError(
            f"--target-params {recipe.target_params:,} is out of reach: the smallest model width "
            f"pruning reaches has {smallest:,} parameters ({why})"
        )
    raise DomainpruneError(
        f"--sparsity {sparsity:g} is out of reach: at most {reachable:.4f} of attention+MLP "
        f"parameters can be removed ({why})"
    )


def budget(recipe: Recipe, adapter: DecoderAdapter, total_params: int) -> tuple[float, float] | None:
    """(attention+MLP sparsity wanted, tolerance) that the plan of `recipe` must meet, from the dense model; None for
    budgets that are not parameter counts (--target-speedup, --experts-keep)."""
    if recipe.target_speedup is not None or recipe.experts_keep is not None:
        return None
    depth = bool(recipe.depth) or (recipe.method in CRITERIA and CRITERIA[recipe.method].depth)
    return (
        target_sparsity(recipe, adapter, total_params),
        budget_tolerance(adapter, recipe.attention_unit, recipe.round_to, depth),
    )


def check_budget(recipe: Recipe, plan: Plan, wanted: tuple[float, float] | None) -> None:
    """The plan must meet the budget within one unit (docs/allocation.md), or the run stops before surgery."""
    if wanted is None or plan.params is None:
        return
    target, tol = wanted
    got = plan.params.sparsity
    if abs(got - target) > tol:
        raise DomainpruneError(
            f"the plan removes {got:.4f} of attention+MLP parameters, not the {target:.4f} asked for (tolerance "
            f"{tol:.4f}); {recipe.method} with --allocation {recipe.allocation} cannot meet this budget: try another "
            "allocation or budget"
        )


def obs_key(model: torch.nn.Module, sequences: torch.Tensor, *parts: Any) -> str:
    """What an OBS reconstruction pass depends on: the dense weights, the calibration data and the choice of units."""
    from . import cache
    from .stats import model_fingerprint, tensor_fingerprint

    return cache.fingerprint("obs", 1, model_fingerprint(model), tensor_fingerprint(sequences), *parts)


def check_data(recipe: Recipe) -> None:
    """Read the corpora before the model is loaded: unreadable or empty data is refused in one line, at once."""
    load_corpus(recipe.data, text_field=recipe.text_field)
    if recipe.general_data is not None:
        load_corpus(recipe.general_data, text_field=recipe.text_field)


def hidden_kept_fraction(recipe: Recipe, adapter: DecoderAdapter) -> float:
    from .hidden import hidden_width

    if not recipe.hidden_sparsity:
        return 1.0
    return hidden_width(adapter, recipe.hidden_sparsity, recipe.round_to) / adapter.hidden_size


def _sequences(source: str, recipe: Recipe, tokenizer: Any, n: int) -> torch.Tensor:
    """`n` calibration sequences of `source`; candidate c of K shifts the evenly spaced picks by c/K of a stride."""
    corpus = load_corpus(source, text_field=recipe.text_field)
    if recipe.calib_candidate == 0:
        return corpus.sequences(tokenizer, "calibration", n, recipe.seq_len)
    full = corpus.sequences(tokenizer, "calibration", n, recipe.seq_len)  # the usual checks and messages
    stream = corpus.token_stream(tokenizer, "calibration")
    total = len(stream) // recipe.seq_len
    chunks = stream[: total * recipe.seq_len].view(total, recipe.seq_len)
    shift = recipe.calib_candidate / recipe.calib_candidates
    idx = [min(total - 1, int((i + shift) * total / n)) for i in range(n)]
    return chunks[idx] if len(set(idx)) == n else full


def general_source(recipe: Recipe) -> str:
    """The general corpus: `general_data`, else the bundled `general` preset (with a warning)."""
    if recipe.general_data is None:
        log.warning(
            "method %r uses general calibration data; no --general-data given, so the bundled 'general' preset is used",
            recipe.method,
        )
        return "general"
    return recipe.general_data


def calibration_sequences(recipe: Recipe, tokenizer: Any, *, mix: bool = True) -> torch.Tensor:
    """The single calibration stream: domain data, with a fraction `general_ratio` of general data when `mix`."""
    n_general = round(recipe.general_ratio * recipe.calib_samples) if mix else 0
    parts = []
    if n_general < recipe.calib_samples:
        parts.append(_sequences(recipe.data, recipe, tokenizer, recipe.calib_samples - n_general))
    if n_general:
        parts.append(_sequences(recipe.general_data or "general", recipe, tokenizer, n_general))
    return torch.cat(parts)


def general_sequences(recipe: Recipe, tokenizer: Any) -> torch.Tensor:
    """The general stream of two-stream criteria (dpruner, gaprune): calib_samples sequences."""
    return _sequences(general_source(recipe), recipe, tokenizer, recipe.calib_samples)


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: Any
    plan: Plan
    recipe: Recipe
    out: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    training_log: list[dict] | None = None  # training-aware methods: one entry per step (training_log.json)


def fit_deploy(recipe: Recipe, adapter: DecoderAdapter) -> Recipe:
    """The recipe adjusted to, or refused for, what the --deploy target can load, before any statistics."""
    kind = adapter.config.model_type
    if recipe.deploy in STOCK_TARGETS:
        if recipe.bias_compensation and not (adapter.attention_bias_flag and adapter.mlp_bias_flag):
            raise DomainpruneError(
                f"--deploy {recipe.deploy}: a stock {kind} config has no place for the "
                "o_proj/down_proj biases bias compensation adds; add --no-bias-compensation"
            )
    elif recipe.deploy == "llamacpp":
        from .gguf_export import FULL_WIDTH_Q, KERNEL_MULTIPLE, OWN_ARCH, UNIFORM_ONLY

        if kind not in OWN_ARCH:
            raise DomainpruneError(
                f"--deploy llamacpp: the GGUF export runs {', '.join(OWN_ARCH)} models, not this {kind} model"
            )
        own = OWN_ARCH[kind]
        experts_only = recipe.method in CRITERIA and CRITERIA[recipe.method].scores_experts
        # no per-layer form in llama.cpp (gguf_export's docstring): these run only with equal layers
        if own in UNIFORM_ONLY or adapter.has_experts():
            uniform = experts_only or recipe.allocation == "uniform"
            if not uniform and recipe.default_recipe:  # the default recipe: its uniform form
                update = {**DEFAULT_UNIFORM_RECIPE, "bias_compensation": None}
                if adapter.has_experts():  # the fallback method already runs (OBS refits no experts)
                    update = {"allocation": "uniform", "bias_compensation": False}
                recipe, uniform = recipe.model_copy(update=update).resolved(), True
            if recipe.bias_compensation:
                raise DomainpruneError(
                    f"--deploy llamacpp: llama.cpp's {own} graph has no place for the compensation biases of "
                    f"this {kind} model; add --no-bias-compensation"
                )
            if recipe.depth or not uniform:
                raise DomainpruneError(
                    f"--deploy llamacpp: llama.cpp runs {kind} only with the same widths in every "
                    "layer; use --allocation uniform and no --depth"
                )
            if own in FULL_WIDTH_Q and adapter.has_experts() and not experts_only:
                raise DomainpruneError(
                    f"--deploy llamacpp: llama.cpp's {own} graph needs every attention head; prune experts "
                    "(--method expert-frequency, easy-ep or tcess) for this target"
                )
        widths = [adapter.shape(i).intermediate_size for i in range(adapter.num_layers) if adapter.has_dense_mlp(i)]
        # kernel-friendly widths by default, where the step is fine enough (≥ 16 steps per MLP) not to cost quality
        if recipe.round_to is None and widths and min(widths) >= 16 * KERNEL_MULTIPLE:
            log.info(
                "--deploy llamacpp: MLP widths rounded to multiples of %d for llama.cpp's kernels "
                "(--round-to 1 keeps exact widths; --round-to 256 for K-quants)",
                KERNEL_MULTIPLE,
            )
            recipe = recipe.model_copy(update={"round_to": KERNEL_MULTIPLE})
    return recipe


def fit_default(recipe: Recipe, loaded: LoadedModel) -> Recipe:
    """The default recipe where it applies to this model and budget, else the fallback (said in one line); then the
    --deploy target's checks on the model."""
    adapter = get_adapter(loaded.model)
    if recipe.default_recipe and recipe.method != FALLBACK_METHOD:
        recipe = _default_for(recipe, loaded, adapter)
    return fit_deploy(recipe, adapter)


def _default_for(recipe: Recipe, loaded: LoadedModel, adapter: DecoderAdapter) -> Recipe:
    if adapter.has_experts():
        return recipe.fallback("OBS refits dense MLPs, and this model has mixture-of-experts layers")
    if recipe.allocation == "cfsp":
        sparsity = target_sparsity(recipe, adapter, parameter_count(loaded.model))
        if cfsp_mlp_fraction(adapter, sparsity) >= 1:
            return recipe.fallback(f"cfsp prunes MLP channels only, fewer than {sparsity:.0%} of attention+MLP")
    return recipe


def make_plan(loaded: LoadedModel, recipe: Recipe, *, progress: bool = True) -> tuple[Plan, list[dict] | None, bool]:
    """Score the model and allocate the budget. Returns (plan, statistics, pruned_in_place).

    A sequential criterion with uniform allocation prunes each layer as soon as it is scored, so that later
    layers are scored on pruned inputs; then `pruned_in_place` is True and the model already matches the plan.

    With `calib_candidates` K > 1 (NIRVANA-style selection), each of K calibration subsets (evenly spaced picks
    shifted by c/K of a stride) plans a copy of the model, which is pruned and compared with the dense model by
    KL(dense‖pruned) on held-out validation sequences of the domain; the lowest wins. Its index and every
    candidate's KL are recorded in the plan's recipe (`calib_candidate`, `calib_kl`). If the winner was pruned in
    place, `loaded.model` is replaced by its pruned copy.
    """
    if is_training(recipe):
        raise DomainpruneError(f"--method {recipe.method} decides while it trains; run `domainprune prune`, not plan")
    recipe = fit_default(recipe, loaded)
    if recipe.calib_candidates == 1:
        return _make_plan_once(loaded, recipe, progress=progress)
    import copy

    held_out = load_corpus(recipe.data, text_field=recipe.text_field).sequences(
        loaded.tokenizer, "validation", min(recipe.calib_samples, 16), recipe.seq_len, samples_option="--calib-samples"
    )
    results, kls = [], []
    for c in range(recipe.calib_candidates):
        cand = recipe.model_copy(update={"calib_candidate": c})
        work = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.path, loaded.source)
        plan, stats, pruned = _make_plan_once(work, cand, progress=progress)
        pruned_model = work.model if pruned else copy.deepcopy(work.model)
        if not pruned:
            apply(
                LoadedModel(pruned_model, loaded.tokenizer, loaded.path, loaded.source),
                plan,
                stats=stats,
                progress=progress,
            )
        kls.append(kl_divergence(loaded.model, pruned_model, held_out, batch_size=recipe.batch_size))
        log.info("calibration candidate %d/%d: KL(dense‖pruned) = %.6f", c + 1, recipe.calib_candidates, kls[-1])
        results.append((plan, stats, pruned, work.model if pruned else None))
        del pruned_model
    best = min(range(len(kls)), key=lambda c: (kls[c], c))
    plan, stats, pruned, model = results[best]
    if pruned:
        loaded.model = model
    # the winner's own recipe: what its planning recorded (search_kl; the sparsity a --target-speedup solved for)
    chosen = Recipe.model_validate(plan.recipe).model_copy(
        update={"calib_candidate": best, "calib_kl": [round(k, 8) for k in kls]}
    )
    return plan.model_copy(update={"recipe": chosen.model_dump()}), stats, pruned


@torch.no_grad()
def kl_divergence(
    dense: torch.nn.Module, pruned: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8
) -> float:
    """Mean per-token KL(P_dense ‖ Q_pruned) of the next-token distributions on `sequences` (float64 sums)."""
    device = next(dense.parameters()).device
    total, count = 0.0, 0
    for batch in sequences.split(batch_size):
        batch = batch.to(device)
        logp = torch.log_softmax(dense(input_ids=batch, use_cache=False).logits.double(), -1)
        logq = torch.log_softmax(pruned(input_ids=batch, use_cache=False).logits.double(), -1)
        total += float((logp.exp() * (logp - logq)).sum())
        count += batch.numel()
    return total / count


def uniform_plan_counts(
    recipe: Recipe, adapter: DecoderAdapter, sparsity: float, frozen: frozenset = frozenset()
) -> list[tuple[int, int]]:
    """Units to remove per layer under uniform allocation, MLP widths rounded to --round-to: what a sequential pass
    needs before any layer is scored (in-memory and streamed runs alike)."""
    counts = uniform_counts(adapter, sparsity, recipe.attention_unit, frozen)
    return align_counts(adapter, counts, recipe.round_to or 1)


def layer_chooser(recipe: Recipe, criterion, adapter: DecoderAdapter, counts: list[tuple[int, int]]):
    """What chooses each layer's units inside the OBS pass: greedy OBS itself, or the criterion's uniform pick."""
    from .obs import GreedyOBS, ScoredUniform

    if criterion.chooses_units:
        return GreedyOBS(adapter, counts, recipe.attention_unit, bias=bool(recipe.bias_compensation))
    return ScoredUniform(criterion, adapter, counts, recipe.attention_unit, uniform_layer)


def plan_from_scores(
    recipe: Recipe,
    criterion,
    adapter: DecoderAdapter,
    dense: Plan,
    scores: list,
    sparsity: float,
    stats: list[dict] | None,
    *,
    context=None,
    frozen: frozenset = frozenset(),
) -> Plan:
    """The budget allocated over every layer's scores, MLP widths rounded to --round-to: the planning step of
    in-memory and streamed runs (domainprune.streaming) alike."""
    plan = allocate(
        recipe.allocation,
        dense,
        adapter,
        scores,
        sparsity,
        attention_unit=recipe.attention_unit,
        standardized=criterion.standardized,
        stats=stats,
        context=context,
        frozen=frozen,
    )
    return align_widths(plan, scores, recipe.round_to or 1)


def _make_plan_once(
    loaded: LoadedModel, recipe: Recipe, *, progress: bool = True
) -> tuple[Plan, list[dict] | None, bool]:
    torch.manual_seed(recipe.seed)
    model, adapter = loaded.model, get_adapter(loaded.model)
    criterion = get_criterion(recipe.method)
    total_before = parameter_count(model)
    sparsity = target_sparsity(recipe, adapter, total_before)
    check_reachable(recipe, adapter, criterion, sparsity, total_before)
    dense = dense_plan(adapter, loaded.source)
    if recipe.hidden_sparsity:  # scored on the dense model; the stages below prune the rest of the budget
        dense, sparsity = _hidden_stage(loaded, recipe, adapter, dense, sparsity, progress)
    stats = None
    need_stats = (
        criterion.needs_statistics or recipe.bias_compensation or allocation_needs_statistics(recipe.allocation)
    )
    if criterion.scores_experts and not adapter.has_experts():
        raise DomainpruneError(
            f"method {recipe.method!r} prunes experts, but this {adapter.model_type!r} model has no mixture-of-experts "
            "layers"
        )
    if adapter.has_experts() and not (criterion.scores_experts or criterion.scores_moe_channels):
        raise DomainpruneError(
            f"this {adapter.model_type!r} model is a mixture of experts; method {recipe.method!r} cannot score its "
            "experts' channels: use --method magnitude, wanda-sp or flap (heads and channels inside experts), or "
            "expert-frequency, easy-ep or tcess with --experts-keep (whole experts)"
        )
    if adapter.has_experts() and getattr(recipe, "reconstruct", False):
        raise DomainpruneError("--reconstruct does not handle mixture-of-experts layers; leave it out on this model")
    calibration = lambda: calibration_sequences(recipe, loaded.tokenizer)  # noqa: E731  (built only for depth)
    depth = depth_stage(loaded, recipe, criterion, adapter, sparsity, calibration, progress)  # None without depth
    if depth is not None and depth.method == recipe.method:  # a depth method alone: its removal is the plan
        plan = depth.mark(dense, dense)
        plan.params = plan.count_params(adapter, total_before)
        return plan.model_copy(update={"recipe": recipe.model_dump()}), None, False
    frozen = depth.frozen() if depth is not None else frozenset()  # zeroed: width below sees the depth-pruned model
    solve = recipe.target_speedup is not None and recipe.sparsity is None  # --target-speedup: sparsity to be found
    if solve and recipe.allocation == "uniform":  # widths depend on shapes only: solved before any scoring
        from .latency import counts_shapes

        def uniform_shapes(s: float):
            return counts_shapes(adapter, uniform_plan_counts(recipe, adapter, s, frozen), recipe.attention_unit)

        sparsity, recipe = _solve_speedup(loaded, recipe, sparsity, uniform_shapes, progress)
    gradient = criterion.needs_gradients
    two_streams = criterion.two_streams
    sequences = calibration_sequences(recipe, loaded.tokenizer, mix=not two_streams) if need_stats or gradient else None
    if gradient:
        criterion.prepare(
            GradientContext(
                model,
                adapter,
                sequences,
                lambda: general_sequences(recipe, loaded.tokenizer),
                micro_batch=recipe.micro_batch or 1,
                gradient_checkpointing=recipe.gradient_checkpointing,
                batch_size=recipe.batch_size,
                taylor_mode=recipe.taylor_mode,
                progress=progress,
            )
        )
    if criterion.scores_experts:
        stats = collect_statistics(model, adapter, sequences, batch_size=recipe.batch_size, progress=progress)
        scores = [criterion.score_experts(adapter, i, stats[i]) for i in range(adapter.num_layers)]
        plan = keep_top_experts(dense, scores, recipe.experts_keep)
        plan.params = plan.count_params(adapter, total_before)
        pruned = False
    elif recipe.reconstruct and criterion.sequential and recipe.allocation == "uniform":
        # choose each layer's units on its current inputs and refit it, in one layer-sequential pass (domainprune.obs)
        from .obs import reconstruct_layers

        counts = uniform_plan_counts(recipe, adapter, sparsity)
        bias = bool(recipe.bias_compensation)
        chooser = layer_chooser(recipe, criterion, adapter, counts)
        key = obs_key(model, sequences, recipe.batch_size, bias, recipe.method, recipe.attention_unit, counts)
        layers, stats = reconstruct_layers(
            model,
            adapter,
            sequences,
            chooser,
            batch_size=recipe.batch_size,
            bias=bias,
            resume_key=key,
            progress=progress,
        )
        plan = dense.model_copy(update={"layers": layers})
        plan.params = plan.count_params(adapter, total_before)  # before `finish` adds zero q/k/v biases
        finish(adapter, plan, bias)
        pruned = True
    elif criterion.sequential and recipe.allocation == "uniform":
        counts = uniform_plan_counts(recipe, adapter, sparsity, frozen)
        layers = []

        def after_layer(i: int, layer_stats: dict) -> bool:
            lp = uniform_layer(
                adapter, i, criterion.score_layer(adapter, i, layer_stats), counts[i], recipe.attention_unit
            )
            lp = depth.mark_layer(lp, dense.layers[i]) if depth is not None else lp
            layers.append(lp)
            if lp.drop:  # zeroed: already the identity, dropped by `finish`
                return False
            prune_layer(adapter, lp, derived(layer_stats) if recipe.bias_compensation else None)
            return True

        stats = collect_statistics(
            model, adapter, sequences, batch_size=recipe.batch_size, after_layer=after_layer, progress=progress
        )
        plan = dense.model_copy(update={"layers": layers})
        plan.params = plan.count_params(adapter, total_before)  # before `finish` adds zero q/k/v biases
        finish(adapter, plan, bool(recipe.bias_compensation))
        pruned = True
    else:
        if need_stats:
            stats = collect_statistics(model, adapter, sequences, batch_size=recipe.batch_size, progress=progress)
        scores = [criterion.score_layer(adapter, i, stats[i] if stats else None) for i in range(adapter.num_layers)]
        context = search_context(loaded, recipe, sequences, stats, progress) if recipe.allocation == "search" else None
        if solve and recipe.allocation != "uniform":  # on the scores computed once above
            from .latency import plan_shapes

            def allocated_shapes(s: float):
                return plan_shapes(plan_from_scores(recipe, criterion, adapter, dense, scores, s, stats, frozen=frozen))

            sparsity, recipe = _solve_speedup(loaded, recipe, sparsity, allocated_shapes, progress)
        plan = plan_from_scores(
            recipe, criterion, adapter, dense, scores, sparsity, stats, context=context, frozen=frozen
        )
        plan = depth.mark(plan, dense) if depth is not None else plan
        if context is not None:
            recipe = recipe.model_copy(
                update={"search_kl": [round(context.summary["start_kl"], 8), round(context.summary["kl"], 8)]}
            )
        plan.params = plan.count_params(adapter, total_before)
        pruned = False
    return plan.model_copy(update={"recipe": recipe.model_dump()}), stats, pruned


def _solve_speedup(loaded: LoadedModel, recipe: Recipe, lo: float, shapes_at, progress: bool) -> tuple[float, Recipe]:
    """`--target-speedup`: the smallest sparsity (≥ `lo`, the depth part) whose allocation `shapes_at(sparsity)` the
    latency table of this machine predicts to meet the target (domainprune.latency); the recipe records both."""
    from .latency import latency_table, solve_sparsity

    table = latency_table(loaded.model, prefill_tokens=recipe.prefill_tokens, progress=progress)
    more = (
        "raise --depth-sparsity" if recipe.depth else "add depth pruning (e.g. --depth shortgpt --depth-sparsity 0.2)"
    )
    quiet = logging.getLogger("domainprune.allocation")  # allocations that log (owl) would log every bisection step
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        sparsity, predicted = solve_sparsity(
            shapes_at,
            table,
            recipe.target_speedup,
            recipe.speedup_phase,
            lo=lo,
            hint=f"lower --target-speedup or {more}",
        )
    finally:
        quiet.setLevel(level)
    log.info(
        "--target-speedup %g (%s): sparsity %.2f%%, predicted %.3f× on %s",
        recipe.target_speedup,
        recipe.speedup_phase,
        100 * sparsity,
        predicted,
        table.device,
    )
    recorded = round(predicted, 4) if round(predicted, 4) >= recipe.target_speedup else predicted
    return sparsity, recipe.model_copy(update={"sparsity": sparsity, "predicted_speedup": recorded})


def _hidden_stage(
    loaded: LoadedModel, recipe: Recipe, adapter: DecoderAdapter, dense: Plan, sparsity: float, progress: bool
) -> tuple[Plan, float]:
    """Choose the kept residual channels (domainprune.hidden); returns the dense plan carrying them and the
    attention+MLP sparsity left for the width and depth stages."""
    from .hidden import choose_hidden, width_sparsity

    sequences = calibration_sequences(recipe, loaded.tokenizer)
    stats = collect_statistics(loaded.model, adapter, sequences, batch_size=recipe.batch_size, progress=progress)
    keep = choose_hidden(adapter, stats, recipe.hidden_sparsity, recipe.round_to)  # refuses unsupported architectures
    rest = width_sparsity(sparsity, len(keep) / adapter.hidden_size)
    log.info(
        "hidden: keeping %d/%d residual channels; width and depth remove %.1f%% of the rest",
        len(keep),
        adapter.hidden_size,
        100 * rest,
    )
    return dense.model_copy(update={"hidden_channels": keep}), rest


def apply(loaded: LoadedModel, plan: Plan, *, stats: list[dict] | None = None, progress: bool = True) -> DecoderAdapter:
    """Prune the loaded model to `plan`. If the plan's recipe asks for bias compensation, the calibration means
    come from `stats` or, failing that, from a (cached) statistics pass over the recipe's data. If it asks for
    `reconstruct="obs"`, the plan is applied layer by layer with the least-squares refit on the recipe's calibration
    data instead (domainprune.obs; the compensation bias is then fitted with it)."""
    recipe = make_recipe(**plan.recipe) if plan.recipe else None  # a hand-edited recipe fails in one line
    validate_plan(plan, get_adapter(loaded.model))  # before the statistics pass, not after it
    if recipe is not None and recipe.reconstruct:
        from .obs import FixedPlan, reconstruct_layers

        adapter = get_adapter(loaded.model)
        bias = bool(recipe.bias_compensation)
        sequences = calibration_sequences(recipe, loaded.tokenizer)
        key = obs_key(loaded.model, sequences, recipe.batch_size, bias, plan.model_dump(include={"layers"}))
        reconstruct_layers(
            loaded.model,
            adapter,
            sequences,
            FixedPlan(plan),
            batch_size=recipe.batch_size,
            bias=bias,
            resume_key=key,
            progress=progress,
        )
        finish(adapter, plan, bias)
        return adapter
    means = None
    if recipe is not None and recipe.bias_compensation:
        if stats is None:
            adapter = get_adapter(loaded.model)
            zero_removed(adapter, plan_frozen(plan))  # statistics of the depth-pruned model, as make_plan saw it
            sequences = calibration_sequences(recipe, loaded.tokenizer)
            stats = collect_statistics(
                loaded.model, adapter, sequences, batch_size=recipe.batch_size, progress=progress
            )
        means = [derived(s) for s in stats]
    return apply_plan(loaded.model, plan, means)


def trim_vocab_stage(loaded: LoadedModel, recipe: Recipe):
    """Trim the (pruned) model's vocabulary in place to what the domain uses; returns the VocabReport."""
    from .vocab import trim_vocabulary

    corpus = load_corpus(recipe.data, recipe.text_field)
    model, tokenizer, report = trim_vocabulary(
        loaded,
        corpus,
        coverage=recipe.vocab_coverage,
        size=recipe.vocab_size,
        text_field=recipe.text_field,
        inplace=True,
    )
    loaded.model, loaded.tokenizer = model, tokenizer
    return report


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prune_report(
    recipe: Recipe, plan: Plan, wanted, total_after: int, started: float, device: torch.device, adapter: DecoderAdapter
) -> dict[str, Any]:
    """report.json's common part, for in-memory and streamed runs alike."""
    return {
        "sparsity_target": recipe.sparsity if wanted is None else round(wanted[0], 6),
        "target_params": recipe.target_params,
        "sparsity_achieved": plan.params.sparsity,
        "attention_mlp_params": [plan.params.attention_mlp_before, plan.params.attention_mlp_after],
        "total_params": [plan.params.total_before, total_after],
        "prune_seconds": round(time.perf_counter() - started, 2),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device),
        "uniform": adapter.is_uniform(),
        # stock AutoModelForCausalLM loads it as is: uniform widths and no biases the architecture's config lacks
        "stock_loadable": adapter.is_uniform() and not adapter.extra_biases(),
        **({"planning": planning} if (planning := planning_results(recipe)) else {}),
    }
