"""Training-aware pruning (domainprune.training_aware, recover --train) on tiny random models of every dense
architecture with the real SmolLM2 tokenizer and the bundled code corpus."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import ARCHS, tiny_model
from tiny_pipeline import CALIB, VOCAB, cli, loaded, logits_on, save_folder, smol_tokenizer, tiny_lm

from domainprune import faults
from domainprune.adapters import get_adapter
from domainprune.allocation import uniform_counts
from domainprune.errors import DomainpruneError
from domainprune.evaluate import parameter_count
from domainprune.export import load_pretrained
from domainprune.pipeline import make_recipe
from domainprune.plan import Plan, dense_plan
from domainprune.run import prune
from domainprune.surgery import apply_plan
from domainprune.training_aware import atp, common, loraprune

IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
# tiny training: 8 calibration and 4 validation sequences of 16 tokens, batches of 2, a fast decision generator
TRAIN = dict(time_budget=None, samples=8, seq_len=16, batch_size=2, save_steps=100)
ATP = dict(TRAIN, max_steps=8, pdg_samples=4, pdg_lr=0.05)


def atp_recipe(**train):
    return make_recipe(model="tiny", data="code", method="atp", sparsity=0.35, train={**ATP, **train})


def one_unit(units: common.Units) -> float:
    """The budget tolerance asked for: one unit (the largest, a KV group) as a fraction of attention+MLP."""
    return max(units.group_cost) / units.total


@pytest.mark.parametrize("arch", ARCHS)
def test_atp_pruned_units_exactly_zero_and_removal_exact(arch):
    tok = smol_tokenizer()
    recipe = atp_recipe()
    merged, keep, units, report = atp.train_atp(
        loaded(tiny_lm(arch), tok), recipe, atp.AtpOptions(**recipe.train), None, progress=False
    )
    assert report["steps"] == 8 and report["pruned_units_max_abs"] == 0.0
    adapter = get_adapter(merged)
    removed_groups = removed_channels = 0
    for i, (g, c) in enumerate(keep):  # W₀⊙m + BA of every pruned unit, read off the merged weights
        q, k, v = adapter.attention_in_projs(i)
        gate, up = adapter.mlp_in_projs(i)
        gone_q, gone_kv = units.q_rows(i, ~g) > 0, units.kv_rows(~g) > 0
        for w in (
            q.weight[gone_q],
            k.weight[gone_kv],
            v.weight[gone_kv],
            adapter.o_proj(i).weight[:, gone_q],
            gate.weight[~c],
            up.weight[~c],
            adapter.down_proj(i).weight[:, ~c],
        ):
            assert torch.equal(w, torch.zeros_like(w))
        removed_groups += int((~g).sum())
        removed_channels += int((~c).sum())
    assert removed_channels > 0
    before = logits_on(merged, IDS)
    total = parameter_count(merged)
    plan = common.plan_from_keep(adapter, dense_plan(adapter, "tiny"), keep, total)
    apply_plan(merged, plan)
    assert parameter_count(merged) < total
    torch.testing.assert_close(logits_on(merged, IDS), before, atol=1e-5, rtol=1e-5)
    assert abs(plan.params.sparsity - 0.35) <= one_unit(units)


def test_atp_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    tok = smol_tokenizer()
    recipe = atp_recipe(save_steps=3, max_steps=7)
    options = atp.AtpOptions(**recipe.train)
    whole, keep_a, _, report_a = atp.train_atp(loaded(tiny_lm("qwen2"), tok), recipe, options, tmp_path / "a", False)

    class Killed(Exception):
        pass

    def kill_at(name):
        if name == "train:6":
            raise Killed

    monkeypatch.setattr(faults, "point", kill_at)
    with pytest.raises(Killed):  # dies right after writing the step-6 checkpoint; step 3's was written before
        atp.train_atp(loaded(tiny_lm("qwen2"), tok), recipe, options, tmp_path / "b", False)
    monkeypatch.undo()
    resumed, keep_b, _, report_b = atp.train_atp(loaded(tiny_lm("qwen2"), tok), recipe, options, tmp_path / "b", False)
    assert [e["step"] for e in report_b["log"]] == list(range(1, 8))
    assert [e["loss"] for e in report_b["log"]] == [e["loss"] for e in report_a["log"]]
    for (ga, ca), (gb, cb) in zip(keep_a, keep_b):
        assert torch.equal(ga, gb) and torch.equal(ca, cb)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_atp_run_folder_exports_like_any_other(tmp_path):
    tok = smol_tokenizer()
    model = tiny_lm("llama")
    dense = parameter_count(model)
    out = tmp_path / "atp"
    result = prune(
        loaded(model, tok), out=out, data="code", method="atp", sparsity=0.35, train=ATP, seq_len=32, progress=False
    )
    plan = Plan.load(out / "plan.json")
    assert json.loads((out / "recipe.json").read_text())["method"] == "atp"
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["pruned_units_max_abs"] == 0.0
    assert len(json.loads((out / "training_log.json").read_text())) == 8
    assert report["total_params"] == [dense, parameter_count(result.model)]
    reloaded = load_pretrained(out)
    torch.testing.assert_close(logits_on(reloaded, IDS), logits_on(result.model, IDS), atol=1e-5, rtol=1e-5)
    assert not (tmp_path / ".atp.train").exists()
    # the plan describes the surgery: the dense model cut to it has the checkpoint's shapes
    cut = tiny_lm("llama")
    apply_plan(cut, plan)
    assert {k: v.shape for k, v in cut.state_dict().items()} == {k: v.shape for k, v in reloaded.state_dict().items()}


def test_training_options_refused_in_one_line():
    with pytest.raises(DomainpruneError, match="not an option of --method atp"):
        make_recipe(model="tiny", method="atp", sparsity=0.3, train={"lora_rank": 4})
    with pytest.raises(DomainpruneError, match="leave out --allocation"):
        make_recipe(model="tiny", method="atp", sparsity=0.3, allocation="global")
    with pytest.raises(DomainpruneError, match="need --method atp"):
        make_recipe(model="tiny", method="magnitude", sparsity=0.3, train={"max_steps": 3})
    with pytest.raises(DomainpruneError, match="give --sparsity alone"):
        make_recipe(model="tiny", method="loraprune", target_params=1000)


def test_cli_train_opt_reaches_the_recipe(tmp_path, capsys):
    tok = smol_tokenizer()
    folder = save_folder(tiny_lm("qwen3"), tok, tmp_path / "dense")
    base = ("prune", "--model", folder, "--method", "atp", "--sparsity", "0.3", "--seq-len", "32", "--out")
    opts = [x for kv in ("samples=4", "seq_len=16", "pdg_samples=2", "batch_size=2") for x in ("--train-opt", kv)]
    code, _, err = cli(capsys, *base, tmp_path / "out", "--max-steps", "2", *opts, "-q")
    assert code is None or code == 0, err
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["train"]["max_steps"] == 2 and recipe["train"]["samples"] == 4
    code, _, err = cli(capsys, *base, tmp_path / "o2", "--train-opt", "lora_r")
    assert code == 2 and "KEY=VALUE" in err


# --- LoRAPrune -----------------------------------------------------------------------------------------------


def test_loraprune_gradient_estimate_matches_merged_weight_gradient():
    """Ĝ = ∇B·A + B·∇A − ∇B·∇A, with ∇B = s·G·Aᵀ and ∇A = s·Bᵀ·G from the true gradient G of the merged weight
    W + s·BA, is s·(G·AᵀA + B·Bᵀ·G) − s²·G·Aᵀ·Bᵀ·G: checked against G computed on the merged (plain) model."""
    tok = smol_tokenizer()
    model = tiny_lm("llama")
    options = common.TrainOptions(max_steps=1, lora_dropout=0.0)
    peft_model = common.add_lora(model, options, seed=0)
    with torch.no_grad():  # B starts at zero; give it values so that every term is exercised
        for n, p in common.lora_params(peft_model).items():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    ids = IDS[:, :12]
    plain = copy.deepcopy(peft_model).merge_and_unload()
    common.causal_ce(peft_model, ids).backward()
    plain.requires_grad_(True)
    common.causal_ce(plain, ids).backward()
    a_lora, a_plain = get_adapter(peft_model.base_model.model), get_adapter(plain)
    for i in (0, 3):
        for mod, ref in (
            (a_lora.attention_in_projs(i)[1], a_plain.attention_in_projs(i)[1]),
            (a_lora.o_proj(i), a_plain.o_proj(i)),
            (a_lora.down_proj(i), a_plain.down_proj(i)),
        ):
            b, a, s = common.lora_parts(mod)
            g = ref.weight.grad.double()
            b, a = b.detach().double(), a.detach().double()
            expected = s * (g @ a.T @ a + b @ b.T @ g) - s * s * (g @ a.T @ b.T @ g)
            got = loraprune.lora_gradient(mod).double()
            assert got.abs().max() > 0
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    assert tok is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_loraprune_meets_budget_with_gqa_groups(arch, tmp_path):
    tok = smol_tokenizer()
    model = tiny_lm(arch)
    result = prune(
        loaded(model, tok),
        out=tmp_path / "lp",
        data="code",
        method="loraprune",
        sparsity=0.35,
        seq_len=32,
        train=dict(TRAIN, max_steps=6, prune_every=2),
        progress=False,
    )
    units = common.Units.of(get_adapter(tiny_lm(arch)))
    assert abs(result.plan.params.sparsity - 0.35) <= one_unit(units)
    for lp in result.plan.layers:  # whole KV groups with all their query heads (GQA: 3 per group)
        assert lp.query_heads == [h for g in lp.kv_heads for h in range(3 * g, 3 * g + 3)]
    dense = get_adapter(tiny_lm(arch)).shape(3)  # the last layer is protected (the reference's rule)
    assert result.plan.layers[3].shape() == dense and result.plan.layers[2].shape() != dense
    assert result.report["training"]["steps"] == 6
    sched = [e["sparsity"] for e in json.loads((tmp_path / "lp" / "training_log.json").read_text()) if "sparsity" in e]
    assert sched == sorted(sched) and sched[-1] == 0.35
    torch.testing.assert_close(
        logits_on(load_pretrained(tmp_path / "lp"), IDS), logits_on(result.model, IDS), atol=1e-5, rtol=1e-5
    )


def test_loraprune_protected_layers_keep_every_unit_and_the_rest_meet_the_budget():
    a = get_adapter(tiny_model("llama", num_hidden_layers=10))
    assert loraprune.protected_layers(10) == {0, 9} and loraprune.protected_layers(4) == {3}
    counts = loraprune.target_counts(a, 0.35, protect=True)
    assert counts[0] == counts[9] == (0, 0) and all(g > 0 and c > 0 for g, c in counts[1:9])
    units = common.Units.of(a)
    cut = sum(g * units.group_cost[i] + c * units.channel_cost for i, (g, c) in enumerate(counts))
    assert abs(cut / units.total - 0.35) <= one_unit(units)
    assert loraprune.target_counts(a, 0.35, protect=False) == uniform_counts(a, 0.35, "kv_group")
    with pytest.raises(DomainpruneError, match="protect_layers=false"):
        loraprune.target_counts(get_adapter(tiny_model("llama")), 0.7, protect=True)  # 4 layers: 93 % of 3


def test_cubic_schedule():
    o = loraprune.LoraPruneOptions(max_steps=100)
    s = [loraprune.cubic_sparsity(t, 100, 0.5, o) for t in range(101)]
    assert s[:11] == [0.0] * 11 and s[90:] == [0.5] * 11 and s == sorted(s)
    assert s[50] == pytest.approx(0.5 * (1 - (1 - 40 / 80) ** 3))


# --- iterative -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,allocation", [("magnitude", None), ("wanda-sp", "adapt"), ("cfsp", None)])
def test_iterative_stages_meet_the_budget(tmp_path, method, allocation):
    """Any criterion and allocation; with `adapt`, Adapt-Pruner's own layer update re-scored on each tuned stage; cfsp
    (MLP only) on the non-uniform widths of stages 2 and 3 still removes each stage's share."""
    tok = smol_tokenizer()
    model = tiny_lm("qwen2")
    result = prune(
        loaded(model, tok),
        out=tmp_path / "it",
        method=method,
        allocation=allocation,
        sparsity=0.4,
        iterative=3,
        train=dict(TRAIN, max_steps=3),
        progress=False,
        **CALIB,
    )
    stages = result.report["training"]["stages"]
    assert [s["stage"] for s in stages] == [1, 2, 3] and all(s["steps"] == 1 for s in stages)
    assert stages[0]["params"] > stages[1]["params"] > stages[2]["params"] == parameter_count(result.model)
    units = common.Units.of(get_adapter(tiny_lm("qwen2")))
    assert abs(result.plan.params.sparsity - 0.4) <= one_unit(units)
    cut = tiny_lm("qwen2")  # the composed plan indexes the original model and gives the checkpoint's shapes
    apply_plan(cut, Plan.load(tmp_path / "it" / "plan.json"))
    assert get_adapter(cut).shapes() == get_adapter(result.model).shapes()
    if allocation == "adapt":  # layer-adaptive: the layers end at different widths
        assert len({x.intermediate_size for x in get_adapter(result.model).shapes()}) > 1


# --- PERP-style light recovery -----------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", ["norms", "norms,biases", "norms,lora"])
def test_light_recovery_trains_only_what_it_says(tmp_path, parts):
    from domainprune.recover import recover

    tok = smol_tokenizer()
    model = tiny_lm("qwen2")  # q/k/v biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = recover(
        loaded(model, tok),
        out=tmp_path / "r",
        train=parts,
        samples=4,
        seq_len=16,
        batch_size=2,
        max_steps=2,
        time_budget=None,
        progress=False,
        verify=False,
    )
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = {k for k in before if ("norm" in k and "norms" in parts) or (k.endswith("bias") and "biases" in parts)}
    if "lora" in parts:  # LoRA merges into the seven projections' weights
        allowed |= {k for k in before if k.endswith("proj.weight")}
    assert changed and changed <= allowed
    assert any("norm" in k for k in changed)
    counts = result.report["trained_params"]
    norms = sum(v.numel() for k, v in before.items() if "norm" in k)
    biases = sum(v.numel() for k, v in before.items() if k.endswith("bias"))
    assert counts["norms"] == norms
    assert counts["biases"] == (biases if "biases" in parts else 0)
    assert (counts["lora"] > 0) == ("lora" in parts)
    assert counts["total"] == counts["norms"] + counts["biases"] + counts["lora"]


def test_light_recovery_refuses_what_it_cannot_train(tmp_path):
    from domainprune.recover import make_config, recover

    with pytest.raises(DomainpruneError, match="comma-separated subset"):
        make_config(train="norms,heads")
    with pytest.raises(DomainpruneError, match="none of those parameters"):
        recover(
            loaded(tiny_lm("llama"), smol_tokenizer()),
            out=tmp_path / "r",
            train="biases",
            samples=4,
            seq_len=16,
            batch_size=2,
            max_steps=1,
            progress=False,
        )


def test_loraprune_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    tok = smol_tokenizer()
    recipe = make_recipe(
        model="tiny",
        data="code",
        method="loraprune",
        sparsity=0.35,
        train=dict(TRAIN, max_steps=6, save_steps=2, prune_every=2),
    )
    options = loraprune.LoraPruneOptions(**recipe.train)
    first = loaded(tiny_lm("mistral"), tok)
    plan_a, report_a = loraprune.run(first, recipe, options, tmp_path / "a", False)

    class Killed(Exception):
        pass

    def kill_at(name):
        if name == "train:4":
            raise Killed

    monkeypatch.setattr(faults, "point", kill_at)
    with pytest.raises(Killed):
        loraprune.run(loaded(tiny_lm("mistral"), tok), recipe, options, tmp_path / "b", False)
    monkeypatch.undo()
    second = loaded(tiny_lm("mistral"), tok)
    plan_b, report_b = loraprune.run(second, recipe, options, tmp_path / "b", False)
    assert plan_a.layers == plan_b.layers and report_a["log"] == [
        {**e, "elapsed": a["elapsed"]} for e, a in zip(report_b["log"], report_a["log"])
    ]
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_atp_stopped_by_time_budget_still_meets_budget():
    tok = smol_tokenizer()
    recipe = atp_recipe(max_steps=None, time_budget=1e-3)
    merged, keep, units, report = atp.train_atp(
        loaded(tiny_lm("llama"), tok), recipe, atp.AtpOptions(**recipe.train), None, progress=False
    )
    # the budget is spent by the end of the first step at the latest; the decisions still meet the budget exactly
    assert report["steps"] <= 1 and report["stopped_by_time_budget"]
    assert report["planned_steps"] is None if report["steps"] == 0 else report["planned_steps"] >= 2
    plan = common.plan_from_keep(get_adapter(merged), dense_plan(get_adapter(merged), "tiny"), keep, 1)
    assert abs(plan.params.sparsity - 0.35) <= one_unit(units) and report["pruned_units_max_abs"] == 0.0


def test_plan_refuses_training_methods(tmp_path, capsys):
    tok = smol_tokenizer()
    folder = save_folder(tiny_lm("llama"), tok, tmp_path / "dense")
    code, _, err = cli(
        capsys,
        "plan",
        "--model",
        folder,
        "--method",
        "atp",
        "--sparsity",
        "0.3",
        "--seq-len",
        "32",
        "--out",
        tmp_path / "plan.json",
    )
    assert code == 2 and "run `domainprune prune`" in err
