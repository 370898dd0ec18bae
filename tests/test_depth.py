"""Depth pruning (ShortGPT layers, FinerCut sublayers) on tiny random models of real architectures: removing a
layer or sublayer whose output is exactly zero leaves the logits unchanged, the export reloads identically, each
method removes what a constructed case says it must, FinerCut resumes, and depth + width meet one budget."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import input_ids, logits, tiny_model
from tiny_pipeline import CALIB, assert_same_state, loaded, logits_on, smol_tokenizer, state, tiny_lm
from transformers import AutoModelForCausalLM

from domainprune import load_pretrained
from domainprune.adapters import get_adapter
from domainprune.depth import DepthRemoval, FinerCut, block_influence, js_divergence, zero_removed
from domainprune.errors import DomainpruneError
from domainprune.pipeline import apply, calibration_sequences, make_plan, make_recipe
from domainprune.plan import Plan, dense_plan, validate_plan
from domainprune.run import prune
from domainprune.runfolder import save_pruned
from domainprune.stats import collect_statistics
from domainprune.surgery import apply_plan


def attn_mlp_params(model) -> int:
    """Attention+MLP weights counted on the modules themselves (biases left out: compensation adds some)."""
    a = get_adapter(model)
    n = 0
    for i in range(a.num_layers):
        mods = ([] if a.attention_removed(i) else [*a.attention_in_projs(i), a.o_proj(i)]) + (
            [] if a.mlp_removed(i) else [*a.mlp_in_projs(i), a.down_proj(i)]
        )
        n += sum(m.weight.numel() for m in mods)
    return n


def zero_sublayer(model, i: int, kind: str) -> None:
    a = get_adapter(model)
    with torch.no_grad():
        (a.o_proj(i) if kind == "attention" else a.down_proj(i)).weight.zero_()


# --- structure: zero-output removal and export, every architecture ------------------------------------------


def test_zero_output_sublayers_and_layer_removed_export_and_reload(arch, tmp_path):
    model = tiny_model(arch)
    if arch == "qwen2":  # q/k/v biases: the attention is still computed, only its o_proj output is zero
        assert get_adapter(model).attention_in_projs(0)[0].bias is not None
    for i, kind in ((0, "attention"), (1, "mlp"), (2, "attention"), (2, "mlp")):
        zero_sublayer(model, i, kind)
    ids = input_ids(batch=1, length=12)
    before = logits(model, ids)
    gen_before = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    removal = DepthRemoval("finercut", layers=[2], sublayers=[(0, "attention"), (1, "mlp")])
    dense = dense_plan(get_adapter(model), "tiny")
    plan = removal.mark(dense, dense)
    validate_plan(plan, get_adapter(model))
    assert [(lp.drop, lp.skip, len(lp.kv_heads), len(lp.mlp_channels)) for lp in plan.layers] == [
        (False, ["self_attn"], 0, 40),
        (False, ["mlp"], 2, 0),
        (True, [], 2, 40),
        (False, [], 2, 40),
    ]
    assert Plan.model_validate_json(plan.model_dump_json()) == plan  # skip survives plan.json
    apply_plan(model, plan)
    after = logits(model, ids)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert torch.equal(model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, min_new_tokens=6), gen_before)
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["per_layer_config"] == {"0": {"skip": ["self_attn"]}, "1": {"skip": ["mlp"]}}
    if arch == "gemma3_text":  # sliding/full pattern of the kept layers
        assert config["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    reloaded = load_pretrained(out)
    assert torch.equal(logits(reloaded, ids), after)


def test_a_dropped_zero_layer_alone_exports_a_stock_checkpoint(arch, tmp_path):
    model = tiny_model(arch)
    zero_removed(get_adapter(model), {(1, "attention"), (1, "mlp")})  # the mechanism width-after-depth relies on
    before = logits(model)
    dense = dense_plan(get_adapter(model), "tiny")
    apply_plan(model, DepthRemoval("shortgpt", layers=[1]).mark(dense, dense))
    assert torch.allclose(before, logits(model), atol=1e-5)
    out = save_pruned(model, None, tmp_path / "out")
    assert "per_layer_config" not in json.loads((out / "config.json").read_text())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(model))


# --- ShortGPT -----------------------------------------------------------------------------------------------


def test_block_influence_is_one_minus_cos_of_layer_input_and_output():
    """BI from the layer-wise pass equals 1 − mean cos of HF's hidden states (layers before the last: HF's last
    hidden state has the final norm applied, which METHODS.md flags, so BI never uses it)."""
    model = tiny_model("llama")
    ids = input_ids(batch=2, length=12)
    bi = block_influence(
        collect_statistics(model, get_adapter(model), ids, batch_size=2, use_cache=False, progress=False)
    )
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert bi[i] == pytest.approx(float((1 - cos).mean()), rel=1e-6)


def test_shortgpt_removes_the_layer_made_identity():
    tok = smol_tokenizer()
    model = tiny_lm("llama")
    zero_sublayer(model, 1, "attention")
    zero_sublayer(model, 1, "mlp")  # layer 1 is now the identity: BI = 0
    reference = copy.deepcopy(model)
    result = prune(loaded(model, tok), method="shortgpt", sparsity=0.25, progress=False, **CALIB)
    assert [lp.index for lp in result.plan.layers if lp.drop] == [1]
    assert result.recipe.allocation is None and result.report["sparsity_achieved"] == pytest.approx(0.25)
    ids = calibration_sequences(result.recipe, tok)
    assert torch.allclose(logits_on(result.model, ids), logits_on(reference, ids), atol=1e-4)
    assert result.model.config.num_hidden_layers == 3 and result.report["stock_loadable"]


# --- FinerCut -----------------------------------------------------------------------------------------------


@torch.inference_mode()
def _brute_force_js(model, removed, ids) -> float:
    """JS(dense ‖ model with `removed` zeroed) by plain full forwards, no prefix reuse."""
    pruned = copy.deepcopy(model)
    zero_removed(get_adapter(pruned), removed)
    p = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    q = torch.log_softmax(pruned(input_ids=ids).logits.float(), -1)
    return float(js_divergence(p, q).double().mean())


def test_finercut_greedy_order_on_a_constructed_case():
    """MLP 2 outputs zero (JS 0) and attention 0 almost zero: they go first and second; every step's divergences
    equal full forwards (the prefix reuse is exact), and the budget stops the loop."""
    model = tiny_model("llama")
    zero_sublayer(model, 2, "mlp")
    with torch.no_grad():
        get_adapter(model).o_proj(0).weight.mul_(1e-3)
    ids = input_ids(batch=4, length=16)
    a = get_adapter(model)
    attn, mlp = a.attention_params(6, 2), a.mlp_params(40)
    fc = FinerCut(model, a, ids, batch_size=2, use_cache=False, progress=False)
    removal = fc.run(attn + mlp)  # exactly one attention and one MLP sublayer
    assert removal.sublayers == [(2, "mlp"), (0, "attention")] and removal.layers == []
    assert removal.removed_params == attn + mlp
    assert removal.scores["steps"][0]["js"] == 0
    # the second step's choice: the smallest divergence, each one what a plain forward gives
    outputs = fc._layer_outputs([(2, "mlp")])
    dense = [fc._forward(b) for b in fc.batches]
    got = {c: fc._divergence([(2, "mlp")], c, dense, outputs) for c in fc.candidates if c != (2, "mlp")}
    assert min(got, key=got.get) == (0, "attention")
    for c in [(0, "attention"), (1, "mlp"), (3, "attention"), (3, "mlp")]:
        assert got[c] == pytest.approx(_brute_force_js(model, [(2, "mlp"), c], ids), rel=1e-4, abs=1e-9)


def test_finercut_resumes_after_an_interruption(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("qwen3")
    ids = input_ids(batch=4, length=16)
    a = get_adapter(model)
    target = 0.4 * sum(a.layer_params(s) for s in a.shapes())
    reference = FinerCut(model, a, ids, batch_size=2, use_cache=False, progress=False)
    want = reference.run(target)
    assert want.removed_params > 0

    class Crash(Exception):
        pass

    original, calls = FinerCut._divergence, []

    def crashing(self, *args):
        if len(calls) == 11:  # in the second step (8 candidates in the first)
            raise Crash
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(FinerCut, "_divergence", crashing)
    with pytest.raises(Crash):
        FinerCut(model, a, ids, batch_size=2, progress=False).run(target)
    monkeypatch.setattr(FinerCut, "_divergence", original)
    resumed = FinerCut(model, a, ids, batch_size=2, progress=False)
    got = resumed.run(target)
    assert (got.layers, got.sublayers, got.scores) == (want.layers, want.sublayers, want.scores)
    assert resumed.forwards == reference.forwards - 11  # nothing measured twice
    again = FinerCut(model, a, ids, batch_size=2, progress=False)
    assert again.run(target).sublayers == want.sublayers and again.forwards == 0


# --- depth + width under one budget -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(method="magnitude", allocation="global", depth="finercut", depth_sparsity=0.1, sparsity=0.35),
        dict(
            method="magnitude",
            allocation="uniform",
            attention_unit="query_head",
            depth="shortgpt",
            depth_sparsity=0.2,
            sparsity=0.4,
        ),
        dict(method="wanda-sp", depth="finercut", depth_sparsity=0.15, sparsity=0.3),  # sequential, uniform
        dict(method="wanda-sp", depth="shortgpt", depth_sparsity=0.25, sparsity=0.4),  # sequential past a dropped layer
        dict(method="flap", depth="shortgpt", depth_sparsity=0.2, sparsity=0.45),  # global, bias compensation
        dict(method="finercut", sparsity=0.3),  # depth alone
    ],
    ids=[
        "finercut+magnitude-global",
        "shortgpt+magnitude-uniform",
        "finercut+wanda-sp",
        "shortgpt+wanda-sp",
        "shortgpt+flap",
        "finercut",
    ],
)
def test_depth_and_width_meet_one_budget(fields, tmp_path):
    tok = smol_tokenizer()
    model = tiny_lm("llama")  # no q/k/v biases: the weights are all the plan counts
    a = get_adapter(model)
    before = attn_mlp_params(model)
    kv_group = a.attention_params(3, 1)  # the largest width unit
    result = prune(loaded(model, tok), progress=False, out=tmp_path / "out", **fields, **CALIB)
    plan = result.plan
    removed = before - attn_mlp_params(result.model)
    assert plan.params.attention_mlp_after == attn_mlp_params(result.model)
    assert result.report["sparsity_achieved"] == pytest.approx(removed / before)
    depth = [lp for lp in plan.layers if lp.drop or lp.skip]
    assert depth, "the depth method removed nothing"
    if "depth" in fields:
        slack = kv_group if result.recipe.allocation == "global" else a.mlp_params(1) * 4
        assert abs(removed - fields["sparsity"] * before) <= slack, (removed, fields["sparsity"] * before)
        assert any(len(lp.mlp_channels) not in (0, 40) for lp in plan.kept_layers())  # width pruned too
    else:
        assert abs(removed - fields["sparsity"] * before) <= a.mlp_params(40) / 2 + a.attention_params(6, 2) / 2
    # skipped sublayers carry no compensation bias: they are exactly absent
    for new_i, lp in enumerate(plan.kept_layers()):
        if "self_attn" in lp.skip:
            assert torch.count_nonzero(get_adapter(result.model).attention(new_i).bias) == 0
    reloaded = load_pretrained(result.out)
    ids = input_ids(vocab=model.config.vocab_size)
    assert torch.equal(logits_on(reloaded, ids), logits_on(result.model, ids))


def test_width_statistics_are_those_of_the_depth_pruned_model():
    """After depth, the width criterion's statistics equal a plain statistics pass over the model with the depth
    removals applied (and differ from the dense model's downstream)."""
    tok = smol_tokenizer()
    recipe = make_recipe(model="tiny", method="flap", depth="shortgpt", depth_sparsity=0.25, sparsity=0.4, **CALIB)
    model = tiny_lm("llama", seed=3)
    dense_stats = collect_statistics(
        copy.deepcopy(model),
        get_adapter(model),
        calibration_sequences(recipe, tok),
        batch_size=2,
        use_cache=False,
        progress=False,
    )
    reduced = copy.deepcopy(model)
    plan, stats, pruned = make_plan(loaded(model, tok), recipe, progress=False)
    assert not pruned
    (gone,) = [lp.index for lp in plan.layers if lp.drop]
    dense = dense_plan(get_adapter(reduced), "tiny")
    apply_plan(reduced, DepthRemoval("shortgpt", layers=[gone]).mark(dense, dense))
    want = collect_statistics(
        reduced, get_adapter(reduced), calibration_sequences(recipe, tok), batch_size=2, use_cache=False, progress=False
    )
    kept = [i for i in range(4) if i != gone]
    for new_i, i in enumerate(kept):
        for key in ("attn_in_sum", "mlp_in_sqsum"):
            torch.testing.assert_close(stats[i][key], want[new_i][key], rtol=1e-6, atol=1e-8)
    later = [i for i in kept if i > gone]
    if later:
        assert not torch.allclose(stats[later[0]]["mlp_in_sqsum"], dense_stats[later[0]]["mlp_in_sqsum"])


def test_plan_then_apply_equals_prune(tmp_path):
    """`domainprune plan` + `apply` of a depth+width plan with FLAP compensation recomputes the statistics on the
    depth-pruned model and gives prune's weights."""
    tok = smol_tokenizer()
    fields = dict(method="flap", depth="finercut", depth_sparsity=0.1, sparsity=0.35, **CALIB)
    direct = prune(loaded(tiny_lm("mistral"), tok), progress=False, **fields)
    plan, _, _ = make_plan(loaded(tiny_lm("mistral"), tok), make_recipe(model="tiny", **fields), progress=False)
    plan.save(tmp_path / "plan.json")
    edited = Plan.load(tmp_path / "plan.json")
    assert any(lp.skip for lp in edited.layers) and edited.layers == direct.plan.layers
    fresh = tiny_lm("mistral")
    apply(loaded(fresh, tok), edited, progress=False)
    assert_same_state(state(fresh), state(direct.model))


def test_depth_recipe_errors_are_one_line():
    cases = [
        (dict(method="flap", depth="shortgpt", sparsity=0.3), "together"),
        (dict(method="flap", depth="magnitude", depth_sparsity=0.1, sparsity=0.3), "depth method"),
        (dict(method="shortgpt", depth="finercut", depth_sparsity=0.1, sparsity=0.3), "already prunes depth"),
        (dict(method="flap", depth="shortgpt", depth_sparsity=0.4, sparsity=0.3), "cannot be larger"),
        (dict(method="nirvana", depth="shortgpt", depth_sparsity=0.1, sparsity=0.3), "global or uniform"),
        (dict(method="shortgpt", allocation="global", sparsity=0.3), "leave it out"),
    ]
    for fields, match in cases:
        with pytest.raises(DomainpruneError, match=match) as e:
            make_recipe(model="tiny", **fields)
        assert "\n" not in str(e.value)
    plan = dense_plan(get_adapter(tiny_model("llama")), "tiny")
    plan.layers[0] = plan.layers[0].model_copy(update={"skip": ["mlp"]})
    with pytest.raises(DomainpruneError, match="skip keeps nothing"):
        validate_plan(plan, get_adapter(tiny_model("llama")))


def test_js_divergence_bounds():
    p = torch.log_softmax(torch.randn(5, 11), -1)
    assert torch.allclose(js_divergence(p, p), torch.zeros(5), atol=1e-7)
    one_hot = torch.full((1, 2), -1e4)
    one_hot[0, 0] = 0
    other = one_hot.flip(-1)
    assert float(js_divergence(one_hot, other)) == pytest.approx(math.log(2), rel=1e-5)
