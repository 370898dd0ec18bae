"""Hidden-dimension pruning: removing residual channels that are zero in the embedding and in every write to the
residual stream leaves the logits unchanged on every architecture that supports it (dense and mixture-of-experts),
alone and combined with head/channel/layer pruning in one plan; the export is a stock config that reloads to the same
logits; the scores follow the norm-output activations; the pipeline meets one budget."""

from __future__ import annotations

import json

import pytest
import torch
from test_moe import tiny_moe
from tiny_models import input_ids, logits, tiny_model
from tiny_pipeline import CALIB, loaded, smol_tokenizer, tiny_lm
from transformers import AutoModelForCausalLM

from domainprune import load_pretrained
from domainprune.adapters import get_adapter
from domainprune.errors import DomainpruneError
from domainprune.hidden import choose_hidden, kept_width, width_sparsity
from domainprune.pipeline import make_recipe
from domainprune.plan import Plan, dense_plan
from domainprune.run import prune
from domainprune.runfolder import save_pruned
from domainprune.stats import collect_statistics
from domainprune.surgery import apply_plan

D = 48  # hidden size of tests/tiny_models.py
GONE = [1, 5, 6, 17, 30, 47]  # residual channels removed
KEEP = [c for c in range(D) if c not in GONE]


def zero_residual_channels(model, gone: list[int]) -> None:
    """Make channels `gone` of the residual stream exactly zero: zero embedding columns and zero rows in every
    projection that writes to the stream (o_proj, down_proj or the routed and shared experts' down projections)."""
    a = get_adapter(model)
    with torch.no_grad():
        a.model.get_input_embeddings().weight[:, gone] = 0
        for i in range(a.num_layers):
            a.o_proj(i).weight[gone] = 0
            if a.has_dense_mlp(i):
                a.down_proj(i).weight[gone] = 0
            else:
                a.experts(i).down_proj[:, gone] = 0
                if (shared := a.shared_expert(i)) is not None:
                    shared.down_proj.weight[gone] = 0


def with_hidden(plan: Plan, keep: list[int]) -> Plan:
    return plan.model_copy(update={"hidden_channels": keep})


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero_residual_channels_removed_leave_logits_unchanged_and_stock_reload(arch, tied, tmp_path):
    model = tiny_model(arch, tie_word_embeddings=tied)
    zero_residual_channels(model, GONE)
    before = logits(model)
    eps = model.config.rms_norm_eps
    adapter = apply_plan(model, with_hidden(dense_plan(get_adapter(model), "tiny"), KEEP))
    after = logits(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert adapter.hidden_size == len(KEEP) and model.get_input_embeddings().weight.shape == (97, len(KEEP))
    assert model.config.rms_norm_eps == pytest.approx(eps * D / len(KEEP))
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == len(KEEP) and "per_layer_config" not in config
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(logits(stock), after)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_models_lose_zero_residual_channels_exactly(arch, tmp_path):
    model = tiny_moe(arch)
    gone = [0, 3, 9, 12, 20, 21, 30, 31]  # of hidden size 32: the experts kernel needs a multiple of 8 kept
    keep = [c for c in range(32) if c not in gone]
    zero_residual_channels(model, gone)
    x = input_ids(vocab=97)
    before = logits(model, x)
    apply_plan(model, with_hidden(dense_plan(get_adapter(model), "tiny"), keep))
    after = logits(model, x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    out = save_pruned(model, None, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["hidden_size"] == len(keep)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out).eval(), x), after)


def test_hidden_combines_with_heads_channels_and_layers_in_one_plan(tmp_path):
    """Zero KV group 1 of layer 0, MLP channels of layer 1, the whole of layer 2, layer 3's attention, and residual
    channels: one plan
    removes all of them; per-layer widths export through per_layer_config and reload with load_pretrained."""
    model = tiny_model("llama")
    a = get_adapter(model)
    zero_residual_channels(model, GONE)
    with torch.no_grad():
        a.o_proj(0).weight[:, 24:] = 0  # query heads 3..5 (KV group 1)
        a.down_proj(1).weight[:, :10] = 0
        a.o_proj(2).weight.zero_()
        a.down_proj(2).weight.zero_()
        a.o_proj(3).weight.zero_()  # layer 3 loses its whole attention: a removed sublayer's bias is sliced too
    before = logits(model)
    plan = dense_plan(a, "tiny")
    layers = list(plan.layers)
    layers[0] = layers[0].model_copy(update={"kv_heads": [0], "query_heads": [0, 1, 2]})
    layers[1] = layers[1].model_copy(update={"mlp_channels": list(range(10, 40))})
    layers[2] = layers[2].model_copy(update={"drop": True})
    layers[3] = layers[3].model_copy(update={"kv_heads": [], "query_heads": []})
    plan = plan.model_copy(update={"layers": layers, "hidden_channels": KEEP})
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["hidden_channels"] == "0,2-4,7-16,18-29,31-46"
    plan = Plan.load(tmp_path / "plan.json")
    apply_plan(model, plan)
    after = logits(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert a.num_layers == 3 and a.hidden_size == len(KEEP)
    out = save_pruned(model, None, tmp_path / "out")
    assert torch.equal(logits(load_pretrained(out)), after)


def test_scores_follow_norm_output_activations():
    """A channel whose norm weights are zero everywhere carries nothing into any block: it scores 0 and goes first;
    a channel the norms amplify is kept."""
    tok = smol_tokenizer()
    model = tiny_lm("mistral")  # any hidden size is valid (a Llama config wants a multiple of its head count)
    a = get_adapter(model)
    with torch.no_grad():
        for norm in a.residual_norms():
            norm.weight[[3, 11]] = 0
            norm.weight[20] = 50
    recipe = make_recipe(model="tiny", method="flap", sparsity=0.3, **CALIB)
    from domainprune.pipeline import calibration_sequences

    stats = collect_statistics(
        model, a, calibration_sequences(recipe, tok), batch_size=2, use_cache=False, progress=False
    )
    keep = choose_hidden(a, stats, 2 / D)
    assert keep == [c for c in range(D) if c not in (3, 11)]
    assert 20 in choose_hidden(a, stats, 0.9)


def test_budget_arithmetic():
    assert kept_width(48, 0.25) == 36 and kept_width(576, 0.1, 64) == 512 and kept_width(48, 0.99) == 1
    assert width_sparsity(0.35, 0.75) == pytest.approx(1 - 0.65 / 0.75)
    with pytest.raises(DomainpruneError, match="more than --sparsity"):
        width_sparsity(0.2, 0.75)


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])  # global allocation with compensation; sequential uniform
def test_pipeline_meets_one_budget_and_reloads(method, tmp_path):
    tok = smol_tokenizer()
    model = tiny_lm("llama")
    a = get_adapter(model)
    before = sum(a.layer_params(s) for s in a.shapes())
    result = prune(
        loaded(model, tok),
        method=method,
        sparsity=0.4,
        hidden_sparsity=0.25,
        out=tmp_path / "out",
        progress=False,
        **CALIB,
    )
    pruned = get_adapter(result.model)
    assert (
        pruned.hidden_size == 36 and result.plan.hidden_channels is not None and len(result.plan.hidden_channels) == 36
    )
    after = sum(pruned.layer_params(s) for s in pruned.shapes())
    assert abs(after / before - 0.6) < 0.04, after / before
    assert result.report["sparsity_achieved"] == pytest.approx(1 - after / before, abs=0.01)
    assert result.report["total_params"][1] == sum(p.numel() for p in result.model.parameters())
    ids = input_ids(vocab=result.model.config.vocab_size)
    torch.testing.assert_close(logits(load_pretrained(result.out), ids), logits(result.model, ids), rtol=0, atol=1e-5)


def test_refusals_are_one_line():
    with pytest.raises(DomainpruneError, match="cannot be larger"):
        make_recipe(model="tiny", method="flap", sparsity=0.1, hidden_sparsity=0.2)
    gemma = tiny_model("gemma3_text")
    plan = with_hidden(dense_plan(get_adapter(gemma), "tiny"), KEEP)
    with pytest.raises(DomainpruneError, match="cannot be pruned exactly"):
        apply_plan(gemma, plan)
    with pytest.raises(DomainpruneError, match="multiple of 8"):
        get_adapter(tiny_moe("mixtral")).slice_hidden(list(range(30)))
    olmoe = tiny_moe("olmoe")
    with pytest.raises(DomainpruneError, match="q_norm"):
        get_adapter(olmoe).slice_hidden(list(range(30)))
    model = tiny_model("llama")  # a uniform plan of 3 heads per layer cannot have 40 hidden channels in a LlamaConfig
    plan = dense_plan(get_adapter(model), "tiny")
    plan = plan.model_copy(
        update={
            "hidden_channels": list(range(40)),
            "layers": [lp.model_copy(update={"kv_heads": [0], "query_heads": [0, 1, 2]}) for lp in plan.layers],
        }
    )
    with pytest.raises(DomainpruneError, match="divisible by the attention-head count"):
        apply_plan(model, plan)
    assert get_adapter(tiny_model("llama")).hidden_multiple() == 6  # lcm of {2,3,4,6} = 12 > 48/8: the head count
    assert get_adapter(tiny_model("llama", hidden_size=96, head_dim=16)).hidden_multiple() == 12
    assert get_adapter(tiny_model("mistral")).hidden_multiple() == 1
    model = tiny_model("llama")
    with pytest.raises(DomainpruneError, match="outside 0..47"):
        apply_plan(model, with_hidden(dense_plan(get_adapter(model), "tiny"), [0, 48]))


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_pipeline_scores_the_block_input_and_reloads(arch, tmp_path):
    tok = smol_tokenizer()
    from tiny_pipeline import VOCAB

    model = tiny_moe(arch, vocab_size=VOCAB)
    result = prune(
        loaded(model, tok),
        method="flap",
        sparsity=0.4,
        hidden_sparsity=0.25,
        out=tmp_path / "out",
        progress=False,
        data="code",
        calib_samples=2,
        seq_len=16,
        batch_size=2,
    )
    assert get_adapter(result.model).hidden_size == 24  # 32 · 0.75, a multiple of 8 for the experts kernel
    ids = input_ids(vocab=VOCAB)
    torch.testing.assert_close(logits(load_pretrained(result.out), ids), logits(result.model, ids), rtol=0, atol=1e-5)
