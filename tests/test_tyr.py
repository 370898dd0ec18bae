"""`--allocation search --reconstruct obs` (domainprune.tyr): genes that keep the budget, candidates judged after
their OBS refit (the installed weights are the refit, and compute what the sliced model computes), a resumable and
deterministic search through the real pipeline, and the task-format KL. Tiny random Llamas with the real tokenizer
and code corpus."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
from tiny_pipeline import CALIB, loaded, logits_on, smol_tokenizer, tiny_lm

from domainprune import cache, tyr
from domainprune.adapters import get_adapter
from domainprune.allocation import uniform_counts
from domainprune.criteria import get_criterion
from domainprune.errors import DomainpruneError
from domainprune.obs import _write_columns, refit
from domainprune.pipeline import calibration_sequences, make_recipe
from domainprune.plan import dense_plan
from domainprune.run import prune
from domainprune.search import MAX_LAYER_SPARSITY
from domainprune.stats import collect_statistics

SEARCH = dict(search_generations=2, search_offspring=4, search_rounds=2, search_samples=4)


@pytest.mark.parametrize("mode", ["kv_group", "query_head"])
def test_mutations_keep_the_budget_within_half_a_channel_and_the_levels(mode):
    model = tiny_lm(num_hidden_layers=6, intermediate_size=120)
    a = get_adapter(model)
    genes = tyr.Genes(a, 0.35, mode)
    start = genes.fit([list(c) for c in uniform_counts(a, 0.35, mode)])
    assert abs(genes.removed(start) - genes.target) <= genes.channel_cost / 2
    rng = random.Random(0)
    counts, kinds, moves = start, set(), 0
    for _ in range(400):
        child = genes.mutate(counts, start, 3, 4, rng)
        if child is None:  # no legal move found in 32 tries: the search skips that offspring
            continue
        moves += 1
        assert abs(genes.removed(child) - genes.target) <= genes.channel_cost / 2
        for (u, c), (u0, c0), m, mu in zip(child, start, genes.max_channels, genes.max_units):
            assert 0 <= c <= m <= MAX_LAYER_SPARSITY * 120 and 0 <= u <= mu and abs(u - u0) <= 1
            assert abs(c - c0) <= 4 * 3 + -(-max(genes.unit_cost) // genes.channel_cost)
        kinds.add("attention" if [u for u, _ in child] != [u for u, _ in counts] else "mlp")
        counts = child
    assert moves > 300 and kinds == {"attention", "mlp"}  # both genes move


def _supernet_case(bias: bool):
    tok = smol_tokenizer()
    model = tiny_lm()
    recipe = make_recipe(method="wanda-sp", allocation="uniform", sparsity=0.4, **CALIB)
    a = get_adapter(model)
    seqs = calibration_sequences(recipe, tok)
    stats = collect_statistics(model, a, seqs, batch_size=2, progress=False)
    crit = get_criterion("wanda-sp")
    scores = [crit.score_layer(a, i, stats[i]) for i in range(a.num_layers)]
    from domainprune.allocation import uniform_layer

    def make(counts):
        layers = [uniform_layer(a, i, sc, tuple(c), "kv_group") for i, (sc, c) in enumerate(zip(scores, counts))]
        return dense_plan(a, "tiny").model_copy(update={"layers": layers})

    centre = make([[1, 16]] * a.num_layers)
    rec = tyr.Reconstruction(seqs, bias, ["uniform"])
    net = tyr.Supernet.build(model, centre, rec, 2, progress=False)
    return model, a, make, net


@pytest.mark.parametrize("bias", [False, True])
def test_installed_candidate_is_the_refit_and_computes_what_the_sliced_model_computes(bias):
    model, a, make, net = _supernet_case(bias)
    dense = copy.deepcopy(model)
    cand = make([[1, 16], [0, 24], [1, 8], [0, 0]])  # other levels than the centre's, one layer untouched
    ids = torch.arange(5, 400, 13)[None]
    with tyr.Variants(a) as variants:
        variants.supernet = net
        variants.set(cand)
        got = logits_on(model, ids)
        for lp in cand.layers[:3]:
            kept = torch.tensor(lp.mlp_channels)
            want, b = refit(
                dense.model.layers[lp.index].mlp.down_proj.weight, net.hessians[(lp.index, "mlp")], kept, bias=bias
            )
            w = a.down_proj(lp.index).weight
            torch.testing.assert_close(w[:, kept], want.float())  # the kept columns are refitted ...
            assert not torch.allclose(w[:, kept], dense.model.layers[lp.index].mlp.down_proj.weight[:, kept])
            gone = torch.ones(w.shape[1], dtype=torch.bool)
            gone[kept] = False
            assert torch.all(w[:, gone] == 0)  # ... and the removed ones contribute nothing
            assert (b is not None) == bias
        assert torch.equal(a.down_proj(3).weight, dense.model.layers[3].mlp.down_proj.weight)
    # leaving restores the dense weights
    for p, q in zip(model.parameters(), dense.parameters()):
        assert torch.equal(p, q)
    # the same refit written into a copy and sliced out computes the same logits
    sliced = copy.deepcopy(dense)
    sa = get_adapter(sliced)
    means = []
    for lp in cand.layers:
        m = {}
        for kind, proj, kept in (
            ("attn", sa.o_proj(lp.index), tyr._head_columns(lp.query_heads, sa.head_dim)),
            ("mlp", sa.down_proj(lp.index), torch.tensor(lp.mlp_channels)),
        ):
            if kept.numel() == proj.weight.shape[1]:
                continue
            new, b = refit(proj.weight, net.hessians[(lp.index, kind)], kept, bias=bias)
            _write_columns(proj, kept, new)
            m[kind] = b
        means.append(m)
    for lp, m in zip(cand.layers, means):
        sa.slice_attention(lp.index, lp.query_heads, lp.kv_heads, m.get("attn"))
        sa.slice_mlp(lp.index, lp.mlp_channels, m.get("mlp"))
    torch.testing.assert_close(got, logits_on(sliced, ids), rtol=1e-4, atol=1e-4)


def _search(**extra):
    tok = smol_tokenizer()
    fields = dict(method="cfsp", allocation="search", reconstruct="obs", sparsity=0.35, **SEARCH, **CALIB)
    return prune(loaded(tiny_lm(), tok), progress=False, **fields, **extra)


def test_search_with_reconstruction_meets_the_budget_and_resumes_identically(monkeypatch, interrupted_search):
    searches = cache.cache_dir() / "search"
    shutil.rmtree(searches, ignore_errors=True)
    full = _search()
    start_kl, kl = full.recipe.search_kl
    assert kl <= start_kl + 1e-12  # elitist within the last round, both judged on its supernet
    a = get_adapter(tiny_lm())
    genes = tyr.Genes(a, 0.35, "kv_group")
    counts = tyr.plan_counts(full.plan, a, "kv_group")
    assert abs(genes.removed(counts) - genes.target) <= genes.channel_cost / 2
    assert full.recipe.reconstruct == "obs" and full.recipe.search_generations == 2

    # interrupted after the second generation's state is saved, then resumed: the same plan and weights
    shutil.rmtree(searches)
    with interrupted_search():
        _search()
    resumed = _search()
    assert resumed.plan.layers == full.plan.layers and resumed.recipe.search_kl == full.recipe.search_kl
    for (k, x), (_, y) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), k
    monkeypatch.setattr(tyr, "Fitness", None)  # a finished search needs no evaluation at all
    assert _search().plan.layers == full.plan.layers


def test_task_format_kl_is_zero_for_the_dense_model_and_enters_the_fitness():
    with pytest.raises(DomainpruneError, match="needs --allocation search --reconstruct obs"):
        make_recipe(method="cfsp", allocation="search", sparsity=0.35, search_task_weight=1.0).resolved()
    tok = smol_tokenizer()
    model = tiny_lm()
    recipe = make_recipe(method="cfsp", allocation="search", reconstruct="obs", sparsity=0.35, **CALIB).resolved()
    first = tyr.task_data(loaded(model, tok), recipe, progress=False)
    again = tyr.task_sequences(model, tok, [], recipe.seq_len, progress=False)
    assert again == [] and len(first) == tyr.TASK_PROMPTS
    assert all(first_answer < len(ids) <= recipe.seq_len for ids, first_answer in first)
    assert tyr.task_data(loaded(model, tok), recipe, progress=False) == first  # deterministic (and cached)
    fit = tyr.TaskFitness(model, first, topk=64, batch_size=3)
    assert fit(len(fit.batches)) == pytest.approx(0.0, abs=1e-9)
    searches = cache.cache_dir() / "search"
    shutil.rmtree(searches, ignore_errors=True)

    def starts_fitness(**extra) -> list[float]:
        before = set(searches.glob("*/state.json"))
        _search(**extra)
        (state,) = set(searches.glob("*/state.json")) - before
        return json.loads(state.read_text())["starts_fitness"]

    plain, weighted = starts_fitness(), starts_fitness(search_task_weight=1.0)
    assert len(plain) == len(weighted) == 2  # uniform and cfsp's own allocation
    for p, w in zip(plain, weighted):  # the same starts on the same supernets, plus a positive task KL
        assert w > p + 1e-6
