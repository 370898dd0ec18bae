"""Structural correctness on every architecture: removing units whose contribution is exactly zero leaves the
logits unchanged, and export -> reload reproduces the in-memory model."""

import json

import pytest
import torch
from tiny_models import input_ids, logits, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from domainprune import load_pretrained
from domainprune.adapters import get_adapter
from domainprune.adapters.base import LayerShape
from domainprune.errors import DomainpruneError
from domainprune.plan import Plan, dense_plan, validate_plan
from domainprune.runfolder import save_pruned
from domainprune.surgery import apply_plan

HD = 8  # head_dim of the tiny models; 6 query heads in 2 KV groups of 3


def zero_head(model, layer, head):
    with torch.no_grad():
        get_adapter(model).o_proj(layer).weight[:, head * HD : (head + 1) * HD] = 0


def zero_channel(model, layer, channel):
    with torch.no_grad():
        get_adapter(model).down_proj(layer).weight[:, channel] = 0


def edit(plan: Plan, layer: int, **fields) -> Plan:
    layers = [lp.model_copy(update=fields) if lp.index == layer else lp for lp in plan.layers]
    return plan.model_copy(update={"layers": layers})


def test_zero_units_removed_leave_logits_unchanged_uniform(model, tmp_path):
    adapter = get_adapter(model)
    plan = dense_plan(adapter, "tiny")
    for i in range(adapter.num_layers):
        # remove KV group 1 (query heads 3,4,5) and channels 0, 7 in every layer: uniform widths
        for h in (3, 4, 5):
            zero_head(model, i, h)
        for c in (0, 7):
            zero_channel(model, i, c)
        plan = edit(
            plan, i, kv_heads=[0], query_heads=[0, 1, 2], mlp_channels=[c for c in range(40) if c not in (0, 7)]
        )
    before = logits(model)
    apply_plan(model, plan)
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert get_adapter(model).shape(0) == LayerShape(3, 1, 38)
    n_params = sum(p.numel() for p in model.parameters())
    # export: uniform -> stock transformers loads it
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and config["num_attention_heads"] == 3 and config["intermediate_size"] == 38
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in stock.parameters()) == n_params
    assert torch.equal(logits(stock), after)


def test_query_heads_within_groups_and_heterogeneous_export(model, tmp_path):
    adapter = get_adapter(model)
    plan = dense_plan(adapter, "tiny")
    # layer 0: drop one query head per group (heads 2 and 4); layer 1: drop KV group 0; layer 2: channels only
    for h in (2, 4):
        zero_head(model, 0, h)
    for h in (0, 1, 2):
        zero_head(model, 1, h)
    for c in range(0, 40, 3):
        zero_channel(model, 2, c)
    plan = edit(plan, 0, query_heads=[0, 1, 3, 5])
    plan = edit(plan, 1, kv_heads=[1], query_heads=[3, 4, 5])
    plan = edit(plan, 2, mlp_channels=[c for c in range(40) if c % 3])
    before = logits(model)
    apply_plan(model, plan)
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5)
    shapes = get_adapter(model).shapes()
    assert [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes] == [
        (4, 2, 40),
        (3, 1, 40),
        (6, 2, 26),
        (6, 2, 40),
    ]
    for s in shapes:  # GQA stays consistent: equal query heads per KV group
        assert s.num_heads % s.num_kv_heads == 0
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] == {
        "0": {"num_attention_heads": 4},
        "1": {"num_attention_heads": 3, "num_key_value_heads": 1},
        "2": {"intermediate_size": 26},
    }
    reloaded = load_pretrained(out)
    assert torch.equal(logits(reloaded), after)
    # Stock transformers reads the config (tokenizers need it) but refuses the per-layer weights loudly.
    stock_config = AutoConfig.from_pretrained(out)
    assert stock_config.is_heterogeneous and stock_config.per_layer_config[1].num_key_value_heads == 1
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(out)


def test_removed_sublayers_and_generation_with_cache(model, tmp_path):
    """A layer whose attention (every head) and another whose MLP (every channel) contribute zero."""
    adapter = get_adapter(model)
    plan = dense_plan(adapter, "tiny")
    with torch.no_grad():
        adapter.o_proj(0).weight.zero_()
        adapter.down_proj(1).weight.zero_()
    plan = edit(plan, 0, kv_heads=[], query_heads=[])
    plan = edit(plan, 1, mlp_channels=[])
    ids = input_ids(batch=1, length=6)
    before = logits(model, ids)
    gen_before = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    apply_plan(model, plan)
    assert torch.allclose(before, logits(model, ids), atol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), gen_before)
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"]["0"] == {"skip": ["self_attn"]}
    assert config["per_layer_config"]["1"] == {"skip": ["mlp"]}
    reloaded = load_pretrained(out)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert torch.equal(reloaded.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), gen_before)


def test_dropping_a_zero_layer_leaves_logits_unchanged(arch, tmp_path):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.o_proj(2).weight.zero_()
        adapter.down_proj(2).weight.zero_()
    plan = edit(dense_plan(adapter, "tiny"), 2, drop=True)
    before = logits(model)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 3
    if types_before:
        assert model.config.layer_types == types_before[:2] + types_before[3:]
    assert torch.allclose(before, logits(model), atol=1e-5)
    out = save_pruned(model, None, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(stock), logits(model))


def test_bias_compensation_exports_and_reloads(model, tmp_path):
    """FLAP compensation adds o_proj/down_proj biases; stock-expressible for Llama, extra biases otherwise."""
    adapter = get_adapter(model)
    plan = edit(dense_plan(adapter, "tiny"), 1, kv_heads=[0], query_heads=[0, 1, 2], mlp_channels=list(range(20)))
    means = [
        {"attn_in_mean": torch.randn(48, dtype=torch.float64), "mlp_in_mean": torch.randn(40, dtype=torch.float64)}
        for _ in range(4)
    ]
    apply_plan(model, plan, means)
    assert get_adapter(model).o_proj(1).bias is not None and get_adapter(model).down_proj(1).bias is not None
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    if model.config.model_type == "llama":
        assert "domainprune" not in config and config["attention_bias"] and config["mlp_bias"]
    else:
        assert "mlp.down_proj" in config["domainprune"]["extra_biases"]
    assert torch.equal(logits(load_pretrained(out)), logits(model))


def test_compensation_bias_is_removed_mean_contribution():
    """With constant inputs the compensated layer reproduces the dense output exactly."""
    from domainprune.surgery import removed_mean_output

    w = torch.randn(5, 7)
    x = torch.randn(7)
    kept = torch.tensor([0, 2, 3])
    bias = removed_mean_output(w, x, kept)
    assert torch.allclose(w[:, kept] @ x[kept] + bias, w @ x, atol=1e-6)


def test_plan_validation_errors(model):
    adapter = get_adapter(model)
    plan = dense_plan(adapter, "tiny")
    with pytest.raises(DomainpruneError, match="same number"):
        validate_plan(edit(plan, 0, query_heads=[0, 1, 3]), adapter)  # 2 heads in group 0, 1 in group 1
    with pytest.raises(DomainpruneError, match="outside"):
        validate_plan(edit(plan, 0, mlp_channels=[0, 99]), adapter)
    with pytest.raises(DomainpruneError, match="every layer"):
        validate_plan(plan.model_copy(update={"layers": plan.layers[:2]}), adapter)
    other = tiny_model(model.config.model_type, intermediate_size=32)
    with pytest.raises(DomainpruneError, match="does not match"):
        validate_plan(plan, get_adapter(other))


def test_plan_json_roundtrip_with_ranges(model, tmp_path):
    plan = edit(dense_plan(get_adapter(model), "tiny"), 0, mlp_channels=[0, 1, 2, 5, 7, 8, 39])
    plan.save(tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    assert '"0-2,5,7-8,39"' in text
    assert Plan.load(tmp_path / "plan.json") == plan


def test_unsupported_architecture_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(DomainpruneError, match="supported model types: .*llama") as e:
        get_adapter(gpt2)
    assert "\n" not in str(e.value)
