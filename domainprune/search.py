"""`--allocation search`: evolutionary search over per-layer sparsity (Týr-the-Pruner / DarwinLM-lite, METHODS.md §12).

A candidate is a sparsity per decoder layer whose parameter-weighted mean is exactly the budget; each layer then
keeps its highest-scoring units at its own sparsity (as `uniform` does inside a layer). The search:

- starts from the same sparsity everywhere;
- mutates by moving 1–4 steps of sparsity from one layer to another, with steps measured in parameters
  (Δ·mean layer size), so every offspring removes exactly the budget;
- keeps every layer within ±`levels` steps of the round's centre (Týr's 9 levels) and within [0, 0.95];
- selects in three stages of growing token counts (all offspring on 1/8 of the held-out sequences, the best 4 on
  1/2, the best 2 on all of them), elitist: the parent survives unless a finalist beats it on the full slice;
- refines coarse to fine: each round re-centres on the best candidate and halves Δ (12.5 % → 6.25 % → 3.125 %).

Fitness is KL(dense ‖ candidate) of the next-token distributions restricted to the dense model's top-k logits
(k = 256; Týr uses 8192 on 128k-token vocabularies), on held-out validation sequences of the domain. A candidate is
evaluated on the dense model itself with the removed heads' and channels' inputs to o_proj/down_proj masked (set to
their calibration mean when bias compensation is on), which is exactly what slicing them out would compute, so no
pruned copies are built. The state is saved after every generation; an interrupted search resumes where it stopped
and reaches the same result as an uninterrupted one (the random generator's state is saved with it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import cache, faults
from .adapters import DecoderAdapter
from .plan import Plan

log = logging.getLogger(__name__)
SEARCH_VERSION = 1
MAX_LAYER_SPARSITY = 0.95
STAGE_FRACTIONS = (0.125, 0.5, 1.0)
STAGE_KEEP = (4, 2)  # offspring surviving stage 1 and stage 2


@dataclass
class SearchSettings:
    generations: int = 8  # per round
    offspring: int = 16  # per generation
    rounds: int = 3  # coarse-to-fine rounds, Δ halved each
    step: float = 0.125  # Δ of the first round, as a fraction of a layer
    levels: int = 4  # a layer stays within ±levels steps of the round's centre (9 levels)
    topk: int = 256  # KL on the dense model's top-k logits
    batch_size: int = 8
    samples: int = 32  # held-out validation sequences for the fitness


@dataclass
class SearchContext:
    """What the search needs beyond scores and statistics: the dense model, held-out sequences and settings."""

    model: torch.nn.Module
    sequences: torch.Tensor  # held-out (n, seq_len) token ids
    settings: SearchSettings
    compensation_means: list[dict] | None  # derived statistics per layer when bias compensation is on
    cache_key: str | None  # None: no resume file
    seed: int = 0
    progress: bool = True
    summary: dict | None = None  # filled by the search: KL at the start and the end, per-generation best
    reconstruction: Any = None  # tyr.Reconstruction: judge candidates after their OBS refit (--reconstruct obs)


class Masks:
    """Forward pre-hooks on every o_proj and down_proj that zero (or set to their calibration mean) the input
    channels of removed heads and MLP channels; `set(plan)` switches to a candidate without re-registering."""

    def __init__(self, adapter: DecoderAdapter, means: list[dict] | None):
        self.adapter, self.means = adapter, means
        self.keep: dict[tuple[int, str], torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self):
        for i in range(self.adapter.num_layers):
            for kind, proj in (("attn", self.adapter.o_proj(i)), ("mlp", self.adapter.down_proj(i))):
                self.handles.append(proj.register_forward_pre_hook(self._hook(i, kind)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, i: int, kind: str):
        def hook(_module, args):
            keep = self.keep.get((i, kind))
            if keep is None:
                return None
            x = args[0]
            keep = keep.to(device=x.device, dtype=x.dtype)
            out = x * keep
            if self.means is not None:
                out = out + self.means[i][f"{kind}_in_mean"].to(device=x.device, dtype=x.dtype) * (1 - keep)
            return (out, *args[1:])

        return hook

    def set(self, plan: Plan) -> None:
        a = self.adapter
        for lp in plan.layers:
            s = a.shape(lp.index)
            heads = torch.zeros(s.num_heads, a.head_dim)
            heads[lp.query_heads] = 1
            channels = torch.zeros(s.intermediate_size)
            channels[lp.mlp_channels] = 1
            self.keep[(lp.index, "attn")] = heads.reshape(-1)
            self.keep[(lp.index, "mlp")] = channels


class Fitness:
    """KL(dense ‖ candidate) on the dense model's top-k logits over the first n held-out sequences."""

    def __init__(self, model: torch.nn.Module, sequences: torch.Tensor, topk: int, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.device = next(model.parameters()).device
        self.batches = list(sequences.split(batch_size))
        self.reference = []  # per batch: (dense log-probs over its top-k, top-k indices)
        with torch.inference_mode():
            for b in self.batches:
                logits = model(input_ids=b.to(self.device), use_cache=False).logits.float()
                top, idx = logits.topk(min(topk, logits.shape[-1]), dim=-1)
                self.reference.append((torch.log_softmax(top, -1), idx))

    @torch.inference_mode()
    def __call__(self, n_batches: int) -> float:
        total, count = 0.0, 0
        for b, (logp, idx) in zip(self.batches[:n_batches], self.reference[:n_batches]):
            logits = self.model(input_ids=b.to(self.device), use_cache=False).logits.float()
            logq = torch.log_softmax(logits.gather(-1, idx), -1)
            total += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
            count += logp.shape[0] * logp.shape[1]
        return total / count


def layer_weights(adapter: DecoderAdapter) -> list[int]:
    return [adapter.layer_params(adapter.shape(i)) for i in range(adapter.num_layers)]


def mutate(
    parent: list[int], centre: list[float], step: float, weights: list[int], levels: int, rng: random.Random
) -> list[int] | None:
    """Move k ∈ 1..4 steps of pruning from one layer to another; None if no legal move was found. A step is
    Δ·mean(weights) parameters, so layer l's sparsity moves by Δ·mean/w_l and the weighted total never changes."""
    n = len(parent)
    mean_w = sum(weights) / n
    for _ in range(32):
        k = rng.randint(1, 4)
        up, down = rng.randrange(n), rng.randrange(n)  # `up` is pruned more, `down` less
        if up == down:
            continue
        child = list(parent)
        child[up] += k
        child[down] -= k
        if abs(child[up]) > levels or abs(child[down]) > levels:
            continue
        s = sparsities(child, centre, step, weights, mean_w)
        if 0 <= s[down] and s[up] <= MAX_LAYER_SPARSITY:
            return child
    return None


def sparsities(
    offsets: list[int], centre: list[float], step: float, weights: list[int], mean_w: float | None = None
) -> list[float]:
    mean_w = mean_w if mean_w is not None else sum(weights) / len(weights)
    return [c + d * step * mean_w / w for c, d, w in zip(centre, offsets, weights)]


def resumed_rng(state: dict) -> random.Random:
    """The generator saved in a search state (`random.getstate()`, which JSON turned from tuples into lists)."""
    rng = random.Random()
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    log.info("search: resuming at round %d, generation %d", state["round"] + 1, state["generation"] + 1)
    return rng


def generations_bar(state: dict, settings, desc: str, progress: bool):
    return tqdm(
        total=settings.rounds * settings.generations,
        initial=state["round"] * settings.generations + state["generation"],
        desc=desc,
        unit="gen",
        disable=not progress,
    )


def select(children: list, evaluate: Callable[[Any, int], float]) -> tuple[float, int]:
    """(fitness, index) of the best child: every child judged on the first stage's tokens, the best `STAGE_KEEP` of
    each stage judged again on the next stage's, more, tokens; (inf, -1) without children."""
    pool = sorted((evaluate(c, 0), i) for i, c in enumerate(children))
    for stage, keep in zip((1, 2), STAGE_KEEP):
        pool = sorted((evaluate(children[i], stage), i) for _, i in pool[:keep])
    return pool[0] if pool else (float("inf"), -1)


def end_generation(state: dict, rng: random.Random, state_file: Path | None, bar) -> None:
    """Save the state after a generation (a killed search resumes after it) and show its fitness."""
    state["rng"] = rng.getstate()
    if state_file is not None:
        cache.save_json(state_file, state)
        faults.point(f"search:{len(state['history'])}")
    bar.update(1)
    bar.set_postfix(kl=f"{state['fitness']:.5f}")


def search(adapter: DecoderAdapter, budget: float, make_plan, context: SearchContext) -> tuple[list[float], dict]:
    """Per-layer sparsities minimising the fitness; `make_plan(sparsities)` builds a candidate's plan.

    Returns (sparsities, summary) with the fitness of the start and of the result and every generation's best."""
    st = context.settings
    weights = layer_weights(adapter)
    state_file: Path | None = cache.entry("search", context.cache_key) / "state.json" if context.cache_key else None
    state = cache.load_json(state_file) if state_file is not None else None
    if state is not None and state["done"]:
        log.info("search: cached result (%s)", state_file.parent)
        return _result(state, weights)
    fitness = Fitness(context.model, context.sequences, st.topk, st.batch_size)
    stage_batches = [max(1, round(f * len(fitness.batches))) for f in STAGE_FRACTIONS]
    with Masks(adapter, context.compensation_means) as masks:

        def evaluate(s: list[float], stage: int) -> float:
            masks.set(make_plan(s))
            return fitness(stage_batches[stage])

        if state is None:
            rng = random.Random(context.seed)
            start = [budget] * adapter.num_layers
            state = {
                "round": 0,
                "generation": 0,
                "centre": start,
                "offsets": [0] * len(start),
                "fitness": evaluate(start, 2),
                "history": [],
                "done": False,
            }
            state["start_fitness"] = state["fitness"]
        else:
            rng = resumed_rng(state)
        bar = generations_bar(state, st, "search", context.progress)
        while not state["done"]:
            step = st.step / 2 ** state["round"]
            centre, parent = state["centre"], state["offsets"]
            children = [
                c
                for c in (mutate(parent, centre, step, weights, st.levels, rng) for _ in range(st.offspring))
                if c is not None
            ]
            best_fit, best = select(children, lambda c, stage: evaluate(sparsities(c, centre, step, weights), stage))
            if best_fit < state["fitness"]:
                state["offsets"], state["fitness"] = children[best], best_fit
            state["history"].append(round(state["fitness"], 8))
            state["generation"] += 1
            if state["generation"] == st.generations:  # next round: re-centre on the best, halve Δ
                state["centre"] = sparsities(state["offsets"], centre, step, weights)
                state["offsets"] = [0] * len(centre)
                state["round"], state["generation"] = state["round"] + 1, 0
                state["done"] = state["round"] == st.rounds
            end_generation(state, rng, state_file, bar)
        bar.close()
    return _result(state, weights)


def _result(state: dict, weights: list[int]) -> tuple[list[float], dict]:
    result = sparsities(state["offsets"], state["centre"], 0.0, weights)
    summary = {
        "start_kl": state["start_fitness"],
        "kl": state["fitness"],
        "history": state["history"],
        "layer_sparsity": [round(s, 5) for s in result],
    }
    log.info("search: KL %.6f (uniform start) → %.6f", state["start_fitness"], state["fitness"])
    return result, summary
