"""Importance criteria on constructed cases with known answers, checked against hand computation on the o_proj and
down_proj inputs of a plain forward pass; GQA grouping; wanda-sp's sequential scoring; FLAP's standardisation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import input_ids, tiny_model
from tiny_pipeline import CALIB, assert_same_state, loaded, smol_tokenizer, state, tiny_lm

from domainprune.adapters import get_adapter
from domainprune.allocation import allocate, uniform_counts, uniform_layer
from domainprune.criteria import CRITERIA, LayerScores, get_criterion
from domainprune.errors import DomainpruneError
from domainprune.pipeline import calibration_sequences, make_plan, make_recipe
from domainprune.plan import dense_plan
from domainprune.stats import collect_statistics
from domainprune.surgery import finish, prune_layer

HD, H, K, G, C = 8, 6, 2, 3, 40  # the tiny models: 6 query heads in 2 KV groups of 3, 40 MLP channels


def cols(heads):
    return [c for h in heads for c in range(h * HD, (h + 1) * HD)]


def stats_of(model, ids=None):
    ids = input_ids(batch=4, length=16) if ids is None else ids
    return collect_statistics(model, get_adapter(model), ids, batch_size=2, use_cache=False, progress=False)


def inputs_of(model, layer: int, ids=None):
    """(o_proj input, down_proj input) of one layer over a plain forward pass, tokens flattened, float64."""
    ids = input_ids(batch=4, length=16) if ids is None else ids
    a = get_adapter(model)
    got = {}
    hooks = [
        a.o_proj(layer).register_forward_pre_hook(
            lambda m, args: got.update(attn=args[0].reshape(-1, args[0].shape[-1]).double())
        ),
        a.down_proj(layer).register_forward_pre_hook(
            lambda m, args: got.update(mlp=args[0].reshape(-1, args[0].shape[-1]).double())
        ),
    ]
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return got["attn"], got["mlp"]


def score(method, model, layer, stats=None):
    return get_criterion(method).score_layer(get_adapter(model), layer, stats[layer] if stats else None)


def test_registry():
    # expert criteria for mixture-of-experts models are tested in test_moe.py
    # gradient criteria (taylor, fisher, dpruner, gaprune, nirvana) are tested in test_gradients.py, cfsp in
    # test_allocation.py; depth and OBS methods in their own files
    expected = {
        "flap",
        "magnitude",
        "wanda-sp",
        "cfsp",
        "expert-frequency",
        "easy-ep",
        "tcess",
        "taylor",
        "fisher",
        "dpruner",
        "gaprune",
        "nirvana",
    }
    assert expected <= set(CRITERIA)
    with pytest.raises(DomainpruneError, match=f"unknown method 'nope'; available: {', '.join(sorted(CRITERIA))}$"):
        get_criterion("nope")
    with pytest.raises(DomainpruneError, match="unknown method"):
        make_recipe(method="nope", sparsity=0.2)
    flap, wanda, mag = (get_criterion(n) for n in ("flap", "wanda-sp", "magnitude"))
    assert (flap.standardized, flap.default_allocation, flap.default_bias_compensation) == (True, "global", True)
    assert (wanda.sequential, wanda.default_allocation, wanda.default_bias_compensation) == (True, "uniform", False)
    assert not mag.needs_statistics


# --- magnitude ---------------------------------------------------------------------------------------------


def test_magnitude_hand_computed_and_zeroed_units_score_lowest():
    model = tiny_model("llama")
    a = get_adapter(model)
    q, k, v = (p.weight for p in a.attention_in_projs(1))
    o, down = a.o_proj(1).weight, a.down_proj(1).weight
    gate, up = (p.weight for p in a.mlp_in_projs(1))
    with torch.no_grad():
        q[cols([4])] = 0  # head 4: q rows and o columns
        o[:, cols([4])] = 0
        q[cols([0, 1, 2])] = 0  # KV group 0: all it owns
        o[:, cols([0, 1, 2])] = 0
        k[cols([0])] = 0
        v[cols([0])] = 0
        gate[7] = up[7] = 0  # channel 7
        down[:, 7] = 0
    s = score("magnitude", model, 1)
    assert s.heads.shape == (H,) and s.groups.shape == (K,) and s.channels.shape == (C,)
    assert s.heads[4] == 0 and s.heads[[3, 5]].min() > 0 and s.heads[:3].eq(0).all()
    assert s.groups[0] == 0 < s.groups[1]
    assert s.channels[7] == 0 and int(s.channels.argmin()) == 7 and (s.channels > 0).sum() == C - 1
    w = lambda t: t.detach().double()  # noqa: E731
    head_sq = lambda h: w(q)[cols([h])].pow(2).sum() + w(o)[:, cols([h])].pow(2).sum()  # noqa: E731
    expected_group1 = (
        sum(head_sq(h) for h in (3, 4, 5)) + w(k)[cols([1])].pow(2).sum() + w(v)[cols([1])].pow(2).sum()
    ).sqrt()
    torch.testing.assert_close(s.groups[1], expected_group1)
    torch.testing.assert_close(s.heads[3], head_sq(3).sqrt())
    expected_ch = (w(gate)[11].pow(2).sum() + w(up)[11].pow(2).sum() + w(down)[:, 11].pow(2).sum()).sqrt()
    torch.testing.assert_close(s.channels[11], expected_ch)
    # and the plan removes exactly those units of layer 1
    plan, _, _ = make_plan(loaded(model), make_recipe(model="tiny", method="magnitude", sparsity=0.5), progress=False)
    lp = plan.layers[1]
    assert lp.kv_heads == [1] and lp.query_heads == [3, 4, 5] and 7 not in lp.mlp_channels


# --- wanda-sp ----------------------------------------------------------------------------------------------


def test_wanda_sp_hand_computed_and_zero_columns_score_lowest():
    model = tiny_model("llama")
    a = get_adapter(model)
    with torch.no_grad():
        a.o_proj(2).weight[:, cols([3, 4, 5])] = 0  # every head of KV group 1 writes nothing
        a.down_proj(2).weight[:, 13] = 0
    stats = stats_of(model)
    s = score("wanda-sp", model, 2, stats)
    x_attn, x_mlp = inputs_of(model, 2)
    o, down = a.o_proj(2).weight.detach().double(), a.down_proj(2).weight.detach().double()
    attn = o.abs().mean(0) * x_attn.pow(2).sum(0).sqrt()
    mlp = down.abs().mean(0) * x_mlp.pow(2).sum(0).sqrt()
    torch.testing.assert_close(s.channels, mlp)
    torch.testing.assert_close(s.heads, attn.reshape(H, HD).sum(1))
    torch.testing.assert_close(s.groups, attn.reshape(K, G * HD).sum(1))  # a group sums its own heads 3k..3k+2
    assert s.channels[13] == 0 and int(s.channels.argmin()) == 13
    assert s.heads[3:].eq(0).all() and s.heads[:3].gt(0).all()
    assert s.groups[1] == 0 < s.groups[0]


def test_wanda_sp_groups_follow_gqa_layout():
    """Zeroing one head in each group leaves both groups alive: heads belong to KV head h // 3, not h % 2."""
    model = tiny_model("llama")
    a = get_adapter(model)
    with torch.no_grad():
        a.o_proj(0).weight[:, cols([0, 3])] = 0
    s = score("wanda-sp", model, 0, stats_of(model))
    assert s.heads[0] == s.heads[3] == 0
    assert s.groups.gt(0).all()
    torch.testing.assert_close(s.groups, s.heads.reshape(K, G).sum(1))
    with torch.no_grad():
        a.o_proj(0).weight[:, cols([1, 2])] = 0  # now all of group 0
    s = score("wanda-sp", model, 0, stats_of(model))
    assert s.groups[0] == 0 < s.groups[1]


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_wanda_sp_scores_each_layer_on_the_pruned_layers_outputs(unit):
    tok = smol_tokenizer()
    recipe = make_recipe(model="tiny", method="wanda-sp", sparsity=0.4, attention_unit=unit, **CALIB)
    assert recipe.allocation == "uniform" and not recipe.bias_compensation
    model = tiny_lm()
    plan, stats, pruned = make_plan(loaded(model, tok), recipe, progress=False)
    assert pruned  # sequential: the model already matches the plan
    assert len({lp.shape() for lp in plan.layers}) == 1  # uniform counts
    assert get_adapter(model).is_uniform() and get_adapter(model).shape(0) == plan.layers[0].shape()

    # reference: score layer i on a model whose layers < i are already pruned to the plan
    ref = tiny_lm()
    a = get_adapter(ref)
    seqs = calibration_sequences(recipe, tok)
    counts = uniform_counts(a, 0.4, unit)
    dense_stats = collect_statistics(ref, a, seqs, batch_size=2, use_cache=False, progress=False)
    for i in range(a.num_layers):
        layer_stats = collect_statistics(ref, a, seqs, batch_size=2, use_cache=False, progress=False)[i]
        for key in ("attn_in_sqsum", "mlp_in_sqsum"):
            torch.testing.assert_close(stats[i][key], layer_stats[key])
            if i > 0:  # the inputs really changed: these are not the dense model's statistics
                assert not torch.allclose(layer_stats[key], dense_stats[i][key], rtol=1e-3)
        lp = uniform_layer(a, i, get_criterion("wanda-sp").score_layer(a, i, layer_stats), counts[i], unit)
        assert lp == plan.layers[i]
        prune_layer(a, lp)
    finish(a, plan, False)
    assert_same_state(state(model), state(ref))


# --- FLAP --------------------------------------------------------------------------------------------------


def _z(x):
    return (x - x.mean()) / x.std()


def test_flap_hand_computed_and_standardized():
    model = tiny_model("llama")
    a = get_adapter(model)
    stats = stats_of(model)
    for layer in range(4):
        s = score("flap", model, layer, stats)
        x_attn, x_mlp = inputs_of(model, layer)
        o, down = a.o_proj(layer).weight.detach().double(), a.down_proj(layer).weight.detach().double()
        attn_z = _z((x_attn.var(0, unbiased=False) * o.pow(2).sum(0)) ** 2)  # attention metric squared
        mlp_z = _z(x_mlp.var(0, unbiased=False) * down.pow(2).sum(0))
        torch.testing.assert_close(s.channels, mlp_z, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.heads, attn_z.reshape(H, HD).mean(1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.groups, attn_z.reshape(K, G * HD).mean(1), rtol=1e-4, atol=1e-6)
        # standardised within the module: mean 0 (and unit spread) over the channels, hence over heads and groups
        assert abs(float(s.channels.mean())) < 1e-9 and float(s.channels.std()) == pytest.approx(1)
        assert abs(float(s.heads.mean())) < 1e-9 and abs(float(s.groups.mean())) < 1e-9


def test_flap_zero_variance_and_zero_columns_score_lowest():
    model = tiny_model("llama")
    a = get_adapter(model)
    with torch.no_grad():
        a.mlp_in_projs(1)[1].weight[5] = 0  # up_proj row 5: channel 5's input is always 0, variance 0
        a.down_proj(1).weight[:, 22] = 0  # channel 22 writes nothing
        a.attention_in_projs(1)[2].weight[cols([1])] = 0  # v head 1: heads 3-5 read zeros, variance 0
    stats = stats_of(model)
    s = score("flap", model, 1, stats)
    assert set(s.channels.argsort()[:2].tolist()) == {5, 22}
    assert s.channels[5] == s.channels[22] == s.channels.min() < s.channels.sort().values[2]
    assert s.heads[3:].max() < s.heads[:3].min() and s.groups[1] < s.groups[0]
    # a global plan takes the dead group and the dead channels before anything else
    scores = [get_criterion("flap").score_layer(a, i, stats[i]) for i in range(4)]
    plan = allocate("global", dense_plan(a, "tiny"), a, scores, 0.1, standardized=True)
    assert {5, 22}.isdisjoint(plan.layers[1].mlp_channels)


# --- grouping under global allocation ----------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_standardized_attention_units_stay_on_the_head_scale(unit):
    """A unit whose every head scores z = -0.6 must rank above MLP channels at z = -1.0, whether the unit is a
    KV group or a rank slice of query heads (a slice must not add up its K heads' scores)."""
    model = tiny_model("llama")
    a = get_adapter(model)
    heads = torch.full((H,), -0.6, dtype=torch.float64)
    channels = torch.cat([torch.full((10,), -1.0), torch.full((C - 10,), 1.0)]).double()
    scores = [LayerScores(heads=heads, groups=heads.reshape(K, G).mean(1), channels=channels) for _ in range(4)]
    per_layer = a.layer_params(a.shape(0))
    sparsity = 4 * 10 * a.mlp_params(1) / (4 * per_layer)  # exactly the weak channels
    plan = allocate("global", dense_plan(a, "tiny"), a, scores, sparsity, attention_unit=unit, standardized=True)
    for lp in plan.layers:
        assert lp.query_heads == list(range(H)) and lp.kv_heads == list(range(K))
        assert lp.mlp_channels == list(range(10, C))
