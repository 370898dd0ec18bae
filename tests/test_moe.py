"""Mixture-of-experts expert pruning on tiny random models of every MoE architecture (real transformers classes):
removing experts the router never selects leaves the logits unchanged, export -> reload reproduces the model (stock
loader for equal counts, `load_pretrained` for per-layer counts), shared experts are never removed, the expert
criteria count and rank as specified, and the pipeline runs end to end with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipeline import VOCAB, smol_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from domainprune import load_pretrained
from domainprune.adapters import MoEAdapter, get_adapter
from domainprune.adapters.moe import accumulate_expert_stats
from domainprune.allocation import keep_top_experts
from domainprune.criteria import CRITERIA, get_criterion
from domainprune.errors import DomainpruneError
from domainprune.models import LoadedModel
from domainprune.pipeline import make_plan, make_recipe
from domainprune.plan import Plan, dense_plan, validate_plan
from domainprune.run import prune
from domainprune.runfolder import save_pruned
from domainprune.stats import collect_statistics
from domainprune.surgery import apply_plan

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
E, TOP_K = 8, 2
DEAD = (6, 7)  # experts whose router rows are zero: they can never be selected (see `skew_routing`)
LIVE = [e for e in range(E) if e not in DEAD]
EXPERTS_KEY = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_local_experts",
    "olmoe": "num_experts",
}

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    num_experts_per_tok=TOP_K,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
EXTRA = {
    "mixtral": dict(num_local_experts=E, sliding_window=None),
    # norm_topk_prob=True: the renormalised top-k that makes removing never-selected experts exact (docs/moe.md)
    "qwen2_moe": dict(num_experts=E, moe_intermediate_size=16, shared_expert_intermediate_size=20, norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=E, moe_intermediate_size=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=E, norm_topk_prob=True),
}


def tiny_moe(arch: str, seed: int = 0, skew: bool = True, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**COMMON, **EXTRA[arch], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so that differences show (3-D expert tensors too)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.1)
    if skew:
        skew_routing(model)
    return model.eval()


def skew_routing(model) -> None:
    """Router rows 1 = −row 0 and 3 = −row 2, so for every token max(z0, z1) = |w0·x| > 0 and likewise for experts
    2/3: two experts always have a positive logit. The DEAD experts' rows are zero (logit 0), so they never make the
    top 2 on any input."""
    a = get_adapter(model)
    with torch.no_grad():
        for i in a.moe_layers():
            w = a.router(i).weight
            w[1], w[3] = -w[0], -w[2]
            w[list(DEAD)] = 0


def ids(batch: int = 3, length: int = 12, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def logits(model, x=None) -> torch.Tensor:
    return model(input_ids=ids() if x is None else x).logits


@torch.inference_mode()
def routing_counts(model, x=None) -> list[torch.Tensor]:
    """Per MoE layer, how often each expert is in a token's top-k, computed from the router logits the model
    returns (independent of domainprune's hooks)."""
    out = model(input_ids=ids() if x is None else x, output_router_logits=True)
    counts = []
    for z in out.router_logits:
        top = z.float().softmax(-1).topk(model.config.num_experts_per_tok, dim=-1).indices
        counts.append(torch.bincount(top.reshape(-1), minlength=z.shape[-1]).double())
    return counts


def with_experts(plan: Plan, keep: dict[int, list[int]]) -> Plan:
    layers = [lp.model_copy(update={"experts": keep[lp.index]}) if lp.index in keep else lp for lp in plan.layers]
    return plan.model_copy(update={"layers": layers})


@pytest.fixture(params=MOE_ARCHS)
def arch(request):
    return request.param


# --- structure ---------------------------------------------------------------------------------------------


def test_adapters_registered_and_shapes(arch):
    model = tiny_moe(arch)
    a = get_adapter(model)
    assert isinstance(a, MoEAdapter) and a.model_type == arch
    assert a.moe_layers() == [0, 1, 2] and a.has_experts()
    s = a.shape(0)
    assert (s.num_heads, s.num_kv_heads, s.intermediate_size, s.num_experts) == (4, 2, 0, E)
    # expert parameter cost: every routed expert's weights and router row, plus the never-pruned shared parts
    block = sum(p.numel() for p in a.mlp(0).parameters())
    assert a.expert_params(E) == block
    assert a.expert_params(E) - a.expert_params(E - 1) == 3 * 32 * a.experts(0).down_proj.shape[-1] + 32
    plan = dense_plan(a, "tiny")
    assert plan.model.experts == [E] * 3 and all(lp.experts == list(range(E)) for lp in plan.layers)
    params = plan.count_params(a, 1000)
    assert params.attention_mlp_before == params.attention_mlp_after == sum(a.layer_params(s) for s in a.shapes())


def test_never_selected_experts_removed_leave_logits_unchanged_and_stock_reload(arch, tmp_path):
    model = tiny_moe(arch)
    counts = routing_counts(model)
    for c in counts:  # the skew really holds: DEAD experts never routed to, the others are
        assert c[list(DEAD)].sum() == 0 and c.sum() == 3 * 12 * TOP_K
    before = logits(model)
    a = get_adapter(model)
    plan = with_experts(dense_plan(a, "tiny"), {i: LIVE for i in range(3)})
    plan.params = plan.count_params(a, sum(p.numel() for p in model.parameters()))
    apply_plan(model, plan)
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert [s.num_experts for s in a.shapes()] == [len(LIVE)] * 3
    assert a.router(0).weight.shape[0] == a.experts(0).gate_up_proj.shape[0] == a.experts(0).num_experts == len(LIVE)
    n_params = sum(p.numel() for p in model.parameters())
    assert plan.params.total_after == n_params  # count_params counts the experts exactly
    # the same count everywhere: a stock config that plain transformers loads
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and config[EXPERTS_KEY[arch]] == len(LIVE)
    assert config["num_experts_per_tok"] == TOP_K
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in stock.parameters()) == n_params
    assert torch.allclose(logits(stock), after, atol=1e-6)


def test_per_layer_expert_counts_and_top_k_cap_reload_through_load_pretrained(arch, tmp_path):
    model = tiny_moe(arch)
    a = get_adapter(model)
    before = logits(model)
    plan = with_experts(dense_plan(a, "tiny"), {0: LIVE, 2: [0, 1, 2, 3, 4, 5, 6]})  # layer 1 keeps all 8
    apply_plan(model, plan)
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5)
    assert [s.num_experts for s in a.shapes()] == [6, 8, 7] and not a.is_uniform()
    out = save_pruned(model, None, tmp_path / "hetero")
    config = json.loads((out / "config.json").read_text())
    key = EXPERTS_KEY[arch]
    assert config["per_layer_config"] == {"0": {key: 6}, "2": {key: 7}} and config[key] == E
    # written in transformers' published layout (one tensor per expert), which load_pretrained fuses back
    saved = load_file(out / "model.safetensors")
    block, gate = ("block_sparse_moe", "w1") if arch == "mixtral" else ("mlp", "gate_proj")
    assert (
        f"model.layers.0.{block}.experts.5.{gate}.weight" in saved
        and f"model.layers.0.{block}.experts.6.{gate}.weight" not in saved
    )
    assert f"model.layers.1.{block}.experts.7.{gate}.weight" in saved
    reloaded = load_pretrained(out)
    assert [s.num_experts for s in get_adapter(reloaded).shapes()] == [6, 8, 7]
    assert torch.allclose(logits(reloaded), after, atol=1e-6)

    # keeping one expert caps that layer's top-k at 1 (the forward still works); recorded per layer
    model = tiny_moe(arch)
    a = get_adapter(model)
    apply_plan(model, with_experts(dense_plan(a, "tiny"), {1: [4]}))
    assert a.top_k(1) == 1 and a.top_k(0) == TOP_K
    capped = logits(model)
    assert torch.isfinite(capped).all()
    out = save_pruned(model, None, tmp_path / "capped")
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] == {"1": {key: 1, "num_experts_per_tok": 1}}
    reloaded = load_pretrained(out)
    assert get_adapter(reloaded).top_k(1) == 1
    assert torch.allclose(logits(reloaded), capped, atol=1e-6)


def test_equal_counts_with_top_k_cap_give_a_stock_config(tmp_path):
    model = tiny_moe("mixtral", skew=False)
    a = get_adapter(model)
    apply_plan(model, with_experts(dense_plan(a, "tiny"), {i: [i] for i in range(3)}))  # one expert each
    out = save_pruned(model, None, tmp_path / "one")
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and (config["num_local_experts"], config["num_experts_per_tok"]) == (1, 1)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(model), atol=1e-6)


def test_without_renormalisation_kept_weights_grow_by_the_removed_mass():
    """norm_topk_prob=False (Qwen/OLMoE default): the selected experts' weights are softmax probabilities over all
    experts, so removing even never-selected experts rescales them by 1/(1 − removed mass): not output-identical."""
    model = tiny_moe("qwen3_moe", norm_topk_prob=False)
    a = get_adapter(model)
    seen = []
    handle = a.router(0).register_forward_hook(lambda _m, _a, out: seen.append([t.detach().clone() for t in out]))
    before = logits(model)
    apply_plan(model, with_experts(dense_plan(a, "tiny"), {0: LIVE}))
    after = logits(model)
    handle.remove()
    (z, w0, i0), (_, w1, i1) = seen
    removed_mass = z.float().softmax(-1)[:, list(DEAD)].sum(-1, keepdim=True)
    assert torch.equal(i0, i1)  # same experts chosen (DEAD ones are the last indices, so numbering is unchanged)
    assert torch.allclose(w1, w0 / (1 - removed_mass), atol=1e-6)
    assert removed_mass.min() > 0.01 and not torch.allclose(before, after, atol=1e-4)


def test_shared_experts_are_never_removed(tmp_path):
    model = tiny_moe("qwen2_moe")
    a = get_adapter(model)
    shared = {k: v.clone() for k, v in model.state_dict().items() if "shared_expert" in k}
    plan = dense_plan(a, "tiny")
    # an index past the routed experts (as if the shared expert were expert E) is refused
    with pytest.raises(DomainpruneError, match="shared experts cannot be pruned"):
        validate_plan(with_experts(plan, {0: [0, 1, E]}), a)
    # so are MLP channels in a MoE layer (the shared expert's channels are not prunable units)
    bad = plan.model_copy(
        update={"layers": [plan.layers[0].model_copy(update={"mlp_channels": list(range(20))}), *plan.layers[1:]]}
    )
    with pytest.raises(DomainpruneError, match="shared experts are never pruned"):
        validate_plan(bad, a)
    with pytest.raises(DomainpruneError, match="keep at least 1 expert"):
        validate_plan(with_experts(plan, {0: []}), a)
    with pytest.raises(DomainpruneError, match="mixture-of-experts layer"):
        a.slice_mlp(0, [0, 1])
    apply_plan(model, with_experts(plan, {0: [0, 2], 1: LIVE, 2: [5]}))
    after = {k: v for k, v in model.state_dict().items() if "shared_expert" in k}
    assert after.keys() == shared.keys() and all(torch.equal(after[k], shared[k]) for k in shared)
    out = save_pruned(model, None, tmp_path / "out")
    reloaded = load_pretrained(out)
    assert all(torch.equal(reloaded.state_dict()[k], shared[k]) for k in shared)


def test_qwen_dense_layers_keep_working(tmp_path):
    """mlp_only_layers=[1]: layer 1 is a dense MLP (channels prunable as before) between two MoE layers."""
    model = tiny_moe("qwen2_moe", mlp_only_layers=[1])
    a = get_adapter(model)
    assert a.moe_layers() == [0, 2] and a.shape(1).intermediate_size == 24 and a.shape(1).num_experts == 0
    with torch.no_grad():
        a.down_proj(1).weight[:, [0, 5]] = 0
    before = logits(model)
    plan = with_experts(dense_plan(a, "tiny"), {0: LIVE, 2: LIVE})
    plan = plan.model_copy(
        update={
            "layers": [
                lp.model_copy(update={"mlp_channels": [c for c in range(24) if c not in (0, 5)]})
                if lp.index == 1
                else lp
                for lp in plan.layers
            ]
        }
    )
    with pytest.raises(DomainpruneError, match="not a mixture-of-experts layer"):
        validate_plan(with_experts(plan, {1: [0]}), a)
    apply_plan(model, plan)
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5)
    out = save_pruned(model, None, tmp_path / "stock")
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and (config["intermediate_size"], config["num_experts"]) == (22, 6)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), after, atol=1e-6)

    # dropping layer 0 renumbers: the dense layer is now layer 0, which the config must say
    model = tiny_moe("qwen2_moe", mlp_only_layers=[1])
    a = get_adapter(model)
    plan = dense_plan(a, "tiny")
    plan = plan.model_copy(update={"layers": [plan.layers[0].model_copy(update={"drop": True}), *plan.layers[1:]]})
    apply_plan(model, plan)
    assert model.config.mlp_only_layers == [0] and a.moe_layers() == [1]
    out = save_pruned(model, None, tmp_path / "dropped")
    assert torch.allclose(logits(load_pretrained(out)), logits(model), atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_attention_heads_use_the_base_machinery(arch, tmp_path):
    """A hand-written plan removes a KV group (zeroed o_proj columns) and never-selected experts together."""
    model = tiny_moe(arch)
    a = get_adapter(model)
    with torch.no_grad():
        for i in range(3):
            a.o_proj(i).weight[:, 16:32] = 0  # query heads 2, 3 = KV group 1
    before = logits(model)
    plan = with_experts(dense_plan(a, "tiny"), {i: LIVE for i in range(3)})
    plan = plan.model_copy(
        update={"layers": [lp.model_copy(update={"kv_heads": [0], "query_heads": [0, 1]}) for lp in plan.layers]}
    )
    apply_plan(model, plan)
    assert torch.allclose(before, logits(model), atol=1e-5)
    assert [(s.num_heads, s.num_kv_heads, s.num_experts) for s in a.shapes()] == [(2, 1, 6)] * 3
    out = save_pruned(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config[EXPERTS_KEY[arch]]) == (2, 1, 6)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(model), atol=1e-6)


def test_olmoe_refuses_head_pruning():
    model = tiny_moe("olmoe")
    a = get_adapter(model)
    plan = dense_plan(a, "tiny")
    lp = plan.layers[0].model_copy(update={"kv_heads": [0], "query_heads": [0, 1]})
    with pytest.raises(DomainpruneError, match="cannot be pruned exactly .q_norm/k_norm normalise all heads together"):
        validate_plan(plan.model_copy(update={"layers": [lp, *plan.layers[1:]]}), a)


def test_plan_json_round_trip_and_dense_plans_unchanged(tmp_path):
    a = get_adapter(tiny_moe("mixtral"))
    plan = with_experts(dense_plan(a, "tiny"), {1: [0, 3, 5]})
    plan.save(tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["model"]["experts"] == [E] * 3 and raw["layers"][1]["experts"] == [0, 3, 5]
    assert Plan.load(tmp_path / "plan.json") == plan
    from tiny_models import tiny_model

    dense = dense_plan(get_adapter(tiny_model("llama")), "tiny")
    text = dense.model_dump_json()
    assert '"experts"' not in text  # plan files of dense models look as before and old ones still load
    assert Plan.model_validate_json(text) == dense and dense.layers[0].experts is None


# --- statistics and criteria -------------------------------------------------------------------------------


def test_accumulate_expert_stats_hand_computed():
    acc: dict[str, torch.Tensor] = {}
    top_k_index = torch.tensor([[0, 1], [0, 2], [1, 0]])
    top_k_weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    routed = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, 3.0]])  # cos(h, h+routed): 1/√2, (0 vector) 0, 1
    outs = torch.tensor(
        [[[3.0, 4.0], [0.0, 1.0]], [[0.0, 2.0], [1.0, 0.0]], [[6.0, 8.0], [1.0, 1.0]]]
    )  # norms 5,1 / 2,1 / 10,√2
    z = torch.tensor([[3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 5.0, 0.0], [0.0, 4.0, 1.0, 0.0]])
    accumulate_expert_stats(acc, 4, h, z, top_k_index, top_k_weights, outs, routed)
    assert acc["expert_selected"].tolist() == [3, 2, 1, 0]
    assert torch.allclose(acc["expert_gate_sum"], torch.tensor([1.8, 0.9, 0.3, 0.0], dtype=torch.float64))
    s0 = 1 - 1 / math.sqrt(2)  # token 0; token 1 shifts by 1 (h + routed = 0 has cosine 0); token 2 by 0
    expected = [0.6 * 5 * s0 + 0.7 * 2 * 1, 0.4 * 1 * s0, 0.3 * 1 * 1, 0.0]
    assert torch.allclose(acc["expert_easyep"], torch.tensor(expected, dtype=torch.float64))
    assert acc["expert_tcess_sum"].tolist() == [3.0, 4.0, 5.0, 0.0]  # top-1 logit per token, r disabled
    accumulate_expert_stats(acc, 4, h, z, top_k_index, top_k_weights, outs, routed)  # batches add up
    assert acc["expert_selected"].tolist() == [6, 4, 2, 0]


@torch.inference_mode()
def test_easy_ep_statistics_match_an_independent_computation():
    """Layer 0 of a Qwen2-MoE (shared expert present, and excluded): EASY-EP recomputed by hand from the router
    and expert weights equals what the hooks collect."""
    model = tiny_moe("qwen2_moe", skew=False)
    a = get_adapter(model)
    x_ids = ids(batch=2, length=6)
    stats = collect_statistics(model, a, x_ids, batch_size=2, use_cache=False, progress=False)
    seen = {}
    hooks = [
        a.residual_norm(0).register_forward_pre_hook(lambda _m, args: seen.setdefault("h", args[0])),
        a.mlp(0).register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0])),
    ]
    model(input_ids=x_ids)
    for hook in hooks:
        hook.remove()
    h, x = (seen[k].reshape(-1, 32).double() for k in ("h", "x"))
    experts = a.experts(0)
    probs = (x @ a.router(0).weight.double().T).softmax(-1)
    g, top = probs.topk(TOP_K, dim=-1)
    g = g / g.sum(-1, keepdim=True)  # norm_topk_prob=True
    outs = torch.zeros(len(x), TOP_K, 32, dtype=torch.float64)
    for t in range(len(x)):
        for j in range(TOP_K):
            gate, up = (experts.gate_up_proj[top[t, j]].double() @ x[t]).chunk(2)
            outs[t, j] = experts.down_proj[top[t, j]].double() @ (torch.nn.functional.silu(gate) * up)
    routed = (g[..., None] * outs).sum(1)
    shift = (1 - torch.nn.functional.cosine_similarity(h, h + routed, dim=-1)).clamp_min(0)
    expected = torch.zeros(E, dtype=torch.float64).index_add_(
        0, top.reshape(-1), (g * outs.norm(dim=-1) * shift[:, None]).reshape(-1)
    )
    assert torch.allclose(stats[0]["expert_easyep"], expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(
        stats[0]["expert_gate_sum"],
        torch.zeros(E, dtype=torch.float64).index_add_(0, top.reshape(-1), g.reshape(-1)),
        atol=1e-6,
    )


def test_criteria_registered_and_checked():
    assert {"expert-frequency", "easy-ep", "tcess"} <= set(CRITERIA)
    assert get_criterion("easy-ep").scores_experts and not get_criterion("flap").scores_experts
    with pytest.raises(DomainpruneError, match="give --experts-keep"):
        make_recipe(method="easy-ep")
    with pytest.raises(DomainpruneError, match="needs an expert method"):
        make_recipe(method="flap", sparsity=0.2, experts_keep=4)
    with pytest.raises(DomainpruneError, match="scores experts only"):
        make_recipe(method="tcess", sparsity=0.2, experts_keep=4)
    with pytest.raises(DomainpruneError, match="whole count"):
        make_recipe(method="tcess", experts_keep=2.5)
    with pytest.raises(DomainpruneError, match="exactly one of sparsity, target_params and target_speedup"):
        make_recipe(method="flap")
    recipe = make_recipe(method="tcess", experts_keep=4.0)
    assert recipe.experts_keep == 4 and isinstance(recipe.experts_keep, int) and recipe.sparsity is None
    assert "experts_keep" not in make_recipe(method="flap", sparsity=0.2).model_dump()  # dense recipes unchanged


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_routing_counts_and_scores(arch):
    model = tiny_moe(arch)
    a = get_adapter(model)
    x = ids(batch=4, length=10)
    stats = collect_statistics(model, a, x, batch_size=2, use_cache=False, progress=False)
    expected = routing_counts(model, x)
    for i in range(3):
        assert torch.equal(stats[i]["expert_selected"], expected[i]), i  # the hand count from the router logits
        assert stats[i]["expert_selected"].sum() == 40 * TOP_K and float(stats[i]["tokens"]) == 40
    freq = [get_criterion("expert-frequency").score_experts(a, i, stats[i]) for i in range(3)]
    easy = [get_criterion("easy-ep").score_experts(a, i, stats[i]) for i in range(3)]
    tcess = [get_criterion("tcess").score_experts(a, i, stats[i]) for i in range(3)]
    for scores in (freq, easy, tcess):
        for s in scores:
            assert s.shape == (E,) and s[list(DEAD)].abs().sum() == 0 and s[list(DEAD)].max() <= s.min()
    for s in easy:  # every selected expert scores above the never-selected ones
        assert (s[LIVE] > 0).sum() >= len(LIVE) - 1
    for s in tcess:  # top-1 logits are positive here (max(z0, z1) = |w0·x| > 0); never top-1 scores 0
        assert (s >= 0).all() and s.max() > 0
    # keeping 6 drops exactly the never-selected experts
    plan = keep_top_experts(dense_plan(a, "tiny"), easy, 6)
    assert all(lp.experts == LIVE for lp in plan.layers)
    plan = keep_top_experts(dense_plan(a, "tiny"), freq, 0.5)  # a fraction of each layer's experts
    assert all(len(lp.experts) == 4 and not set(lp.experts) & set(DEAD) for lp in plan.layers)
    with pytest.raises(DomainpruneError, match="more than the 8 experts"):
        keep_top_experts(dense_plan(a, "tiny"), freq, 9)


def test_gradient_methods_refuse_moe_models_and_expert_methods_dense_models():
    from tiny_models import tiny_model

    loaded = LoadedModel(tiny_moe("olmoe"), None, None, "tiny")
    with pytest.raises(
        DomainpruneError, match="mixture of experts; method 'taylor' cannot score its experts' channels"
    ):
        make_plan(loaded, make_recipe(model="tiny", method="taylor", sparsity=0.2), progress=False)
    with pytest.raises(DomainpruneError, match="allocation nirvana-ratio does not handle mixture-of-experts"):
        make_plan(
            loaded,
            make_recipe(model="tiny", method="magnitude", sparsity=0.2, allocation="nirvana-ratio"),
            progress=False,
        )
    loaded = LoadedModel(tiny_model("llama"), None, None, "tiny")
    with pytest.raises(DomainpruneError, match="has no mixture-of-experts layers"):
        make_plan(loaded, make_recipe(model="tiny", method="easy-ep", experts_keep=2), progress=False)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,method,keep",
    [
        ("qwen2_moe", "easy-ep", 4),
        ("mixtral", "tcess", 0.5),
        ("olmoe", "expert-frequency", 6),
        ("qwen3_moe", "easy-ep", 3),
    ],
)
def test_pipeline_end_to_end_with_the_real_tokenizer(arch, method, keep, tmp_path):
    tokenizer = smol_tokenizer()
    model = tiny_moe(arch, vocab_size=VOCAB)
    n_before = sum(p.numel() for p in model.parameters())
    result = prune(
        LoadedModel(model, tokenizer, None, "tiny"),
        data="code",
        method=method,
        experts_keep=keep,
        calib_samples=2,
        seq_len=16,
        batch_size=2,
        out=tmp_path / "out",
        progress=False,
    )
    kept = 4 if keep == 0.5 else keep
    a = get_adapter(result.model)
    assert [s.num_experts for s in a.shapes()] == [kept] * 3 and a.top_k(0) == min(TOP_K, kept)
    assert all(len(lp.experts) == kept for lp in result.plan.layers)
    assert result.recipe.experts_keep == keep and result.report["uniform"]
    n_after = sum(p.numel() for p in result.model.parameters())
    assert (
        result.plan.params.total_after
        == n_after
        == n_before - 3 * (E - kept) * (a.expert_params(2) - a.expert_params(1))
    )
    assert 0 < result.plan.params.sparsity < 1
    out = result.out
    config = json.loads((out / "config.json").read_text())
    assert config[EXPERTS_KEY[arch]] == kept and "per_layer_config" not in config
    assert json.loads((out / "recipe.json").read_text())["experts_keep"] == keep
    assert Plan.load(out / "plan.json").layers[0].experts == result.plan.layers[0].experts
    x = ids(batch=1, length=8, vocab=VOCAB)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(stock, x), logits(result.model, x), atol=1e-5)


def test_cli_prunes_experts(tmp_path, capsys):
    import sys

    from domainprune.cli import main

    tokenizer = smol_tokenizer()
    folder = tmp_path / "model"
    tiny_moe("qwen2_moe", vocab_size=VOCAB).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "pruned"
    argv = sys.argv
    sys.argv = [
        "domainprune",
        "prune",
        "--model",
        str(folder),
        "--method",
        "easy-ep",
        "--experts-keep",
        "4",
        "--calib-samples",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert exit_.value.code == 0, err
    assert "experts 12/24" in err.replace("\n", "")
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4


# --- MLP channels inside experts --------------------------------------------------------------------------------

WIDTH_KEY = {
    "mixtral": "intermediate_size",
    "qwen2_moe": "moe_intermediate_size",
    "qwen3_moe": "moe_intermediate_size",
    "olmoe": "intermediate_size",
}


def zero_channels(model, drop: dict[int, int], shared_drop: int = 0) -> dict[int, dict]:
    """Zero, in MoE layer i, `drop[i]` down_proj columns of every routed expert (different ones per expert) and
    `shared_drop` of the shared expert's: those channels contribute exactly nothing. Returns the kept channels as
    plan fields."""
    a = get_adapter(model)
    fields = {}
    with torch.no_grad():
        for i, n in drop.items():
            w = a.expert_width(i)
            kept = {}
            for e in range(a.num_experts(i)):
                gone = [(e * 3 + j * 5) % w for j in range(n)]
                assert len(set(gone)) == n
                a.experts(i).down_proj[e][:, gone] = 0
                kept[e] = [c for c in range(w) if c not in gone]
            fields[i] = {"expert_channels": kept}
            if a.shared_expert(i) is not None:
                sw = a.shared_width(i)
                a.shared_expert(i).down_proj.weight[:, sw - shared_drop :] = 0
                fields[i]["shared_channels"] = list(range(sw - shared_drop))
    return fields


def with_fields(plan: Plan, fields: dict[int, dict]) -> Plan:
    return plan.model_copy(update={"layers": [lp.model_copy(update=fields.get(lp.index, {})) for lp in plan.layers]})


def test_zero_expert_channels_removed_leave_logits_unchanged_and_reload(arch, tmp_path):
    """Equal widths everywhere: stock config (expert width key updated) that AutoModelForCausalLM loads; widths per
    layer, together with removed experts: per_layer_config and load_pretrained."""
    model = tiny_moe(arch)
    a = get_adapter(model)
    w, sw = a.expert_width(0), a.shared_width(0)
    before = logits(model)
    plan = with_fields(dense_plan(a, "tiny"), zero_channels(model, {0: 8, 1: 8, 2: 8}, shared_drop=4))
    before = logits(model)
    plan.params = plan.count_params(a, sum(p.numel() for p in model.parameters()))
    apply_plan(model, plan)
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert [(s.expert_width, s.shared_width) for s in a.shapes()] == [(w - 8, sw - 4 if sw else 0)] * 3
    assert plan.params.total_after == sum(p.numel() for p in model.parameters())
    out = save_pruned(model, None, tmp_path / "stock")
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and config[WIDTH_KEY[arch]] == w - 8
    if arch == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == sw - 4
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), after, atol=1e-6)

    # per-layer widths, and channels of the kept experts only (keyed by their original index)
    model = tiny_moe(arch)
    a = get_adapter(model)
    drop2 = 16 if w == 24 else 0
    fields = zero_channels(model, {0: 8, 2: drop2}, shared_drop=2)
    before = logits(model)
    fields[0]["experts"] = LIVE
    fields[0]["expert_channels"] = {e: c for e, c in fields[0]["expert_channels"].items() if e in LIVE}
    apply_plan(model, with_fields(dense_plan(a, "tiny"), fields))
    after = logits(model)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert [(s.num_experts, s.expert_width) for s in a.shapes()] == [(6, w - 8), (E, w), (E, w - drop2)]
    out = save_pruned(model, None, tmp_path / "hetero")
    config = json.loads((out / "config.json").read_text())
    key = WIDTH_KEY[arch]
    assert (
        config["per_layer_config"]["0"][key] == w - 8
        and config["per_layer_config"].get("2", {}).get(key, w) == w - drop2
    )
    assert "1" not in config["per_layer_config"] and config[key] == w
    reloaded = load_pretrained(out)
    assert [(s.num_experts, s.expert_width, s.shared_width) for s in get_adapter(reloaded).shapes()] == [
        (s.num_experts, s.expert_width, s.shared_width) for s in a.shapes()
    ]
    assert torch.allclose(logits(reloaded), after, atol=1e-6)


def test_expert_channel_plans_round_trip_and_bad_plans_fail_in_one_line(tmp_path):
    model = tiny_moe("qwen2_moe", mlp_only_layers=[1])
    a = get_adapter(model)
    plan = dense_plan(a, "tiny")
    assert plan.model.expert_widths == [16, 0, 16] and plan.model.shared_widths == [20, 0, 20]
    eight = [0, 1, 2, 3, 4, 5, 6, 9]
    good = {
        0: {
            "experts": [0, 3],
            "expert_channels": {0: eight, 3: list(range(4, 12))},
            "shared_channels": [0, 1, 2, 3, 19],
        }
    }
    plan = with_fields(plan, good)
    validate_plan(plan, a)
    plan.save(tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())["layers"][0]
    assert raw["expert_channels"] == {"0": "0-6,9", "3": "4-11"} and raw["shared_channels"] == "0-3,19"
    assert "expert_channels" not in json.loads((tmp_path / "plan.json").read_text())["layers"][1]
    assert Plan.load(tmp_path / "plan.json") == plan
    # layer 0 keeps 2 experts × 8 + 5 shared channels; layer 2 keeps all 8 × 16 + 20 (of 2 × (8 × 16 + 20) before)
    assert f"expert channels {2 * 8 + 5 + 8 * 16 + 20}/{2 * (8 * 16 + 20)}" in plan.summary()

    def bad(update: dict, match: str, layer: int = 0) -> None:
        broken = plan.model_copy(
            update={"layers": [lp.model_copy(update=update) if lp.index == layer else lp for lp in plan.layers]}
        )
        with pytest.raises(DomainpruneError, match=match) as err:
            validate_plan(broken, a)
        assert "\n" not in str(err.value)

    bad({"expert_channels": {0: eight, 3: [4, 5, 6]}}, "same number of channels")
    bad({"expert_channels": {0: eight, 2: eight}}, "exactly the kept experts 0,3")
    bad({"expert_channels": {0: [*eight[:7], 16], 3: eight}}, "expert 0 has an index outside 0..15")
    bad({"expert_channels": {0: [1, *eight[1:]], 3: [1, *eight[1:]]}}, "lists an index twice")
    bad({"expert_channels": {0: [0, 1], 3: [4, 5]}}, "keep a multiple of 8 .or all 16.: transformers' grouped_mm")
    bad({"expert_channels": {0: [], 3: []}}, "keeps at least 1 channel")
    bad({"shared_channels": []}, "shared expert keeps at least 1 channel")
    bad({"shared_channels": [20]}, "shared_channels has an index outside 0..19")
    bad({"expert_channels": {0: [0]}}, "not a mixture-of-experts layer", layer=1)
    bad({"shared_channels": [0]}, "not a mixture-of-experts layer", layer=1)
    with pytest.raises(DomainpruneError, match="has no shared expert"):
        q3 = get_adapter(tiny_moe("qwen3_moe"))
        validate_plan(with_fields(dense_plan(q3, "tiny"), {0: {"shared_channels": [0]}}), q3)
    wrong = plan.model_copy(update={"model": plan.model.model_copy(update={"expert_widths": [12, 0, 16]})})
    with pytest.raises(DomainpruneError, match="expert widths per layer"):
        validate_plan(wrong, a)
    # the plan applies: shared expert kept (5 channels), experts 0 and 3 with 8 channels each
    apply_plan(model, plan)
    assert (a.num_experts(0), a.expert_width(0), a.shared_width(0), a.shape(1).intermediate_size) == (2, 8, 5, 24)
    assert torch.isfinite(logits(model)).all()


@torch.inference_mode()
def test_channel_statistics_match_an_independent_computation():
    """Layer 0 of a Qwen2-MoE: per routed expert Σ g·a and Σ (g·a)² over the tokens routed to it, and the shared
    expert's Σ σ·a, (σ·a)², recomputed by hand from the weights, equal what the hooks collect."""
    model = tiny_moe("qwen2_moe", skew=False)
    a = get_adapter(model)
    x_ids = ids(batch=2, length=6)
    stats = collect_statistics(model, a, x_ids, batch_size=2, use_cache=False, progress=False)
    seen = {}
    hook = a.mlp(0).register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    model(input_ids=x_ids)
    hook.remove()
    x = seen["x"].reshape(-1, 32).double()
    probs = (x @ a.router(0).weight.double().T).softmax(-1)
    g, top = probs.topk(TOP_K, dim=-1)
    g = g / g.sum(-1, keepdim=True)
    experts, silu = a.experts(0), torch.nn.functional.silu
    total, squares = torch.zeros(E, 16, dtype=torch.float64), torch.zeros(E, 16, dtype=torch.float64)
    for t in range(len(x)):
        for j in range(TOP_K):
            gate, up = (experts.gate_up_proj[top[t, j]].double() @ x[t]).chunk(2)
            ga = g[t, j] * silu(gate) * up
            total[top[t, j]] += ga
            squares[top[t, j]] += ga * ga
    assert torch.allclose(stats[0]["expert_in_sum"], total, atol=1e-6)
    assert torch.allclose(stats[0]["expert_in_sqsum"], squares, atol=1e-6)
    sh = a.shared_expert(0)
    act = silu(x @ sh.gate_proj.weight.double().T) * (x @ sh.up_proj.weight.double().T)
    sigma = torch.sigmoid(x @ a.mlp(0).shared_expert_gate.weight.double().T)
    assert torch.allclose(stats[0]["shared_in_sum"], (sigma * act).sum(0), atol=1e-6)
    assert torch.allclose(stats[0]["shared_in_sqsum"], (sigma * act).pow(2).sum(0), atol=1e-6)


@pytest.mark.parametrize(
    "arch,method,allocation,sparsity",
    [
        ("qwen2_moe", "flap", "global", 0.3),
        ("mixtral", "wanda-sp", "uniform", 0.3),
        ("olmoe", "magnitude", "uniform", 0.3),
        ("qwen3_moe", "wanda-sp", "global", 0.4),
    ],
)
def test_dense_criteria_prune_heads_and_expert_channels_end_to_end(arch, method, allocation, sparsity, tmp_path):
    tokenizer = smol_tokenizer()
    model = tiny_moe(arch, vocab_size=VOCAB)
    a0 = get_adapter(model)
    w, sw = a0.expert_width(0), a0.shared_width(0)
    result = prune(
        LoadedModel(model, tokenizer, None, "tiny"),
        data="code",
        method=method,
        sparsity=sparsity,
        allocation=allocation,
        calib_samples=2,
        seq_len=16,
        batch_size=2,
        out=tmp_path / "out",
        progress=False,
    )
    a = get_adapter(result.model)
    shapes = a.shapes()
    assert all(s.num_experts == E for s in shapes)  # channel criteria never remove experts (a separate run does)
    assert any(s.expert_width < w for s in shapes) and all(s.expert_width >= 1 for s in shapes)
    if sw:
        assert all(1 <= s.shared_width <= sw for s in shapes) and a.shared_expert(0) is not None
    if arch == "olmoe":
        assert all((s.num_heads, s.num_kv_heads) == (4, 2) for s in shapes)  # heads are never pruned there
    for lp in result.plan.layers:  # every expert of a layer keeps the same number of its own channels
        assert sorted(lp.expert_channels) == list(range(E)) and len({len(c) for c in lp.expert_channels.values()}) == 1
    # tiny experts can only lose 8 channels at a time (a multiple of 8 is kept), so the budget is met coarsely
    assert abs(result.plan.params.sparsity - sparsity) < 0.1, result.plan.params.sparsity
    assert result.plan.params.total_after == sum(p.numel() for p in result.model.parameters())
    assert result.plan.summary().count("expert channels") == 1
    out = result.out  # save_pruned already reloaded it and compared logits; reload once more the user's way
    x = ids(batch=1, length=8, vocab=VOCAB)
    config = json.loads((out / "config.json").read_text())
    if result.report["uniform"]:
        assert "per_layer_config" not in config and config[WIDTH_KEY[arch]] == shapes[0].expert_width
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        reloaded = load_pretrained(out)
    assert torch.allclose(logits(reloaded, x), logits(result.model, x), atol=1e-5)


def test_experts_then_channels_in_two_runs(tmp_path):
    """The documented flow: prune experts, then prune channels (and heads) of the result loaded from disk."""
    tokenizer = smol_tokenizer()
    common = dict(data="code", calib_samples=2, seq_len=16, batch_size=2, progress=False)
    first = prune(
        LoadedModel(tiny_moe("qwen2_moe", vocab_size=VOCAB), tokenizer, None, "tiny"),
        method="easy-ep",
        experts_keep=4,
        out=tmp_path / "experts",
        **common,
    )
    second = prune(str(first.out), method="flap", sparsity=0.25, out=tmp_path / "channels", **common)
    a = get_adapter(second.model)
    assert [s.num_experts for s in a.shapes()] == [4] * 3 and a.expert_width(0) * 3 > 0
    assert (
        second.plan.model.experts == [4] * 3
        and second.plan.params.attention_mlp_before == first.plan.params.attention_mlp_after
    )
    assert any(s.expert_width < 16 or s.shared_width < 20 for s in a.shapes())
    assert torch.allclose(
        logits(load_pretrained(second.out), ids(vocab=VOCAB)), logits(second.model, ids(vocab=VOCAB)), atol=1e-5
    )


def test_without_method_a_moe_model_gets_the_fallback_recipe(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="domainprune.pipeline")
    model = LoadedModel(tiny_moe("qwen2_moe", vocab_size=VOCAB), smol_tokenizer(), None, "tiny")
    recipe = make_recipe(model="tiny", sparsity=0.2, data="code", calib_samples=2, seq_len=16, batch_size=2)
    assert recipe.method == "cfsp" and recipe.reconstruct == "obs"  # the model is not known yet
    plan, _, _ = make_plan(model, recipe, progress=False)
    assert plan.recipe["method"] == "flap" and plan.recipe.get("reconstruct") is None
    assert "cannot apply: OBS refits dense MLPs, and this model has mixture-of-experts layers" in caplog.text
