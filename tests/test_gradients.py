"""Gradient criteria (taylor, fisher, dpruner, gaprune, nirvana): per-unit accumulation against brute force from full
per-sample gradients, rankings on constructed cases, GQA grouping, determinism, the general-data fallback, the
no-gradient error, NIRVANA's ratio allocation and the KL-selected calibration candidates."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_models import input_ids, tiny_model
from tiny_pipeline import CALIB, loaded, smol_tokenizer, tiny_lm

from domainprune import gradients as gr
from domainprune.adapters import get_adapter
from domainprune.allocation import ALLOCATIONS, allocate, nirvana_fractions
from domainprune.criteria import CRITERIA, LayerScores, get_criterion
from domainprune.criteria.gradient import GradientContext
from domainprune.errors import DomainpruneError
from domainprune.pipeline import (
    _make_plan_once,
    apply,
    calibration_sequences,
    general_sequences,
    kl_divergence,
    make_plan,
    make_recipe,
)
from domainprune.plan import dense_plan

HD, H, K, G, C = 8, 6, 2, 3, 40
GRADIENT_METHODS = ("taylor", "fisher", "dpruner", "gaprune", "nirvana")


def test_registry():
    assert set(GRADIENT_METHODS) <= set(CRITERIA)
    for name in GRADIENT_METHODS:
        c = get_criterion(name)
        assert c.needs_gradients and not c.needs_statistics
    assert get_criterion("nirvana").default_allocation == "nirvana-ratio" and "nirvana-ratio" in ALLOCATIONS
    assert get_criterion("dpruner").two_streams and get_criterion("gaprune").two_streams
    assert make_recipe(method="taylor", sparsity=0.2).taylor_mode == "vector"
    assert make_recipe(method="fisher", sparsity=0.2).micro_batch == 1
    assert make_recipe(method="flap", sparsity=0.2).micro_batch is None
    with pytest.raises(DomainpruneError, match="--taylor-mode must be one of vector, element, param_mix"):
        make_recipe(method="taylor", sparsity=0.2, taylor_mode="nope")


# --- per-unit accumulation == brute force from full per-sample gradients ------------------------------------------


def _slice_sum(e, proj):
    rows, kind = gr.LAYOUT[proj]
    w = 1 if kind == "channel" else HD
    s = e.sum(1) if rows else e.sum(0)
    return s.double().reshape(-1, w).sum(1)


def test_accumulation_matches_brute_force():
    model = tiny_model("llama")
    a = get_adapter(model)
    ids = input_ids(batch=3, length=10)
    names = [(i, p) for i in range(a.num_layers) for p in gr.PROJS]
    weights = [gr.target_weights(a, i)[p] for i, p in names]
    torch.manual_seed(3)
    G = [{p: torch.rand_like(w) for p, w in gr.target_weights(a, i).items()} for i in range(a.num_layers)]
    ref = [{p: torch.randn_like(w) for p, w in gr.target_weights(a, i).items()} for i in range(a.num_layers)]
    got, mean_g = gr.accumulate(
        model,
        a,
        ids,
        quantities={"wg", "w2g2", "absw_g2", "abs_wgbar", "mix", "dpruner", "gbar_dot_ref"},
        micro_batch=1,
        general_importance=G,
        reference=ref,
        keep_mean_gradient=True,
        progress=False,
    )
    # brute force: the full gradient of every sample, kept
    per_sample = []
    for n in range(ids.shape[0]):
        with torch.enable_grad():
            loss = gr.objective_value(model, ids[n : n + 1], "loss")
            per_sample.append(torch.autograd.grad(loss, weights))
    lam, eta = 0.1, 0.03
    for k, (i, p) in enumerate(names):
        w = weights[k].detach()
        gs = torch.stack([g[k] for g in per_sample])
        gbar, fisher = gs.mean(0), (gs * gs).mean(0)
        gp = gs + 2 * lam * G[i][p] * (-eta * gs)
        dp = ((gp * w) + 0.5 * (gp * w) ** 2).abs()
        expect = {
            "wg": _slice_sum(w * gbar, p),
            "w2g2": _slice_sum(w * w * fisher, p),
            "absw_g2": _slice_sum(w.abs() * fisher, p),
            "abs_wgbar": _slice_sum((w * gbar).abs(), p),
            "mix": _slice_sum((w * gbar - 0.5 * w * w * fisher).abs(), p),
            "dpruner": torch.stack([_slice_sum(d, p) for d in dp]).mean(0),
            "gbar_dot_ref": _slice_sum(gbar * ref[i][p], p),
            "gbar_sq": _slice_sum(gbar * gbar, p),
            "ref_sq": _slice_sum(ref[i][p] ** 2, p),
        }
        for q, v in expect.items():
            torch.testing.assert_close(
                got[i][q][p], v, rtol=1e-4, atol=1e-5 * float(v.abs().max()), msg=f"{q} {p} layer {i}"
            )
        torch.testing.assert_close(mean_g[i][p], gbar, rtol=1e-4, atol=1e-9)
    assert all(w.grad is None for w in weights)  # released


def test_micro_batches_and_checkpointing(monkeypatch):
    """micro_batch=3 gives Fisher of micro-batch gradients; checkpointing is really used and changes nothing."""
    import transformers.modeling_utils as mu

    model = tiny_model("llama")
    a = get_adapter(model)
    ids = input_ids(batch=3, length=10)
    plain, _ = gr.accumulate(model, a, ids, quantities={"w2g2", "wg"}, micro_batch=3, progress=False)
    calls = []
    real = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    ckpt, _ = gr.accumulate(
        model, a, ids, quantities={"w2g2", "wg"}, micro_batch=3, gradient_checkpointing=True, progress=False
    )
    assert len(calls) == a.num_layers  # one checkpointed call per decoder layer
    w = gr.target_weights(a, 2)["down"]
    with torch.enable_grad():
        (g,) = torch.autograd.grad(gr.objective_value(model, ids, "loss"), [w])
    torch.testing.assert_close(
        plain[2]["w2g2"]["down"], _slice_sum(w.detach() ** 2 * g * g, "down"), rtol=1e-4, atol=1e-10
    )
    for q in ("w2g2", "wg"):
        for p in gr.PROJS:
            torch.testing.assert_close(plain[1][q][p], ckpt[1][q][p], rtol=1e-5, atol=1e-10)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in a.layers) and not model.training


# --- rankings on constructed cases ----------------------------------------------------------------------------------


def constructed_model():
    """Layer 1: head 0 and channel 3 zeroed (lowest); head 4's o columns and channel 7 scaled up strongly (highest)."""
    model = tiny_lm("llama")
    a = get_adapter(model)
    q, k, v = a.attention_in_projs(1)
    gate, up = a.mlp_in_projs(1)
    with torch.no_grad():
        q.weight[0:HD] = 0
        a.o_proj(1).weight[:, 0:HD] = 0
        a.o_proj(1).weight[:, 4 * HD : 5 * HD] *= 6
        q.weight[4 * HD : 5 * HD] *= 2
        for m in (gate, up):
            m.weight[3] = 0
            m.weight[7] *= 3
        a.down_proj(1).weight[:, 3] = 0
        a.down_proj(1).weight[:, 7] *= 3
    return model


def context(model, tok, recipe, **kw):
    seqs = calibration_sequences(recipe, tok, mix=False)
    return GradientContext(
        model, get_adapter(model), seqs, lambda: general_sequences(recipe, tok), use_cache=False, progress=False, **kw
    )


@pytest.mark.parametrize(
    "method,mode",
    [
        ("taylor", "vector"),
        ("taylor", "element"),
        ("taylor", "param_mix"),
        ("fisher", None),
        ("dpruner", None),
        ("gaprune", None),
        ("nirvana", None),
    ],
)
def test_constructed_ranking(method, mode):
    tok = smol_tokenizer()
    model = constructed_model()
    recipe = make_recipe(method=method, sparsity=0.2, general_data="general", **CALIB)
    crit = get_criterion(method)
    if method == "gaprune":
        # DAI subtracts β·(general Fisher): with β=1 a unit that matters even more to general text than to the
        # domain (as a strongly scaled channel does here) is ranked down on purpose; β=0 checks the domain side.
        crit.beta = 0.0
    crit.prepare(context(model, tok, recipe, taylor_mode=mode))
    sc = crit.score_layer(get_adapter(model), 1, None)
    assert int(sc.heads.argmin()) == 0 and int(sc.heads.argmax()) == 4, sc.heads
    assert int(sc.channels.argmin()) == 3 and int(sc.channels.argmax()) == 7, sc.channels
    assert int(sc.groups.argmax()) == 1  # head 4 is in KV group 1


def test_gaprune_dai_by_hand():
    """DAI per unit with the default β=1, γ=0.5, α=0.2 and the z-scored alignment, recomputed from the units."""
    tok = smol_tokenizer()
    model = tiny_lm("llama")
    recipe = make_recipe(method="gaprune", sparsity=0.2, general_data="general", **CALIB)
    crit = get_criterion("gaprune")
    crit.prepare(context(model, tok, recipe))
    a = get_adapter(model)
    u = crit.units[2]
    ch = lambda q: u[q]["gate"] + u[q]["up"] + u[q]["down"]  # noqa: E731
    f = ch("absw_g2") - ch("absw_g2_general")
    f = f / f.abs().mean()
    cos = ch("gbar_dot_ref") / (ch("gbar_sq") * ch("ref_sq")).sqrt()
    align = (1 + 0.2 * (cos - cos.mean()) / cos.std()).clamp(0.8, 1.2)
    w = gr.target_weights(a, 2)
    m = w["gate"].abs().sqrt().sum(1) + w["up"].abs().sqrt().sum(1) + w["down"].abs().sqrt().sum(0)
    m = m.double() / m.double().mean()
    expect = torch.nn.functional.softplus(f * align + 0.5 * m)
    torch.testing.assert_close(crit.score_layer(a, 2, None).channels, expect, rtol=1e-5, atol=1e-8)
    assert align.min() < 0.95 and align.max() > 1.05  # the rescaled alignment really moves scores


def test_deterministic_and_gqa_grouping():
    tok = smol_tokenizer()
    recipe = make_recipe(method="taylor", sparsity=0.2, seed=5, **CALIB)
    runs = []
    for _ in range(2):
        torch.manual_seed(recipe.seed)
        model = tiny_lm("llama")
        crit = get_criterion("taylor")
        crit.prepare(context(model, tok, recipe, taylor_mode="element"))
        runs.append((crit, [crit.score_layer(get_adapter(model), i, None) for i in range(4)]))
    for s1, s2 in zip(runs[0][1], runs[1][1]):
        assert (
            torch.equal(s1.heads, s2.heads)
            and torch.equal(s1.groups, s2.groups)
            and torch.equal(s1.channels, s2.channels)
        )
    crit, scores = runs[0]
    for i, sc in enumerate(scores):
        u = crit.units[i]["abs_wgbar"]
        for g in range(K):  # a KV group = its own query heads (q rows + o columns) + its k and v rows
            own = sc.heads[g * G : (g + 1) * G].sum() + u["k"][g] + u["v"][g]
            torch.testing.assert_close(sc.groups[g], own)
        torch.testing.assert_close(sc.heads, u["q"] + u["o"])
        torch.testing.assert_close(sc.channels, u["gate"] + u["up"] + u["down"])


# --- general data, errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpruner", "gaprune"])
def test_two_stream_methods_fall_back_to_general(method, caplog):
    tok = smol_tokenizer()
    recipe = make_recipe(method=method, sparsity=0.2, **CALIB)
    with caplog.at_level(logging.WARNING):
        plan, _, _ = make_plan(loaded(tiny_lm("llama"), tok), recipe, progress=False)
    assert any("bundled 'general' preset" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert plan.params.sparsity == pytest.approx(0.2, abs=0.03)
    assert torch.equal(
        general_sequences(recipe, tok),
        calibration_sequences(
            make_recipe(data="general", sparsity=0.2, **{k: v for k, v in CALIB.items() if k != "data"}), tok
        ),
    )


def test_general_ratio_mixes_the_single_stream():
    tok = smol_tokenizer()
    mixed = calibration_sequences(make_recipe(method="taylor", sparsity=0.2, general_ratio=0.5, **CALIB), tok)
    code = calibration_sequences(make_recipe(method="taylor", sparsity=0.2, **{**CALIB, "calib_samples": 2}), tok)
    gen = calibration_sequences(
        make_recipe(method="taylor", sparsity=0.2, **{**CALIB, "data": "general", "calib_samples": 2}), tok
    )
    assert torch.equal(mixed, torch.cat([code, gen]))


def test_no_gradient_model_gives_clear_error():
    tok = smol_tokenizer()
    model = tiny_lm("llama").requires_grad_(False)
    with pytest.raises(
        DomainpruneError, match=r"method 'fisher' needs gradients, but layer 0 q_proj has requires_grad=False"
    ) as e:
        make_plan(loaded(model, tok), make_recipe(method="fisher", sparsity=0.2, **CALIB), progress=False)
    assert "\n" not in str(e.value)
    half = tiny_model("llama").half()
    with pytest.raises(DomainpruneError, match="float16 on CPU"):
        gr.check_backprop(half, get_adapter(half), "taylor")


# --- nirvana-ratio allocation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.2, 0.4])
def test_nirvana_ratio_allocation(sparsity):
    model = tiny_model("llama", intermediate_size=64)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    scores = [
        LayerScores(torch.rand(H, generator=g), torch.rand(K, generator=g), torch.rand(64, generator=g))
        for _ in range(4)
    ]
    plan = allocate("nirvana-ratio", dense_plan(a, "tiny"), a, scores, sparsity)
    attn_total = 4 * a.attention_params(H, K)
    mlp_total = 4 * a.mlp_params(64)
    attn_removed = attn_total - sum(a.attention_params(len(lp.query_heads), len(lp.kv_heads)) for lp in plan.layers)
    mlp_removed = mlp_total - sum(a.mlp_params(len(lp.mlp_channels)) for lp in plan.layers)
    target = sparsity * (attn_total + mlp_total)
    group_cost = a.attention_params(G, 1)
    # the budget within one unit (an MLP unit is 8 channels: kept widths are multiples of 8)
    assert abs(attn_removed + mlp_removed - target) <= 8 * a.mlp_params(1) / 2 + 1
    a_frac, m_frac = nirvana_fractions(attn_total, mlp_total, sparsity, 3.0)
    assert abs(attn_removed - a_frac * attn_total) <= group_cost / 2 + 1
    assert attn_removed / attn_total == pytest.approx(mlp_removed / mlp_total / 3.0, abs=group_cost / attn_total)
    for lp in plan.layers:
        assert len(lp.kv_heads) >= 1 and len(lp.mlp_channels) % 8 == 0
    for lp in plan.layers:  # within a layer the weakest channels go (the rounding only moves the layer's count)
        ch = scores[lp.index].channels
        gone = [c for c in range(64) if c not in lp.mlp_channels]
        if gone:
            assert max(float(ch[c]) for c in gone) <= min(float(ch[c]) for c in lp.mlp_channels)
    # one global attention threshold: no removed KV group outscores a kept one in a layer keeping more than one
    removed = [float(scores[lp.index].groups[k]) for lp in plan.layers for k in range(K) if k not in lp.kv_heads]
    kept = [float(scores[lp.index].groups[k]) for lp in plan.layers for k in lp.kv_heads if len(lp.kv_heads) > 1]
    if removed and kept:
        assert max(removed) <= min(kept)


# --- KL-selected calibration candidates -------------------------------------------------------------------------


def test_calib_candidates_pick_lowest_kl():
    tok = smol_tokenizer()
    recipe = make_recipe(method="fisher", sparsity=0.3, calib_candidates=2, **CALIB)
    dense = tiny_lm("llama")
    plan, _, _ = make_plan(loaded(copy.deepcopy(dense), tok), recipe, progress=False)
    chosen = plan.recipe["calib_candidate"] if "calib_candidate" in plan.recipe else 0
    kls = plan.recipe["calib_kl"]
    assert len(kls) == 2 and plan.recipe["calib_candidates"] == 2
    held_out = (
        __import__("domainprune.data", fromlist=["load_corpus"]).load_corpus("code").sequences(tok, "validation", 4, 32)
    )
    recomputed, plans = [], []
    for c in range(2):
        work = loaded(copy.deepcopy(dense), tok)
        p, stats, _ = _make_plan_once(work, recipe.model_copy(update={"calib_candidate": c}), progress=False)
        apply(work, p, stats=stats, progress=False)
        recomputed.append(kl_divergence(dense, work.model, held_out, batch_size=2))
        plans.append(p)
    assert recomputed == pytest.approx(kls, rel=1e-5)
    assert chosen == min(range(2), key=lambda c: recomputed[c])
    assert plans[chosen].layers == plan.layers
    assert plans[0].layers != plans[1].layers or recomputed[0] == recomputed[1]
    # the chosen candidate's recipe reproduces its plan
    again, _, _ = make_plan(loaded(copy.deepcopy(dense), tok), make_recipe(**plan.recipe), progress=False)
    assert again.layers == plan.layers


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_plan_with_gradient_options(capsys, tmp_path):
    import sys

    from tiny_pipeline import save_folder

    from domainprune.cli import main
    from domainprune.plan import Plan

    folder = save_folder(tiny_lm("llama"), smol_tokenizer(), tmp_path / "model")
    out = tmp_path / "plan.json"
    argv = sys.argv
    sys.argv = [
        "domainprune",
        "plan",
        "--model",
        str(folder),
        "--out",
        str(out),
        "--method",
        "taylor",
        "--taylor-mode",
        "element",
        "--sparsity",
        "0.3",
        "--general-data",
        "general",
        "--general-ratio",
        "0.5",
        "--micro-batch",
        "2",
        "--gradient-checkpointing",
        "--calib-samples",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--quiet",
    ]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    assert exit_.value.code == 0, capsys.readouterr().err
    r = Plan.load(out).recipe
    assert (r["taylor_mode"], r["general_data"], r["general_ratio"], r["micro_batch"], r["gradient_checkpointing"]) == (
        "element",
        "general",
        0.5,
        2,
        True,
    )
