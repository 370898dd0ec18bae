"""`--allocation search --reconstruct obs`: the search judges every candidate after its OBS refit (Týr-the-Pruner,
METHODS.md §12; docs/allocation.md).

Supernet. Each coarse-to-fine round starts with one layer-sequential OBS pass (domainprune.obs) over the calibration
data with the round's centre plan, on a copy of the dense model. It records the input Hessian of every o_proj and
down_proj on the inputs that the centre-pruned, refitted layers before it produce: Týr's expectation error
accumulation, with the centre standing in for the expected level (the levels are spread symmetrically around it). A
*variant* of a module, its o_proj or down_proj with a given count of heads or channels removed (the criterion's
weakest), is the least-squares refit of its kept columns on that Hessian (`obs.refit`, the same 1 % damping), made
on first use and memoised, so each level of each module is refitted once per round.

Genes. Per layer, the attention units (KV groups or query-head rank slices) and the MLP channels removed: attention
and MLP are separate genes. A mutation either moves k ∈ 1..4 steps of channels from one layer's MLP to another's
(Δ = 12.5 % of a layer's channels, halved every round), which keeps the parameter count exactly, or removes (restores)
one attention unit in one layer and gives the parameters back to (takes them from) one MLP, rounded to whole
channels so that the total stays within half a channel of the budget. Every layer stays within ±`levels` steps of the
round's centre (Týr's 9 levels) and one attention unit of it, and prunes at most 95 % of its channels.

Evaluation. The dense model runs with every o_proj/down_proj weight swapped for its variant, the removed columns zero
(exactly what slicing them out computes: a removed head or channel reaches nothing else), the fitted bias added when
bias compensation is on. Fitness = KL(dense ‖ candidate) on the dense model's top-k logits over held-out validation
sequences of the domain, plus `task_weight` × the same KL over the answer tokens of task-format requests (for code: a
function's signature and docstring from the validation split, answered greedily by the dense model; task_data.py).
Selection in three stages and elitism as in domainprune.search.

Starts. The search starts from the better (by this fitness) of `uniform` and the method's own allocation (cfsp's
MLP-only widths for `--method cfsp`), each judged after its refit.

The state is saved after every generation; a resumed search rebuilds the round's supernet around the saved centre
(deterministic) and reaches the same result. The plan found is then applied by the ordinary sequential OBS pass
(pipeline.apply), so `domainprune apply` of the saved plan gives the same weights.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cache
from .adapters import DecoderAdapter, get_adapter
from .allocation import attention_unit_cost
from .errors import DomainpruneError
from .obs import OBS_DAMPING, FixedPlan, InputHessian, _head_columns, reconstruct_layers, refit
from .plan import Plan
from .search import MAX_LAYER_SPARSITY, STAGE_FRACTIONS, Fitness, end_generation, generations_bar, resumed_rng, select

log = logging.getLogger(__name__)
TYR_VERSION = 1
MEMO_SIZE = 256  # variants kept per round: a generation touches a few modules per offspring
TASK_NEW_TOKENS = 96  # answer tokens the dense model writes per task-format request
TASK_PROMPTS = 8  # task-format requests for the task KL

Counts = list[list[int]]  # per layer [attention units removed, MLP channels removed]
# Defaults with --reconstruct obs, sized for a 35 % SmolLM2 search within 30 min on 2 CPU cores (docs/allocation.md):
# every round adds an OBS pass over the calibration data, so fewer rounds, generations, offspring and held-out samples
RECONSTRUCT_DEFAULTS = dict(rounds=2, generations=4, offspring=8, samples=16)


@dataclass
class Reconstruction:
    """What the search with reconstruction needs beyond domainprune.search's context."""

    calibration: torch.Tensor  # the calibration sequences the OBS refit uses
    bias: bool  # bias compensation: the refit also fits an output bias
    starts: list[str]  # allocations whose plans are the candidate starts (uniform, the method's own)
    task: list[tuple[list[int], int]] | None = None  # task-format (ids, first answer position)
    task_weight: float = 0.0
    key: str = ""  # what the search's result depends on beyond domainprune.search's own key

    def search(self, adapter, budget, mode, make_plan, starts, context) -> tuple[Counts, dict]:
        """`search` below with this reconstruction (allocation's search calls it: no allocation → tyr import)."""
        return search(adapter, budget, mode, make_plan, starts, context, self)


def reconstruction(loaded, recipe, calibration: torch.Tensor, progress: bool) -> Reconstruction:
    """The Reconstruction of a recipe with `--allocation search --reconstruct obs`: calibration data, bias flag, the
    start allocations (uniform and the method's own) and, with `search_task_weight`, the task-format sequences."""
    from .criteria import get_criterion

    own = get_criterion(recipe.method).default_allocation
    starts = ["uniform"] + ([own] if own not in (None, "uniform", "search") else [])
    weight = float(recipe.search_task_weight or 0)
    task = task_data(loaded, recipe, progress) if weight else None
    key = cache.fingerprint("tyr", TYR_VERSION, RECONSTRUCT_DEFAULTS, starts, weight, task, OBS_DAMPING)
    return Reconstruction(calibration, bool(recipe.bias_compensation), starts, task, weight, key)


def task_data(loaded, recipe, progress: bool) -> list[tuple[list[int], int]]:
    """TASK_PROMPTS task-format requests from the domain's validation split (`task_data.code_prompts`), each with the
    dense model's greedy answer; cached by model, prompts and length."""
    from .data import load_corpus
    from .stats import model_fingerprint
    from .task_data import code_prompts, sample

    corpus = load_corpus(recipe.data, text_field=recipe.text_field)
    prompts = sample(code_prompts(corpus, "validation"), TASK_PROMPTS, 0)
    if not prompts:
        raise DomainpruneError(
            f"--search-task-weight needs documented Python functions in the validation split of {recipe.data!r} to "
            "build task-format requests from; leave it out"
        )
    path = cache.entry("search-task", cache.fingerprint(model_fingerprint(loaded.model), prompts, recipe.seq_len))
    cached = cache.load_json(path / "answers.json")
    if cached is not None:
        return [(ids, first) for ids, first in cached]
    out = task_sequences(loaded.model, loaded.tokenizer, prompts, recipe.seq_len, progress)
    cache.save_json(path / "answers.json", out)
    return out


class _Recorder(FixedPlan):
    """Applies a fixed plan in the OBS pass and keeps every module's input Hessian."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.hessians: dict[tuple[int, str], InputHessian] = {}

    def attention(self, i, hess):
        self.hessians[(i, "attn")] = _cpu(hess())
        return super().attention(i, hess)

    def mlp(self, i, hess):
        self.hessians[(i, "mlp")] = _cpu(hess())
        return super().mlp(i, hess)


def _cpu(h: InputHessian) -> InputHessian:
    return InputHessian(h.h.cpu(), h.s.cpu(), h.n)


class Supernet:
    """The refitted variants of every o_proj/down_proj around one centre plan (module docstring)."""

    def __init__(self, adapter: DecoderAdapter, hessians: dict, bias: bool, damping: float = OBS_DAMPING):
        self.adapter, self.hessians, self.bias, self.damping = adapter, hessians, bias, damping
        self.dense = {  # the dense weights the variants are refitted from (a candidate may be installed later)
            (i, kind): (adapter.o_proj(i) if kind == "attn" else adapter.down_proj(i)).weight.data
            for i, kind in hessians
        }
        self.memo: OrderedDict = OrderedDict()

    @classmethod
    def build(
        cls, model: torch.nn.Module, centre: Plan, rec: Reconstruction, batch_size: int, progress: bool
    ) -> "Supernet":
        work = copy.deepcopy(model)  # the pass slices what it refits; the search keeps the dense model (its weights
        # must be the dense ones here: `Variants.restore`)
        recorder = _Recorder(centre)
        reconstruct_layers(
            work, get_adapter(work), rec.calibration, recorder, batch_size=batch_size, bias=rec.bias, progress=progress
        )
        del work
        return cls(get_adapter(model), recorder.hessians, rec.bias)

    def variant(self, i: int, kind: str, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Module (i, kind)'s full-width weight with the kept input columns refitted and the others zero, and its
        fitted bias (None without bias compensation)."""
        key = (i, kind, tuple(kept.tolist()))
        if key in self.memo:
            self.memo.move_to_end(key)
            return self.memo[key]
        w = self.dense[(i, kind)]
        hess = self.hessians[(i, kind)]
        new, b = refit(w, hess, kept, bias=self.bias, damping=self.damping, what=f"layer {i} {kind}")
        full = torch.zeros_like(w)
        full[:, kept.to(w.device)] = new.to(dtype=w.dtype, device=w.device)
        out = (full, None if b is None else b.to(dtype=w.dtype, device=w.device))
        self.memo[key] = out
        if len(self.memo) > MEMO_SIZE:
            self.memo.popitem(last=False)
        return out


class Variants:
    """Installs a candidate's refitted variants in the dense model (weights swapped, fitted biases added by forward
    hooks); `set(plan)` switches candidates, leaving restores the dense weights."""

    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self.supernet: Supernet | None = None
        self.dense: dict[tuple[int, str], torch.Tensor] = {}
        self.bias: dict[tuple[int, str], torch.Tensor | None] = {}
        self.handles: list = []

    def _proj(self, i: int, kind: str) -> torch.nn.Linear:
        return self.adapter.o_proj(i) if kind == "attn" else self.adapter.down_proj(i)

    def __enter__(self):
        for i in range(self.adapter.num_layers):
            for kind in ("attn", "mlp"):
                proj = self._proj(i, kind)
                self.dense[(i, kind)] = proj.weight.data
                self.handles.append(proj.register_forward_hook(self._hook(i, kind)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.restore()

    def restore(self) -> None:
        """The dense weights back in place (no fitted biases)."""
        for (i, kind), w in self.dense.items():
            self._proj(i, kind).weight.data = w
        self.bias.clear()

    def _hook(self, i: int, kind: str):
        def hook(_module, _args, out):
            b = self.bias.get((i, kind))
            return out if b is None else out + b

        return hook

    def set(self, plan: Plan) -> None:
        a = self.adapter
        for lp in plan.layers:
            s = a.shape(lp.index)
            for kind, full, kept in (
                ("attn", len(lp.query_heads) == s.num_heads, lambda: _head_columns(lp.query_heads, a.head_dim)),
                ("mlp", len(lp.mlp_channels) == s.intermediate_size, lambda: torch.tensor(lp.mlp_channels)),
            ):
                if full:
                    w, b = self.dense[(lp.index, kind)], None
                else:
                    w, b = self.supernet.variant(lp.index, kind, kept())
                self._proj(lp.index, kind).weight.data = w
                self.bias[(lp.index, kind)] = b


class TaskFitness:
    """KL(dense ‖ candidate) on the top-k logits at the answer positions of task-format sequences."""

    def __init__(self, model: torch.nn.Module, task: list[tuple[list[int], int]], topk: int, batch_size: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.batches = []  # (ids, mask of positions predicting an answer token)
        for start in range(0, len(task), batch_size):
            chunk = task[start : start + batch_size]
            length = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), length, dtype=torch.long)
            mask = torch.zeros(len(chunk), length, dtype=torch.bool)
            for r, (seq, first) in enumerate(chunk):  # right padding: a causal model's earlier positions ignore it
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, first - 1 : len(seq) - 1] = True
            self.batches.append((ids, mask))
        self.reference = []
        with torch.inference_mode():
            for ids, mask in self.batches:
                logits = model(input_ids=ids.to(self.device), use_cache=False).logits.float()[mask.to(self.device)]
                top, idx = logits.topk(min(topk, logits.shape[-1]), dim=-1)
                self.reference.append((torch.log_softmax(top, -1), idx))

    @torch.inference_mode()
    def __call__(self, n_batches: int) -> float:
        total, count = 0.0, 0
        for (ids, mask), (logp, idx) in zip(self.batches[:n_batches], self.reference[:n_batches]):
            logits = self.model(input_ids=ids.to(self.device), use_cache=False).logits.float()[mask.to(self.device)]
            logq = torch.log_softmax(logits.gather(-1, idx), -1)
            total += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
            count += logp.shape[0]
        return total / count


@torch.inference_mode()
def task_sequences(model, tokenizer, prompts: list[str], seq_len: int, progress: bool) -> list[tuple[list[int], int]]:
    """Each request in the chat template followed by the dense model's greedy answer (at most TASK_NEW_TOKENS and
    `seq_len` in all): (ids, index of the first answer token)."""
    from .task_data import chat_prompt, is_chat

    device = next(model.parameters()).device
    out = []
    for prompt in tqdm(prompts, desc="task-format answers", unit="prompt", disable=not progress):
        head = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=not is_chat(tokenizer)).input_ids
        head = head[-(seq_len - 8) :]  # a long request keeps its end (the stub) and room for an answer
        new = min(TASK_NEW_TOKENS, seq_len - len(head))
        ids = torch.tensor([head], device=device)
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        out.append((gen[0].tolist(), len(head)))
    return out


# --- genes -------------------------------------------------------------------------------------------------------


class Genes:
    """Shapes, costs and bounds of the (attention units, MLP channels) genes of every layer."""

    def __init__(self, adapter: DecoderAdapter, budget: float, mode: str):
        shapes = adapter.shapes()
        self.n = len(shapes)
        self.unit_cost = [attention_unit_cost(adapter, s, mode) for s in shapes]
        self.channel_cost = adapter.mlp_params(1)
        units = [s.num_kv_heads if mode == "kv_group" else s.group_size for s in shapes]
        self.max_units = [u - 1 if adapter.prunable_heads else 0 for u in units]
        self.width = [s.intermediate_size for s in shapes]
        self.max_channels = [int(MAX_LAYER_SPARSITY * w) for w in self.width]
        self.target = round(budget * sum(adapter.layer_params(s) for s in shapes))

    def removed(self, counts: Counts) -> int:
        return sum(a * u + c * self.channel_cost for (a, c), u in zip(counts, self.unit_cost))

    def fit(self, counts: Counts) -> Counts:
        """The MLP counts nudged, one channel per layer in turn, to bring the total within half a channel of the
        target (a start from another allocation, rounded per layer)."""
        counts = [list(c) for c in counts]
        r = round((self.target - self.removed(counts)) / self.channel_cost)
        sign = 1 if r > 0 else -1
        i = 0
        stuck = 0
        while r and stuck < self.n:
            c = counts[i][1] + sign
            if 0 <= c <= self.max_channels[i]:
                counts[i][1], r, stuck = c, r - sign, 0
            else:
                stuck += 1
            i = (i + 1) % self.n
        return counts

    def mutate(self, parent: Counts, centre: Counts, step: int, levels: int, rng: random.Random) -> Counts | None:
        """A legal offspring (module docstring), or None if 32 tries found none."""
        attn = any(self.max_units)
        for _ in range(32):
            child = [list(c) for c in parent]
            j = rng.randrange(self.n)  # the MLP that changes by the channels moved
            if attn and rng.random() < 0.25:
                i, d = rng.randrange(self.n), rng.choice((-1, 1))
                child[i][0] += d
                if not (0 <= child[i][0] <= self.max_units[i] and abs(child[i][0] - centre[i][0]) <= 1):
                    continue
                child[j][1] += round((self.target - self.removed(child)) / self.channel_cost)
                slack = -(-max(self.unit_cost) // self.channel_cost)  # one unit's worth beyond the levels
            else:
                k, i = rng.randint(1, 4), rng.randrange(self.n)
                if i == j:
                    continue
                child[i][1] += k * step
                child[j][1] -= k * step
                slack = 0
            if all(
                0 <= c[1] <= m and abs(c[1] - z[1]) <= levels * step + slack
                for c, z, m in zip(child, centre, self.max_channels)
            ):
                return child
        return None


def plan_counts(plan: Plan, adapter: DecoderAdapter, mode: str) -> Counts:
    """The genes of a plan: attention units and MLP channels each layer removes."""
    out = []
    for lp in plan.layers:
        s = adapter.shape(lp.index)
        units = (
            s.num_kv_heads - len(lp.kv_heads)
            if mode == "kv_group"
            else s.group_size - len(lp.query_heads) // max(s.num_kv_heads, 1)
        )
        out.append([units, s.intermediate_size - len(lp.mlp_channels)])
    return out


# --- the search ----------------------------------------------------------------------------------------------------


def search(
    adapter: DecoderAdapter,
    budget: float,
    mode: str,
    make_plan: Callable[[Counts], Plan],
    starts: list[Plan],
    context,
    rec: Reconstruction,
) -> tuple[Counts, dict]:
    """Per-layer (attention units, MLP channels) removed, minimising the fitness after the refit. Returns the counts
    and a summary (fitness of the start and of the result, every generation's best, the starts' fitness)."""
    st = context.settings
    genes = Genes(adapter, budget, mode)
    if adapter.has_experts():
        raise DomainpruneError("--allocation search --reconstruct obs does not handle mixture-of-experts layers")
    state_file: Path | None = cache.entry("search", context.cache_key) / "state.json" if context.cache_key else None
    state = cache.load_json(state_file) if state_file is not None else None
    if state is not None and state["done"]:
        log.info("search: cached result (%s)", state_file.parent)
        return state["current"], _summary(state)
    fitness = Fitness(context.model, context.sequences, st.topk, st.batch_size)
    task = TaskFitness(context.model, rec.task, st.topk, st.batch_size) if rec.task and rec.task_weight else None
    stage_batches = [max(1, round(f * len(fitness.batches))) for f in STAGE_FRACTIONS]
    task_batches = [max(1, round(f * len(task.batches))) for f in STAGE_FRACTIONS] if task else None

    with Variants(adapter) as variants:

        def build(counts: Counts) -> Supernet:
            variants.restore()
            return Supernet.build(context.model, make_plan(counts), rec, st.batch_size, context.progress)

        def evaluate(counts: Counts, stage: int) -> float:
            variants.set(make_plan(counts))
            value = fitness(stage_batches[stage])
            if task is not None:
                value += rec.task_weight * task(task_batches[stage])
            return value

        if state is None:
            rng = random.Random(context.seed)
            tried, start_fit = [], []
            for plan in starts:
                counts = genes.fit(plan_counts(plan, adapter, mode))
                if counts in tried:
                    continue
                variants.supernet = build(counts)
                tried.append(counts)
                start_fit.append(evaluate(counts, 2))
                log.info("search: start %d: fitness %.6f after the refit", len(tried), start_fit[-1])
            best = min(range(len(tried)), key=lambda s: (start_fit[s], s))
            if best != len(tried) - 1:
                variants.supernet = build(tried[best])
            state = {
                "round": 0,
                "generation": 0,
                "start": tried[best],
                "centre": tried[best],
                "current": tried[best],
                "fitness": start_fit[best],
                "start_fitness": start_fit[best],
                "starts_fitness": start_fit,
                "history": [],
                "done": False,
            }
        else:
            rng = resumed_rng(state)
            variants.supernet = build(state["centre"])
        bar = generations_bar(state, st, "search (refitted)", context.progress)
        mean_width = sum(genes.width) / genes.n
        while not state["done"]:
            step = max(1, round(st.step / 2 ** state["round"] * mean_width))
            centre, parent = state["centre"], state["current"]
            children = [
                c
                for c in (genes.mutate(parent, centre, step, st.levels, rng) for _ in range(st.offspring))
                if c is not None
            ]
            best_fit, best = select(children, evaluate)
            if best_fit < state["fitness"]:
                state["current"], state["fitness"] = children[best], best_fit
            state["history"].append(round(state["fitness"], 8))
            state["generation"] += 1
            if state["generation"] == st.generations:  # next round: a supernet around the best, Δ halved
                state["round"], state["generation"] = state["round"] + 1, 0
                state["done"] = state["round"] == st.rounds
                if not state["done"]:
                    state["centre"] = state["current"]
                    variants.supernet = build(state["centre"])
                    state["fitness"] = evaluate(state["centre"], 2)  # judged again on the new supernet
                else:  # the start judged on the last supernet too, so that the two figures compare
                    state["start_fitness"] = evaluate(state["start"], 2)
            end_generation(state, rng, state_file, bar)
        bar.close()
    return state["current"], _summary(state)


def _summary(state: dict) -> dict:
    log.info("search: fitness %.6f (best start) → %.6f, both after the refit", state["start_fitness"], state["fitness"])
    return {
        "start_kl": state["start_fitness"],
        "kl": state["fitness"],
        "history": state["history"],
        "starts_kl": state["starts_fitness"],
        "counts": state["current"],
    }
