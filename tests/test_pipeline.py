"""The pipeline on real (tiny, random) models: budgets and GQA consistency of every allocation, target_params,
determinism, the statistics cache and its resume after a crash, and FLAP bias compensation.

Parameter counts are taken from the pruned modules themselves, not from the accounting code under test.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from tiny_models import input_ids, tiny_model
from tiny_pipeline import CALIB, assert_same_state, loaded, logits_on, smol_tokenizer, state, tiny_lm

from domainprune import cache
from domainprune.adapters import get_adapter
from domainprune.errors import DomainpruneError
from domainprune.evaluate import parameter_count
from domainprune.pipeline import apply, calibration_sequences, make_plan, make_recipe
from domainprune.plan import dense_plan, validate_plan
from domainprune.run import prune
from domainprune.stats import collect_statistics, derived
from domainprune.surgery import apply_plan

SPARSITIES = (0.2, 0.35, 0.5)
UNITS = ("kv_group", "query_head")


# --- independent parameter accounting ------------------------------------------------------------------------


def _numel(*modules, weights_only: bool = False) -> int:
    return sum(p.numel() for m in modules for name, p in m.named_parameters() if name == "weight" or not weights_only)


def layer_params(model, weights_only: bool = False) -> list[int]:
    """Attention+MLP parameters of every layer, counted on the q/k/v/o and gate/up/down modules.
    `weights_only` leaves out biases (FLAP's compensation adds some, which the plan's accounting does not count)."""
    a = get_adapter(model)
    out = []
    for i in range(a.num_layers):
        n = 0 if a.attention_removed(i) else _numel(*a.attention_in_projs(i), a.o_proj(i), weights_only=weights_only)
        n += 0 if a.mlp_removed(i) else _numel(*a.mlp_in_projs(i), a.down_proj(i), weights_only=weights_only)
        out.append(n)
    return out


def largest_unit(model) -> int:
    """The most parameters one allocation unit can hold: a KV group (its query heads, k and v heads), a rank slice
    of query heads (the last one frees the k/v heads too) or an MLP channel, from the dense modules' sizes."""
    a = get_adapter(model)
    q, k, v = a.attention_in_projs(0)
    o = a.o_proj(0)
    H, K = q.out_features // a.head_dim, k.out_features // a.head_dim
    per_head = (_numel(q) + _numel(o)) // H
    per_kv = (_numel(k) + _numel(v)) // K
    channel = _numel(*a.mlp_in_projs(0), a.down_proj(0)) // a.down_proj(0).in_features
    return max(H // K * per_head + per_kv, K * (per_head + per_kv), channel)


def channel_params(model) -> int:
    a = get_adapter(model)
    return _numel(*a.mlp_in_projs(0), a.down_proj(0)) // a.down_proj(0).in_features


def assert_gqa(plan, model) -> None:
    """Every kept KV head keeps the same number (≥1) of its own query heads, in the plan and in the weights."""
    a = get_adapter(model)  # the pruned model: layers renumbered past dropped ones
    for new_i, lp in enumerate(plan.kept_layers()):
        H, K, _ = plan.model.layers[lp.index]
        group = H // K
        per_kv = Counter(h // group for h in lp.query_heads)
        assert set(per_kv) == set(lp.kv_heads), (lp.index, lp.query_heads, lp.kv_heads)
        assert len(set(per_kv.values())) <= 1
        s = a.shape(new_i)
        assert (s.num_heads, s.num_kv_heads) == (len(lp.query_heads), len(lp.kv_heads))
        if s.num_kv_heads:
            assert s.num_heads % s.num_kv_heads == 0


# --- 1. budgets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_budget_and_gqa_every_architecture(arch, allocation, unit, sparsity):
    model = tiny_model(arch)
    before = layer_params(model)
    recipe = make_recipe(
        model="tiny", method="magnitude", allocation=allocation, sparsity=sparsity, attention_unit=unit
    )
    plan, stats, pruned = make_plan(loaded(model), recipe, progress=False)
    assert stats is None and not pruned  # magnitude needs no data and prunes nothing yet
    validate_plan(plan, get_adapter(model))
    big, channel = largest_unit(model), channel_params(model)
    apply(loaded(model), plan)
    after = layer_params(model)
    assert_gqa(plan, model)
    removed = sum(before) - sum(after)
    assert (plan.params.attention_mlp_before, plan.params.attention_mlp_after) == (sum(before), sum(after))
    assert plan.params.sparsity == pytest.approx(removed / sum(before))
    if allocation == "global":
        assert abs(removed - sparsity * sum(before)) <= big
    else:
        # every layer meets the fraction to within one MLP channel, and identical layers keep identical widths
        for b, a in zip(before, after):
            assert abs((b - a) - sparsity * b) <= channel, (b, a)
        assert len(set(get_adapter(model).shapes())) == 1 and get_adapter(model).is_uniform()
        assert model.config.intermediate_size == get_adapter(model).shape(0).intermediate_size
    out = logits_on(model, input_ids())
    assert out.shape == (2, 12, model.config.vocab_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
@pytest.mark.parametrize("unit", UNITS)
def test_budget_with_data_driven_criteria(method, unit):
    """The standardised (flap, global) and sequential (wanda-sp, uniform) paths meet the budget too."""
    tok = smol_tokenizer()
    model = tiny_lm()  # a Llama without biases
    before = layer_params(model)
    big, channel = largest_unit(model), channel_params(model)
    result = prune(loaded(model, tok), method=method, sparsity=0.35, attention_unit=unit, progress=False, **CALIB)
    after = layer_params(result.model, weights_only=True)
    assert_gqa(result.plan, result.model)
    removed = sum(before) - sum(after)
    assert result.plan.params.attention_mlp_after == sum(after)
    assert result.report["sparsity_achieved"] == pytest.approx(removed / sum(before))
    if method == "flap":
        assert result.recipe.allocation == "global" and result.recipe.bias_compensation
        assert abs(removed - 0.35 * sum(before)) <= big
    else:
        assert result.recipe.allocation == "uniform" and not result.recipe.bias_compensation
        assert all(abs((b - a) - 0.35 * b) <= channel for b, a in zip(before, after))
        assert result.report["uniform"]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_target_params_gives_the_requested_total(allocation):
    model = tiny_model("llama")
    total = parameter_count(model)
    attn_mlp = sum(layer_params(model))
    target = total - int(0.3 * attn_mlp) - 17  # not a round number of units
    recipe = make_recipe(model="tiny", method="magnitude", allocation=allocation, target_params=target)
    plan, _, _ = make_plan(loaded(model), recipe, progress=False)
    apply(loaded(model), plan)
    got = parameter_count(model)
    assert plan.params.total_after == got
    slack = largest_unit(model) if allocation == "global" else channel_params(model) * model.config.num_hidden_layers
    assert abs(got - target) <= slack
    assert recipe.sparsity is None and recipe.target_params == target


def test_target_params_out_of_reach():
    model = tiny_model("llama")
    total = parameter_count(model)
    fixed = total - sum(layer_params(model))  # embeddings, norms, LM head
    for target in (total + 1, fixed, 1000):
        recipe = make_recipe(model="tiny", method="magnitude", target_params=target)
        with pytest.raises(DomainpruneError, match="out of reach") as e:
            make_plan(loaded(model), recipe, progress=False)
        assert f"{total:,}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DomainpruneError, match="exactly one of sparsity, target_params and target_speedup"):
        make_recipe(model="tiny", sparsity=0.3, target_params=total - 1000)
    with pytest.raises(DomainpruneError, match="exactly one"):
        make_recipe(model="tiny")


def test_unreachable_budgets_name_the_closest_one_and_reached_ones_are_reported(tmp_path):
    """Every layer keeps one KV group and one MLP channel: a budget past that stops before any statistics, with the
    largest reachable sparsity (or the smallest reachable total); a reachable --target-params run records the
    sparsity it stood for in report.json."""
    from domainprune.allocation import max_width_sparsity

    model = tiny_model("llama")
    a = get_adapter(model)
    reachable = max_width_sparsity(a, "kv_group")
    removable = sum(
        a.attention_params(s.num_heads, s.num_kv_heads)
        - a.attention_params(s.group_size, 1)
        + a.mlp_params(s.intermediate_size - 1)
        for s in a.shapes()
    )
    assert reachable == pytest.approx(removable / sum(layer_params(model)))
    with pytest.raises(DomainpruneError, match=rf"at most {reachable:.4f} of attention\+MLP parameters"):
        make_plan(loaded(model), make_recipe(model="tiny", method="magnitude", sparsity=0.999), progress=False)
    total = parameter_count(model)
    smallest = total - int(reachable * sum(layer_params(model)))
    with pytest.raises(DomainpruneError, match=f"smallest model width pruning reaches has {smallest:,} parameters"):
        halfway = (smallest + total - sum(layer_params(model))) // 2  # between the fixed part and the smallest
        make_plan(loaded(model), make_recipe(model="tiny", method="magnitude", target_params=halfway), progress=False)
    # just inside the reach: met
    plan, _, _ = make_plan(
        loaded(model), make_recipe(model="tiny", method="magnitude", sparsity=reachable), progress=False
    )
    assert plan.params.sparsity == pytest.approx(reachable, abs=0.01)

    target = total - int(0.3 * sum(layer_params(model)))
    result = prune(loaded(tiny_model("llama")), method="magnitude", target_params=target, seq_len=32, progress=False)
    assert result.report["target_params"] == target
    assert result.report["sparsity_target"] == pytest.approx(0.3, abs=1e-3)
    assert abs(result.report["sparsity_achieved"] - result.report["sparsity_target"]) < 0.02


# --- 3. determinism ----------------------------------------------------------------------------------------


def _stats_entries() -> set[str]:
    folder = cache.cache_dir() / "stats"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.parametrize(
    "fields",
    [
        dict(method="flap", sparsity=0.4),  # global allocation, bias compensation, cached statistics
        dict(method="wanda-sp", sparsity=0.4, attention_unit="query_head"),  # sequential, never cached
    ],
    ids=["flap", "wanda-sp"],
)
def test_same_recipe_and_seed_give_identical_weights(fields, monkeypatch, tmp_path):
    import shutil

    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path))  # an empty cache: a warm shared one would hold the entry
    tok = smol_tokenizer()
    existing = _stats_entries()
    first = prune(loaded(tiny_lm(seed=7), tok), seed=3, progress=False, **fields, **CALIB)  # weights no other test uses
    new = _stats_entries() - existing
    # only the non-sequential run caches statistics; remove them so the second run recomputes everything
    assert len(new) == (1 if fields["method"] == "flap" else 0)
    for name in new:
        shutil.rmtree(cache.cache_dir() / "stats" / name)
    second = prune(loaded(tiny_lm(seed=7), tok), seed=3, progress=False, **fields, **CALIB)
    assert first.plan == second.plan
    assert_same_state(state(first.model), state(second.model))
    assert _stats_entries() - existing == new
    assert parameter_count(first.model) < parameter_count(tiny_lm(seed=7))


# --- 4. statistics: correctness, cache, resume -------------------------------------------------------------


def _hooked_inputs(model, ids):
    """o_proj and down_proj inputs of every layer from one plain forward pass, flattened over tokens."""
    a = get_adapter(model)
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i in range(a.num_layers):
        for key, mod in (("attn", a.o_proj(i)), ("mlp", a.down_proj(i))):

            def hook(_m, args, key=key, i=i):
                seen[(key, i)] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_statistics_are_the_plain_forward_inputs(arch):
    """Layer-by-layer statistics equal the sums over a normal forward pass (sliding windows and all)."""
    model = tiny_model(arch)
    ids = input_ids(batch=4, length=16)
    stats = collect_statistics(model, get_adapter(model), ids, batch_size=2, use_cache=False, progress=False)
    seen = _hooked_inputs(model, ids)
    assert len(stats) == 4
    for i, s in enumerate(stats):
        assert int(s["tokens"]) == 64
        for key in ("attn", "mlp"):
            x = seen[(key, i)]
            torch.testing.assert_close(s[f"{key}_in_sum"], x.sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s[f"{key}_in_sqsum"], (x * x).sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(derived(s)[f"{key}_in_var"], x.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def _assert_stats_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-12, atol=1e-12)


class _Crash(Exception):
    pass


def test_statistics_cache_and_resume_after_a_crash(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model(arch)
    a = get_adapter(model)
    ids = input_ids(batch=4, length=16)
    reference = collect_statistics(model, a, ids, batch_size=2, use_cache=False, progress=False)
    assert not (tmp_path / "cache").exists()  # use_cache=False writes nothing

    calls = Counter()
    for i in range(a.num_layers):  # o_proj only runs when a layer's statistics are computed (not during capture)
        a.o_proj(i).register_forward_pre_hook(lambda m, args, i=i: calls.update([i]))

    # a crash while layer 2 runs, after a checkpoint at every layer
    def crash(_m, _args):
        raise _Crash

    handle = a.o_proj(2).register_forward_pre_hook(crash)
    with pytest.raises(_Crash):
        collect_statistics(model, a, ids, batch_size=2, progress=False)
    handle.remove()
    (folder,) = (tmp_path / "cache" / "stats").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "layer_000.safetensors",
        "layer_001.safetensors",
        "resume.safetensors",
    ]
    hidden, meta = cache.load_tensors(folder / "resume.safetensors")
    assert meta == {"next_layer": 2} and hidden["hidden"].shape == (4, 16, 48)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    # the resumed run starts at layer 2 and equals an uninterrupted one
    calls.clear()
    resumed = collect_statistics(model, a, ids, batch_size=2, progress=False)
    _assert_stats_equal(resumed, reference)
    assert calls[0] == calls[1] == 0 and calls[2] == calls[3] == 2  # two batches per computed layer
    assert sorted(p.name for p in folder.iterdir()) == [f"layer_{i:03d}.safetensors" for i in range(4)]  # resume gone
    assert all((folder / n).stat().st_mtime_ns == t for n, t in mtimes.items() if n.startswith("layer"))

    # computed twice: equal, and the second time every layer comes from the cache
    calls.clear()
    _assert_stats_equal(collect_statistics(model, a, ids, batch_size=2, progress=False), reference)
    assert sum(calls.values()) == 0
    # ... which is really read: a changed file changes the result
    tampered = dict(reference[3], tokens=torch.tensor(-1))
    cache.save_tensors(folder / "layer_003.safetensors", tampered)
    assert int(collect_statistics(model, a, ids, batch_size=2, progress=False)[3]["tokens"]) == -1

    # other sequences or other weights are other entries
    collect_statistics(model, a, input_ids(batch=4, length=16, seed=2), batch_size=2, progress=False)
    with torch.no_grad():
        a.down_proj(0).weight[0, 0] += 1
    collect_statistics(model, a, ids, batch_size=2, progress=False)
    assert len(list((tmp_path / "cache" / "stats").iterdir())) == 3


@pytest.mark.parametrize("new_batch_size", [1, 4])
def test_resume_with_another_batch_size(tmp_path, monkeypatch, new_batch_size):
    """A rerun after running out of memory often lowers --batch-size: the resumed statistics still cover every
    sequence (the checkpointed hidden states are per batch of the crashed run)."""
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    a = get_adapter(model)
    ids = input_ids(batch=4, length=16)
    reference = collect_statistics(model, a, ids, batch_size=2, use_cache=False, progress=False)
    handle = a.o_proj(2).register_forward_pre_hook(lambda m, args: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        collect_statistics(model, a, ids, batch_size=2, progress=False)
    handle.remove()
    (folder,) = (tmp_path / "cache" / "stats").iterdir()
    assert (folder / "resume.safetensors").is_file()
    resumed = collect_statistics(model, a, ids, batch_size=new_batch_size, progress=False)
    assert [int(s["tokens"]) for s in resumed] == [64] * 4
    for got, want in zip(resumed, reference):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-9)


def test_a_resume_file_without_its_layers_starts_over(tmp_path, monkeypatch):
    """A resume checkpoint whose earlier layer files are gone (or damaged) is not trusted: recomputed from layer 0."""
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    a = get_adapter(model)
    ids = input_ids(batch=4, length=16)
    handle = a.o_proj(3).register_forward_pre_hook(lambda m, args: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        collect_statistics(model, a, ids, batch_size=2, progress=False)
    handle.remove()
    (folder,) = (tmp_path / "cache" / "stats").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [f"layer_{i:03d}.safetensors" for i in range(3)] + [
        "resume.safetensors"
    ]
    (folder / "layer_001.safetensors").write_bytes(b"garbage")
    got = collect_statistics(model, a, ids, batch_size=2, progress=False)
    _assert_stats_equal(got, collect_statistics(model, a, ids, batch_size=2, use_cache=False, progress=False))
    assert sorted(p.name for p in folder.iterdir()) == [f"layer_{i:03d}.safetensors" for i in range(4)]


# --- 6. FLAP bias compensation -----------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("sparsity", [0.35, 0.5])
def test_bias_compensation_brings_the_output_closer_to_dense(unit, sparsity):
    tok = smol_tokenizer()
    recipe = make_recipe(model="tiny", method="flap", sparsity=sparsity, attention_unit=unit, **CALIB)
    assert recipe.bias_compensation  # flap's default
    dense = tiny_lm()
    ids = calibration_sequences(recipe, tok)
    reference = logits_on(dense, ids)
    compensated = tiny_lm()
    plan, stats, _ = make_plan(loaded(compensated, tok), recipe, progress=False)
    apply(loaded(compensated, tok), plan, stats=stats)
    plain = tiny_lm()
    apply_plan(plain, plan)  # the same plan, no compensation
    assert [s for s in get_adapter(plain).shapes()] == [s for s in get_adapter(compensated).shapes()]
    err_comp = float(((logits_on(compensated, ids) - reference) ** 2).mean())
    err_plain = float(((logits_on(plain, ids) - reference) ** 2).mean())
    assert err_comp < err_plain, (err_comp, err_plain)
    # the pipeline without compensation is exactly the plain plan
    off = prune(
        loaded(tiny_lm(), tok),
        method="flap",
        sparsity=sparsity,
        attention_unit=unit,
        bias_compensation=False,
        progress=False,
        **CALIB,
    )
    assert off.plan.layers == plan.layers
    assert_same_state(state(off.model), state(plain))


def test_compensation_bias_cancels_the_mean_of_removed_heads():
    """On the calibration tokens the compensated o_proj output has the dense output's mean; without it, not."""
    model = tiny_model("llama")
    a = get_adapter(model)
    ids = input_ids(batch=4, length=16)
    stats = collect_statistics(model, a, ids, batch_size=2, use_cache=False, progress=False)
    plan = dense_plan(a, "tiny")
    plan.layers[0] = plan.layers[0].model_copy(
        update=dict(kv_heads=[0], query_heads=[0, 1, 2], mlp_channels=list(range(20)))
    )

    def o_out(m):
        out = {}
        h = get_adapter(m).o_proj(0).register_forward_hook(lambda mod, args, y: out.update(y=y.detach().double()))
        logits_on(m, ids)
        h.remove()
        return out["y"].reshape(-1, 48)

    dense_out = o_out(model)
    comp, plain = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(comp, plan, [derived(s) for s in stats])
    apply_plan(plain, plan)
    gap_comp = (dense_out - o_out(comp)).mean(0)
    gap_plain = (dense_out - o_out(plain)).mean(0)
    assert gap_plain.abs().max() > 1e-2
    torch.testing.assert_close(gap_comp, torch.zeros(48, dtype=torch.float64), atol=1e-5, rtol=0)


def test_public_api(tmp_path):
    """README's Python API used as README shows it: `domainprune.prune(...)` writes a run that
    `domainprune.load_pretrained(path)` loads back as the same model, with its `domainprune.Plan` and `Recipe`."""
    import domainprune

    tok = smol_tokenizer()
    result = domainprune.prune(
        loaded(tiny_lm(), tok), method="flap", sparsity=0.35, out=tmp_path / "run", progress=False, **CALIB
    )
    assert isinstance(result, domainprune.PruneResult) and result.out == tmp_path / "run"
    reloaded = domainprune.load_pretrained(result.out)
    ids = input_ids(vocab=len(tok))
    torch.testing.assert_close(logits_on(reloaded, ids), logits_on(result.model, ids))
    assert parameter_count(reloaded) == result.plan.params.total_after < parameter_count(tiny_lm())
    plan = domainprune.Plan.load(result.out / "plan.json")
    assert plan.layers == result.plan.layers
    assert domainprune.Recipe.model_validate(plan.recipe) == result.recipe


# --- the default recipe (no --method) ---------------------------------------------------------------------------


def test_no_method_runs_the_documented_default_recipe(tmp_path):
    import json

    from domainprune.pipeline import DEFAULT_RECIPE

    assert DEFAULT_RECIPE == {"method": "cfsp", "reconstruct": "obs"}  # README "Which method by default" says so
    tok = smol_tokenizer()
    result = prune(loaded(tiny_lm(), tok), sparsity=0.35, progress=False, out=tmp_path / "run", **CALIB)
    r = result.recipe
    assert (r.method, r.reconstruct, r.allocation, r.default_recipe) == ("cfsp", "obs", "cfsp", True)
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["method"] == "cfsp" and saved["reconstruct"] == "obs" and saved["default_recipe"] is True
    # the same as asking for it by name (the saved recipe replays it)
    named = prune(loaded(tiny_lm(), tok), sparsity=0.35, method="cfsp", reconstruct="obs", progress=False, **CALIB)
    assert_same_state(state(result.model), state(named.model))
    assert make_recipe(method="flap", sparsity=0.3).default_recipe is False  # a named method is never replaced


def test_the_cli_without_method_runs_the_default_too(tmp_path, capsys):
    import json

    from tiny_pipeline import cli, save_folder

    folder = save_folder(tiny_lm(), smol_tokenizer(), tmp_path / "model")
    code, _, err = cli(
        capsys,
        "prune",
        "--model",
        folder,
        "--sparsity",
        "0.3",
        "--calib-samples",
        2,
        "--seq-len",
        16,
        "--batch-size",
        2,
        "--out",
        tmp_path / "out",
        "-q",
    )
    assert code == 0, err
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert (recipe["method"], recipe["reconstruct"]) == ("cfsp", "obs")


def test_where_the_default_cannot_apply_flap_runs_and_one_line_says_why(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="domainprune.pipeline")
    depth = make_recipe(sparsity=0.35, depth="shortgpt", depth_sparsity=0.1)
    assert (depth.method, depth.reconstruct, depth.default_recipe) == ("flap", None, True)
    assert "default recipe (cfsp + OBS) cannot apply: --depth cannot be combined with --reconstruct obs" in caplog.text
    caplog.clear()
    # cfsp prunes MLP channels only: a budget beyond the MLPs falls back once the model is known, before statistics
    tok = smol_tokenizer()
    model = loaded(tiny_lm(), tok)
    adapter = get_adapter(model.model)
    shapes = adapter.shapes()
    mlp = sum(adapter.mlp_params(s.intermediate_size) for s in shapes)
    mlp_share = mlp / sum(adapter.layer_params(s) for s in shapes)
    plan, _, _ = make_plan(model, make_recipe(sparsity=round(mlp_share + 0.02, 2), **CALIB), progress=False)
    assert plan.recipe["method"] == "flap" and "cfsp prunes MLP channels only" in caplog.text


# --- --deploy: the serving stack the output must run on -----------------------------------------------------------


def test_deploy_transformers_gives_a_stock_checkpoint_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = smol_tokenizer()
    result = prune(
        loaded(tiny_lm("qwen2"), tok),
        sparsity=0.35,
        deploy="transformers",
        progress=False,
        out=tmp_path / "run",
        **CALIB,
    )
    r = result.recipe
    assert (r.method, r.allocation, r.reconstruct, r.deploy) == ("cfsp", "uniform", "obs", "transformers")
    assert result.report["stock_loadable"] and result.report["uniform"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    ids = input_ids(vocab=tok.vocab_size)
    torch.testing.assert_close(logits_on(stock, ids), logits_on(result.model, ids), rtol=1e-5, atol=1e-5)


def test_deploy_targets_refuse_what_they_cannot_run_in_one_line():
    assert make_recipe(sparsity=0.3, deploy="vllm", method="flap").allocation == "uniform"  # chosen, not refused
    assert make_recipe(sparsity=0.3, deploy="llamacpp").allocation == "cfsp"  # llama.cpp runs per-layer widths
    with pytest.raises(
        DomainpruneError,
        match=r"--deploy vllm runs checkpoints whose layers are all alike: use "
        r"--allocation uniform \(not global\)",
    ):
        make_recipe(sparsity=0.3, deploy="vllm", method="flap", allocation="global")
    with pytest.raises(DomainpruneError, match="cannot run layers without attention or MLP"):
        make_recipe(sparsity=0.3, deploy="transformers", method="flap", depth="finercut", depth_sparsity=0.1)
    with pytest.raises(DomainpruneError, match="--deploy must be one of transformers, llamacpp, vllm"):
        make_recipe(sparsity=0.3, deploy="tgi")
    # FLAP's compensation biases fit a stock Llama config (attention_bias/mlp_bias) but not a Qwen2 one
    tok = smol_tokenizer()
    recipe = make_recipe(sparsity=0.3, deploy="transformers", method="flap", **CALIB)
    with pytest.raises(DomainpruneError, match="stock qwen2 config has no place .* add --no-bias-compensation"):
        make_plan(loaded(tiny_lm("qwen2"), tok), recipe, progress=False)
    plan, _, _ = make_plan(loaded(tiny_lm("llama"), tok), recipe, progress=False)
    assert len({(len(lp.query_heads), len(lp.mlp_channels)) for lp in plan.layers}) == 1


def test_deploy_llamacpp_follows_what_the_gguf_export_runs():
    tok = smol_tokenizer()
    # Qwen3 runs in llama.cpp only with equal layers: the default recipe turns uniform, a named non-uniform one fails
    plan, _, _ = make_plan(
        loaded(tiny_lm("qwen3"), tok), make_recipe(sparsity=0.3, deploy="llamacpp", **CALIB), progress=False
    )
    assert plan.recipe["allocation"] == "uniform" and plan.recipe["method"] == "cfsp"
    with pytest.raises(DomainpruneError, match="llama.cpp runs qwen3 only with the same widths in every layer"):
        make_plan(
            loaded(tiny_lm("qwen3"), tok),
            make_recipe(sparsity=0.3, deploy="llamacpp", method="flap", bias_compensation=False, **CALIB),
            progress=False,
        )
    # Gemma 3 likewise (llama.cpp's gemma3 graph has no per-layer form)
    plan, _, _ = make_plan(
        loaded(tiny_lm("gemma3_text"), tok), make_recipe(sparsity=0.3, deploy="llamacpp", **CALIB), progress=False
    )
    assert plan.recipe["allocation"] == "uniform"
    assert len({(len(lp.query_heads), len(lp.mlp_channels)) for lp in plan.layers}) == 1
    # Llama: per-layer widths are fine (llama.cpp's deci)
    recipe = make_recipe(sparsity=0.3, deploy="llamacpp", **CALIB)
    plan, _, _ = make_plan(loaded(tiny_lm(), tok), recipe, progress=False)
    assert plan.recipe["allocation"] == "cfsp"
    assert "round_to" not in plan.recipe  # a 40-channel MLP: a 32-channel step would be too coarse to round to


def test_deploy_llamacpp_on_moe_models():
    """MoE models run in llama.cpp with equal layers only; Qwen2-MoE's graph needs every attention head, so a width
    method is refused there and an expert method (equal counts) is the way."""
    from test_moe import tiny_moe
    from tiny_pipeline import VOCAB

    tok = smol_tokenizer()
    moe = loaded(tiny_moe("qwen2_moe", vocab_size=VOCAB, norm_topk_prob=False), tok)
    with pytest.raises(DomainpruneError, match="needs every attention head; prune experts"):
        make_plan(moe, make_recipe(sparsity=0.2, deploy="llamacpp", method="wanda-sp", **CALIB), progress=False)
    plan, _, _ = make_plan(
        moe, make_recipe(deploy="llamacpp", method="expert-frequency", experts_keep=6, **CALIB), progress=False
    )
    assert [len(lp.experts) for lp in plan.layers] == [6, 6, 6]
    mixtral = loaded(tiny_moe("mixtral", vocab_size=VOCAB), tok)
    with pytest.raises(DomainpruneError, match="no place for the compensation biases"):
        make_plan(mixtral, make_recipe(sparsity=0.2, deploy="llamacpp", method="flap", **CALIB), progress=False)
    with pytest.raises(DomainpruneError, match="llama.cpp runs mixtral only with the same widths"):
        recipe = make_recipe(sparsity=0.2, deploy="llamacpp", method="flap", bias_compensation=False, **CALIB)
        make_plan(mixtral, recipe, progress=False)


def test_deploy_llamacpp_rounds_mlp_widths_to_the_kernels_multiple():
    from domainprune.gguf_export import KERNEL_MULTIPLE

    tok = smol_tokenizer()
    model = tiny_lm("llama", intermediate_size=16 * KERNEL_MULTIPLE)
    plan, _, _ = make_plan(
        loaded(model, tok), make_recipe(sparsity=0.3, deploy="llamacpp", method="flap", **CALIB), progress=False
    )
    widths = [len(lp.mlp_channels) for lp in plan.layers]
    assert plan.recipe["round_to"] == KERNEL_MULTIPLE
    assert all(w % KERNEL_MULTIPLE == 0 and 0 < w < 16 * KERNEL_MULTIPLE for w in widths), widths
    exact, _, _ = make_plan(
        loaded(model, tok),
        make_recipe(sparsity=0.3, deploy="llamacpp", method="flap", round_to=1, **CALIB),
        progress=False,
    )
    assert exact.recipe["round_to"] == 1
