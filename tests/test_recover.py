"""Recovery (domainprune.recover) on a tiny pruned run: merged checkpoint shapes and reload, loss going down, KD
against itself, PASER-style selection, self-data distillation, resume after an interruption, the time budget and
one-line errors. Tiny models with SmolLM2's tokenizer; a few optimiser steps each."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from tiny_pipeline import VOCAB, cli, flap_run, loaded, logits_on, save_folder, smol_tokenizer, tiny_lm

from domainprune.errors import DomainpruneError
from domainprune.export import load_pretrained
from domainprune.recover import allocate_budget, kd_loss, kmeans, lora_targets, recover
from domainprune.run import prune

# small and quick: 8 sequences of 16 tokens, batches of 2, no time budget unless a test sets one
FAST = dict(data="code", samples=8, seq_len=16, batch_size=2, time_budget=None, warmup_steps=0, lr=5e-3)
PROBE = torch.arange(24).mul(7919).remainder(VOCAB)[None]


@pytest.fixture(scope="module")
def tokenizer():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    return flap_run(tmp_path_factory.mktemp("runs") / "pruned", tokenizer)


@pytest.fixture(scope="module")
def dense(tokenizer):
    return loaded(tiny_lm("llama"), tokenizer)


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_lora_merge_keeps_shapes_and_reloads(run_dir, tmp_path):
    pruned = load_pretrained(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config.get("per_layer_config"), "the fixture should be heterogeneous"
    assert lora_targets(pruned)
    result = recover(run_dir, out=tmp_path / "rec", max_steps=2, progress=False, **FAST)
    assert shapes(result.model.state_dict()) == shapes(pruned.state_dict())
    assert not any("lora" in k for k in result.model.state_dict())
    reloaded = load_pretrained(tmp_path / "rec")
    torch.testing.assert_close(logits_on(reloaded, PROBE), logits_on(result.model, PROBE), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_on(reloaded, PROBE), logits_on(pruned, PROBE)), "training changed nothing"
    files = {p.name for p in (tmp_path / "rec").iterdir()}
    assert {"recovery.json", "recovery_log.json", "plan.json", "recipe.json", "report.json"} <= files
    assert not (tmp_path / ".rec.recovery").exists()  # staging removed on success


def test_stock_loadable_run(tokenizer, tmp_path):
    # uniform allocation without bias compensation: stock transformers loads both the run and its recovery
    from transformers import AutoModelForCausalLM

    run = tmp_path / "uniform"
    prune(
        loaded(tiny_lm("llama"), tokenizer),
        out=run,
        method="wanda-sp",
        allocation="uniform",
        sparsity=0.35,
        bias_compensation=False,
        data="code",
        calib_samples=2,
        seq_len=16,
        batch_size=2,
        progress=False,
    )
    result = recover(run, out=tmp_path / "rec", max_steps=1, progress=False, **FAST)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "rec").eval()
    torch.testing.assert_close(logits_on(stock, PROBE), logits_on(result.model, PROBE), atol=1e-4, rtol=1e-4)


def test_training_lowers_loss(run_dir, tmp_path):
    result = recover(run_dir, out=tmp_path / "rec", max_steps=8, progress=False, **{**FAST, "samples": 4})
    losses = [e["loss"] for e in result.log]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert result.report["steps"] == 8
    logged = json.loads((tmp_path / "rec" / "recovery_log.json").read_text())
    assert [e["step"] for e in logged] == list(range(1, 9))
    assert all(e["elapsed"] >= 0 and e["lr"] is not None for e in logged)


def test_gradient_accumulation_averages_like_one_larger_batch(run_dir, tmp_path):
    """2 micro-batches of 2 accumulate to the step one batch of 4 takes: the same logged losses and close weights
    (a summed instead of averaged accumulation doubles the loss)."""
    runs = {}
    for accum, batch in ((1, 4), (2, 2)):
        runs[accum] = recover(
            run_dir,
            out=tmp_path / f"ga{accum}",
            max_steps=2,
            progress=False,
            **{**FAST, "batch_size": batch, "grad_accum": accum, "lora_dropout": 0.0},
        )
    one, two = ([e["loss"] for e in runs[k].log] for k in (1, 2))
    assert len(one) == len(two) == 2
    assert one == pytest.approx(two, rel=1e-4)
    for name, w in runs[1].model.state_dict().items():
        assert torch.allclose(w, runs[2].model.state_dict()[name], atol=1e-5), name


def test_full_finetuning(run_dir, tmp_path):
    pruned = load_pretrained(run_dir)
    result = recover(run_dir, out=tmp_path / "full", full=True, max_steps=2, progress=False, **{**FAST, "lr": 1e-3})
    assert shapes(result.model.state_dict()) == shapes(pruned.state_dict())
    torch.testing.assert_close(
        logits_on(load_pretrained(tmp_path / "full"), PROBE), logits_on(result.model, PROBE), atol=1e-4, rtol=1e-4
    )


def test_kd_loss_against_itself_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    assert float(kd_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits.clone(), top_k=5)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 50)
    assert float(kd_loss(logits, other)) > 0
    assert float(kd_loss(logits, other, top_k=5)) > 0


def test_kd_with_teacher_equal_to_student_logs_zero(run_dir, tmp_path):
    teacher = load_pretrained(run_dir)  # the student itself as the teacher
    result = recover(
        run_dir,
        out=tmp_path / "kd",
        teacher=teacher,
        kd_weight=0.5,
        max_steps=1,
        progress=False,
        **{**FAST, "lr": 1e-6},
    )
    # the first step's KD is computed before any update: student == teacher exactly (dropout aside, which LoRA
    # applies only to the adapter branch, whose B matrix starts at zero)
    assert result.log[0]["kd"] == pytest.approx(0.0, abs=1e-6)
    assert result.log[0]["ce"] > 0


def test_kd_top_k_and_self_distillation_with_dense_teacher(run_dir, dense, tmp_path):
    result = recover(
        run_dir,
        out=tmp_path / "sdd",
        teacher=dense,
        kd_weight=0.5,
        kd_top_k=8,
        self_distill=True,
        max_steps=2,
        progress=False,
        **FAST,
    )
    assert result.log[0]["kd"] > 0
    assert result.report["sequences"] == FAST["samples"]


def test_selection_prefers_degraded_clusters():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10, 4) + 10, torch.randn(10, 4) - 10])
    assign = kmeans(x, 2)
    assert len(set(assign[:10].tolist())) == 1 and len(set(assign[10:].tolist())) == 1 and assign[0] != assign[10]
    degradation = torch.cat([torch.full((10,), 2.0), torch.full((10,), 0.1)]) + torch.rand(20) * 0.01
    chosen = allocate_budget(degradation, assign, 6)
    assert len(chosen) == 6 and len(set(chosen)) == 6
    assert sum(i < 10 for i in chosen) >= 5  # the budget goes to the worst-hit cluster
    assert allocate_budget(degradation, assign, 50) and len(allocate_budget(degradation, assign, 50)) == 20


def test_selection_in_recovery(run_dir, dense, tmp_path):
    result = recover(
        run_dir,
        out=tmp_path / "sel",
        teacher=dense,
        select=True,
        pool_factor=2,
        clusters=2,
        max_steps=1,
        progress=False,
        **FAST,
    )
    sel = result.report["selection"]
    assert sel["candidates"] == 16 and sel["selected"] == 8


class Interrupt(Exception):
    pass


def test_resume_after_interruption(run_dir, tmp_path):
    from transformers import TrainerCallback

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Interrupt

    out = tmp_path / "rec"
    with pytest.raises(Interrupt):
        recover(run_dir, out=out, max_steps=3, save_steps=2, progress=False, callbacks=[CrashAfterSave()], **FAST)
    staging = tmp_path / ".rec.recovery"
    assert not out.exists() and (staging / "checkpoint-2").is_dir()
    first = json.loads((staging / "recovery_log.json").read_text())
    assert [e["step"] for e in first] == [1, 2]
    result = recover(run_dir, out=out, max_steps=4, save_steps=2, progress=False, **FAST)
    assert result.report["resumed"] and result.report["steps"] == 4
    steps = [e["step"] for e in result.log]
    assert steps == [1, 2, 3, 4]
    assert [e["loss"] for e in result.log[:2]] == [e["loss"] for e in first]  # the history before the crash is kept
    assert result.log[2]["elapsed"] >= first[-1]["elapsed"]
    assert out.is_dir() and not staging.exists()


def test_time_budget_stops_early(run_dir, tmp_path):
    result = recover(run_dir, out=tmp_path / "rec", progress=False, **{**FAST, "time_budget": 1e-3, "max_steps": 50})
    assert result.report["stopped_by_time_budget"]
    assert result.report["steps"] < 50
    assert (tmp_path / "rec" / "config.json").is_file()


def test_missing_run_dir(tmp_path):
    with pytest.raises(DomainpruneError, match="not found"):
        recover(tmp_path / "nope", out=tmp_path / "rec", **FAST)


def test_teacher_with_other_vocabulary(run_dir, tmp_path):
    other = tiny_model("llama")
    with pytest.raises(DomainpruneError, match="vocabulary"):
        recover(run_dir, out=tmp_path / "rec", teacher=other, kd_weight=0.5, **FAST)


def test_cli_recover(run_dir, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "recover",
        run_dir,
        "--out",
        tmp_path / "rec",
        "--samples",
        4,
        "--seq-len",
        16,
        "--batch-size",
        2,
        "--max-steps",
        2,
        "--time-budget",
        0,
        "-q",
    )
    assert code in (0, None), err
    assert "recovered" in err and (tmp_path / "rec" / "recovery_log.json").is_file()


def test_cli_prune_then_recover_in_place(tokenizer, tmp_path, capsys, monkeypatch):
    import functools

    import domainprune.recover as rec

    # `prune --recover` runs recovery with its defaults; shrink them here so the test takes seconds
    monkeypatch.setattr(
        rec,
        "recover",
        functools.partial(rec.recover, samples=4, seq_len=16, batch_size=2, max_steps=1, time_budget=None),
    )
    folder = save_folder(tiny_lm("llama"), tokenizer, tmp_path / "dense")
    out = tmp_path / "run"
    code, _, err = cli(
        capsys,
        "prune",
        "--model",
        folder,
        "--sparsity",
        0.35,
        "--calib-samples",
        2,
        "--seq-len",
        16,
        "--batch-size",
        2,
        "--out",
        out,
        "--recover",
        "-q",
    )
    assert code in (0, None), err
    assert "recovered" in err
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "recipe.json", "report.json", "recovery.json", "recovery_log.json", "config.json"} <= names
    assert json.loads((out / "recovery.json").read_text())["report"]["steps"] == 1
    load_pretrained(out)


def test_cli_errors_are_one_line(run_dir, tokenizer, tmp_path, capsys):
    code, _, err = cli(capsys, "recover", tmp_path / "missing", "--out", tmp_path / "o", "-q")
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err
    other = tmp_path / "small_vocab"
    tiny_model("llama").save_pretrained(other)
    tokenizer.save_pretrained(other)
    code, _, err = cli(
        capsys, "recover", run_dir, "--out", tmp_path / "o", "--teacher", other, "--kd-weight", 0.5, "-q"
    )
    assert code == 2 and err.strip().startswith("error:") and "vocabulary" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
