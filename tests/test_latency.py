"""Latency budgets (`--target-speedup`, domainprune.latency): the measured table's structure and cache on real tiny
models, the solver on synthetic tables, Recipe validation, and `prune(target_speedup=...)` end to end.

Timings are real and noisy on shared cores, so nothing here asserts a measured speed against a number: the tests
check structure, caching, the solver's logic and what the pipeline records (`bench/speedup.py` measures accuracy).
"""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_model
from tiny_pipeline import CALIB, assert_same_state, cli, loaded, smol_tokenizer, state, tiny_lm

from domainprune import cache
from domainprune.adapters import get_adapter
from domainprune.adapters.base import LayerShape
from domainprune.errors import DomainpruneError
from domainprune.latency import (
    LatencyTable,
    latency_table,
    measure_table,
    predict,
    predicted_speedup,
    solve_sparsity,
)
from domainprune.pipeline import Recipe, make_plan, make_recipe
from domainprune.run import prune

SMALL = dict(context=16, prefill_tokens=32, repeats=3, progress=False)
# wide enough that a 256-token prefill is compute-bound on a CPU — its blocks far outweigh the embedding and LM head —
# so pruning predicts a real speedup whatever the load on the cores; two layers to stay quick
WIDE = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_hidden_layers=2,
    max_position_embeddings=512,
)


# --- the measured table ----------------------------------------------------------------------------------------


def _check_structure(table: LatencyTable, heads: int, group: int, channels: int, layers: int) -> None:
    assert table.attention_widths == list(range(0, heads + 1, group))
    step = max(1, channels // 16)
    assert table.mlp_widths[0] == 0 and table.mlp_widths[-1] == channels
    assert all(w % step == 0 for w in table.mlp_widths[1:-1]) and len(table.mlp_widths) == len(set(table.mlp_widths))
    assert len(table.layers) == layers
    for phase in ("decode", "prefill"):
        att, mlp = table.attention_seconds[phase], table.mlp_seconds[phase]
        assert len(att) == len(table.attention_widths) and len(mlp) == len(table.mlp_widths)
        # (block times are differences of noisy whole-model timings, clipped at zero: how they are derived is checked
        # on given timings in test_table_from_seconds; bench/speedup.py checks the real model)
        assert table.fixed[phase] > 0 and table.dense[phase] > 0
        assert predict(table, [None] * layers, phase) == pytest.approx(table.fixed[phase])
        if table.scale[phase] > 0:  # calibrated: the table predicts the dense model it measured
            assert predict(table, table.dense_shapes(), phase) == pytest.approx(table.dense[phase], rel=1e-9)


def test_table_structure_cache_and_model_untouched():
    model = tiny_model("llama", max_position_embeddings=512)
    before = state(model)
    table = latency_table(model, **SMALL)
    assert_same_state(before, state(model))  # blocks are cut from copies
    _check_structure(table, heads=6, group=3, channels=40, layers=4)
    assert table.context == 16 and table.prefill_tokens == 32 and table.dtype == "float32" and table.device
    files = list((cache.cache_dir() / "latency").glob("*/table.json"))
    assert files and any(LatencyTable.from_dict(json.loads(f.read_text())) == table for f in files)
    # a second run reads the cache (same shape, other weights); other phase settings are another entry
    other = tiny_model("llama", seed=1, max_position_embeddings=512)
    assert latency_table(other, **SMALL) == table
    assert latency_table(model, **{**SMALL, "prefill_tokens": 24}).prefill_tokens == 24


def test_table_sliding_window_architecture():
    """Gemma 3 has sliding-window layers, whose KV cache keeps only its window: decode replays must use the model's
    kind of cache."""
    model = tiny_model("gemma3_text", max_position_embeddings=512)
    table = measure_table(model, **SMALL)
    _check_structure(table, heads=6, group=3, channels=40, layers=4)


def test_table_from_seconds():
    """Per-layer block times from whole-model timings: differences over the layers, clipped at zero, fitted
    non-decreasing, and scaled so that the table predicts the dense model's time."""
    from domainprune.latency import table_from_seconds

    shape = LayerShape(6, 2, 40)  # 2 KV groups of 3 query heads, 40 MLP channels; 2 layers
    seconds = {
        ("skeleton", 0): {"decode": 1.0, "prefill": 1.0},
        ("attention", 0): {"decode": 3.0, "prefill": 3.0},
        ("attention", 1): {"decode": 3.4, "prefill": 4.4},  # prefill: slower than the dense model (noise)
        ("mlp", 0): {"decode": 2.0, "prefill": 4.2},  # prefill: the MLPs cost less than the noise
        ("mlp", 20): {"decode": 3.5, "prefill": 3.5},
    }
    t = table_from_seconds(seconds, {"decode": 4.0, "prefill": 4.0}, shape, 2, device="given")
    assert t.attention_widths == [0, 3, 6] and t.mlp_widths == [0, 20, 40] and t.layers == [(6, 2, 40)] * 2
    assert t.attention_seconds["decode"] == pytest.approx([0, 0.2, 0.5])  # (3.4 - 3.0) / 2, (4.0 - 3.0) / 2
    assert t.mlp_seconds["decode"] == pytest.approx([0, 0.75, 1.0])
    assert t.scale["decode"] == pytest.approx(1.0)  # 1 + 2 * (0.5 + 1.0) = 4: the blocks add up already
    assert t.attention_seconds["prefill"] == pytest.approx([0, 0.6, 0.6])  # 0.7 then 0.5: a dip, pooled
    assert t.mlp_seconds["prefill"] == [0, 0, 0]  # negative differences
    assert t.scale["prefill"] == pytest.approx(2.5)  # (4 - 1) / (2 * 0.6)
    assert predict(t, t.dense_shapes(), "prefill") == pytest.approx(4.0)
    assert predict(t, [LayerShape(3, 1, 20)] * 2, "decode") == pytest.approx(1 + 2 * (0.2 + 0.75))
    assert t.fixed == {"decode": 1.0, "prefill": 1.0} and t.dense == {"decode": 4.0, "prefill": 4.0}


# --- prediction and the solver on synthetic tables ----------------------------------------------------------------


def synthetic(fixed: float = 4.0) -> LatencyTable:
    """Four layers; attention costs 2 s at full width, an MLP 2 s per 1000 channels, 4 s outside: dense = 20 s."""
    return LatencyTable(
        layers=[(4, 2, 1000)] * 4,
        attention_widths=[0, 2, 4],
        attention_seconds={"decode": [0.0, 1.0, 2.0]},
        mlp_widths=[0, 500, 1000],
        mlp_seconds={"decode": [0.0, 1.0, 2.0]},
        fixed={"decode": fixed},
        device="synthetic",
    )


def mlp_only(s: float) -> list[LayerShape]:
    """An allocation that takes fraction s of every MLP and leaves attention alone."""
    return [LayerShape(4, 2, round(1000 * (1 - s)))] * 4


def test_block_times_fitted_nondecreasing():
    from domainprune.latency import _nondecreasing

    assert _nondecreasing([0, 1, 3, 2, 4]) == [0, 1, 2.5, 2.5, 4]  # a dip is pooled with what it undercuts
    assert _nondecreasing([0, 5, 1, 0, 6]) == [0, 2, 2, 2, 6]
    assert _nondecreasing([0, 1, 2]) == [0, 1, 2]


def test_predict_interpolates_and_drops():
    t = synthetic()
    assert predict(t, t.dense_shapes()) == 20.0
    assert t.mlp(250, "decode") == pytest.approx(0.5) and t.mlp(1200, "decode") == pytest.approx(2.4)  # linear
    assert t.attention(0, "decode") == 0 and t.mlp(0, "decode") == 0
    assert predict(t, [None, None, LayerShape(4, 2, 1000), LayerShape(0, 0, 500)]) == pytest.approx(4 + 4 + 1)
    assert predicted_speedup(t, [None] * 4) == pytest.approx(5.0)
    with pytest.raises(DomainpruneError, match="decode, prefill"):
        t.mlp(10, "prefill")


def test_solver_finds_smallest_sparsity():
    t = synthetic()  # MLP-only pruning at s: 20 - 8 s seconds; 1.25× needs 16 s, i.e. s = 0.5
    s, speed = solve_sparsity(mlp_only, t, 1.25)
    assert s == pytest.approx(0.5, abs=1e-3) and speed >= 1.25
    assert predicted_speedup(t, mlp_only(s - 2e-3)) < 1.25  # smallest: a little less does not reach it
    assert solve_sparsity(mlp_only, t, 1.25, lo=0.6) == (0.6, pytest.approx(20 / (20 - 8 * 0.6)))  # lo already meets it

    def capped(s: float) -> list[LayerShape]:  # an allocation that cannot go past 0.7 (as cfsp cannot past its MLPs)
        if s > 0.7:
            raise DomainpruneError("cannot")
        return mlp_only(s)

    assert solve_sparsity(capped, t, 1.25)[0] == pytest.approx(0.5, abs=1e-3)


def test_solver_unreachable_is_one_line():
    t = synthetic()
    with pytest.raises(DomainpruneError) as e:  # 95 %: 20 / 12.4 = 1.61×
        solve_sparsity(mlp_only, t, 2.0)
    msg = str(e.value)
    assert "\n" not in msg and "at most 1.613× decode" in msg and "lower --target-speedup" in msg and "--depth" in msg
    with pytest.raises(DomainpruneError, match="raise --depth-sparsity"):
        solve_sparsity(mlp_only, t, 2.0, hint="lower --target-speedup or raise --depth-sparsity")


# --- recipe --------------------------------------------------------------------------------------------------------


def test_recipe_validation():
    with pytest.raises(DomainpruneError, match="exactly one of sparsity, target_params and target_speedup"):
        make_recipe(target_speedup=1.5, sparsity=0.3)
    with pytest.raises(DomainpruneError, match="exactly one"):
        make_recipe(target_speedup=1.5, target_params=90_000_000)
    for bad in (1.0, 0.8):
        with pytest.raises(DomainpruneError, match="--target-speedup must be above 1"):
            make_recipe(target_speedup=bad)
    with pytest.raises(DomainpruneError, match="--speedup-phase"):
        make_recipe(target_speedup=1.5, speedup_phase="train")
    with pytest.raises(DomainpruneError, match="removes whole experts"):
        make_recipe(method="expert-frequency", target_speedup=1.5)
    with pytest.raises(DomainpruneError, match="--allocation search"):
        make_recipe(target_speedup=1.5, allocation="search")
    with pytest.raises(DomainpruneError, match="needs a width method"):
        make_recipe(method="shortgpt", target_speedup=1.5)
    r = make_recipe(target_speedup=1.5)
    dumped = r.model_dump()
    assert dumped["target_speedup"] == 1.5 and "speedup_phase" not in dumped and "prefill_tokens" not in dumped
    assert (
        make_recipe(target_speedup=1.5, speedup_phase="prefill", prefill_tokens=64).model_dump()["prefill_tokens"] == 64
    )
    # a planned recipe records the solved sparsity beside the target, and is valid as it stands (apply, replay)
    planned = Recipe.model_validate({**dumped, "sparsity": 0.31, "predicted_speedup": 1.52})
    assert planned.sparsity == 0.31 and make_recipe(**planned.model_dump()).target_speedup == 1.5


def test_cli_options(capsys, tmp_path):
    out = tmp_path / "plan.json"
    for args, message in (
        (["--target-speedup", "1"], "--target-speedup must be above 1"),
        (["--target-speedup", "1.5", "--sparsity", "0.3"], "exactly one of sparsity, target_params and target_speedup"),
        (["--target-speedup", "1.5", "--speedup-phase", "train"], "--speedup-phase must be one of decode, prefill"),
        (["--target-speedup", "1.5", "--prefill-tokens", "0"], "prefill_tokens"),
    ):
        code, _, err = cli(capsys, "plan", *args, "--out", out)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, help_text, _ = cli(capsys, "prune", "--help")
    assert code == 0 and all(o in help_text for o in ("--target-speedup", "--speedup-phase", "--prefill-tokens"))


def test_layers_of_different_shapes_refused():
    """The table times every layer cut to one width, which a model pruned to per-layer widths cannot give."""
    model = tiny_model("llama", max_position_embeddings=512)
    get_adapter(model).slice_mlp(0, list(range(20)))
    with pytest.raises(DomainpruneError, match="layers all have one shape") as e:
        measure_table(model, **SMALL)
    assert "\n" not in str(e.value) and "--sparsity" in str(e.value)


def test_mixture_of_experts_refused_before_any_timing():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(DomainpruneError, match="mixture-of-experts models are not supported"):
        prune(loaded(model), method="magnitude", target_speedup=1.5, progress=False)


def test_report_page_lists_the_speedup():
    from domainprune.compare import Entry
    from domainprune.measure import Measurement
    from domainprune.report import recipe_rows

    recipe = {"target_speedup": 1.5, "sparsity": 0.3, "predicted_speedup": 1.51}
    speedup = {
        "target": 1.5,
        "phase": "decode",
        "predicted": 1.51,
        "measured": 1.48,
        "sparsity": 0.3,
        "within_5_percent": True,
    }
    rows = dict(recipe_rows(Entry("run", Measurement("run", 1), recipe=recipe, prune={"speedup": speedup})))
    assert rows["sparsity"] == "0.3" and rows["predicted_speedup"] == "1.51"
    assert rows["speedup measured at pruning"] == "1.480× decode (target 1.5×, predicted 1.510×)"


# --- end to end ----------------------------------------------------------------------------------------------------


def test_prune_to_target_speedup():
    tok = smol_tokenizer()
    target = 1.2
    result = prune(
        loaded(tiny_lm("llama", **WIDE), tok),
        method="flap",
        target_speedup=target,
        speedup_phase="prefill",
        progress=False,
        **CALIB,
    )
    recipe = result.plan.recipe
    assert recipe["target_speedup"] == target and recipe["speedup_phase"] == "prefill"
    assert recipe["predicted_speedup"] >= target and 0 < recipe["sparsity"] <= 0.95
    assert result.report["sparsity_target"] == recipe["sparsity"]
    sp = result.report["speedup"]
    assert sp["target"] == target and sp["phase"] == "prefill" and sp["predicted"] == recipe["predicted_speedup"]
    assert sp["sparsity"] == recipe["sparsity"]
    # the verdict is the measured figure's (a measured speed is noise on a tiny model: nothing asserts its value)
    assert sp["within_5_percent"] == (abs(sp["measured"] / target - 1) <= 0.05)
    assert make_recipe(**recipe).sparsity == recipe["sparsity"]  # `apply` reads it back as it is
    # the prediction is the cached table's for the widths the pruned model has
    table = latency_table(tiny_lm("llama", **WIDE), prefill_tokens=256, progress=False)
    shapes = get_adapter(result.model).shapes()
    assert [lp.shape() for lp in result.plan.layers] == shapes
    assert recipe["predicted_speedup"] == pytest.approx(predicted_speedup(table, shapes, "prefill"), abs=1e-4)

    # uniform allocation (solved from shapes alone, before scoring) on the same shape: the table is cached
    plan, _, _ = make_plan(
        loaded(tiny_lm("llama", **WIDE), tok),
        make_recipe(method="magnitude", target_speedup=target, speedup_phase="prefill", **CALIB),
        progress=False,
    )
    assert plan.recipe["predicted_speedup"] >= target
    assert 1 - plan.params.attention_mlp_after / plan.params.attention_mlp_before == pytest.approx(
        plan.recipe["sparsity"], abs=0.15
    )
    kept = {len(lp.mlp_channels) for lp in plan.layers}
    assert len(kept) == 1 and kept.pop() < 1024  # uniform: every layer alike, and pruned
    assert plan.recipe["predicted_speedup"] == pytest.approx(
        predicted_speedup(table, [lp.shape() for lp in plan.layers], "prefill"), abs=1e-4
    )
