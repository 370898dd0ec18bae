"""The command line on a tiny local model folder (real SmolLM2 tokenizer, real `code` corpus): prune end to end,
plan -> hand edit -> apply, and every user error as exit code 2 with one `error:` line and nothing left behind.

Commands run in-process through `domainprune.cli.main` (what the `domainprune` console script calls), so a run
costs no interpreter start; one test runs the installed script itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model
from tiny_pipeline import (
    CALIB,
    FULL_VOCAB,
    VOCAB,
    assert_same_state,
    cli,
    logits_on,
    save_folder,
    smol_tokenizer,
    tiny_lm,
)
from transformers import AutoModelForCausalLM

from domainprune import cache, load_pretrained
from domainprune.data import load_corpus
from domainprune.evaluate import parameter_count
from domainprune.models import load_model
from domainprune.pipeline import calibration_sequences, make_recipe
from domainprune.plan import Plan
from domainprune.run import prune

HD = 8
SMALL = ["--calib-samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]
CHECKPOINT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "plan.json",
    "recipe.json",
    "report.json",
}


@pytest.fixture(scope="module")
def tokenizer():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama saved as an ordinary Hugging Face folder with the SmolLM2 tokenizer."""
    return save_folder(tiny_lm(), tokenizer, tmp_path_factory.mktemp("tiny") / "model")


def ok(capsys, *args) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    return err


def fails(capsys, *args, match: str) -> str:
    """The command exits with 2 and prints exactly one line, `error: <message>`; returns the message."""
    code, out, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    message = lines[0].removeprefix("error: ")
    assert match in message, message
    return message


def leftovers(parent: Path, name: str) -> list[str]:
    """`name` itself and any partial/old folder an interrupted write could leave beside it."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# --- 8. prune end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_prune_writes_a_checkpoint_equal_to_the_python_api(capsys, folder, tokenizer, tmp_path, method):
    out = tmp_path / "pruned"
    err = ok(capsys, "prune", "--model", folder, "--method", method, "--sparsity", "0.35", "--out", out, *SMALL)
    flat = err.replace("\n", "")  # rich wraps long lines at 80 columns when stderr is not a terminal
    assert "pruned layers" in flat and f"/{out.name}')" in flat
    assert CHECKPOINT_FILES <= {p.name for p in out.iterdir()}
    assert leftovers(tmp_path, "pruned") == ["pruned"]
    report = json.loads((out / "report.json").read_text())
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == str(folder) and recipe["method"] == method and recipe["sparsity"] == 0.35
    assert recipe["allocation"] == ("global" if method == "flap" else "uniform")
    assert recipe["bias_compensation"] == (method == "flap")

    expected = prune(str(folder), method=method, sparsity=0.35, progress=False, **CALIB)  # same recipe, in memory
    config = json.loads((out / "config.json").read_text())
    assert report["stock_loadable"] == report["uniform"]  # a Llama: compensation biases are stock config flags
    if report["uniform"]:
        assert method == "wanda-sp" and "per_layer_config" not in config and "domainprune" not in config
        assert "AutoModelForCausalLM.from_pretrained(" in flat
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers
        assert config["intermediate_size"] == expected.plan.layers[0].shape().intermediate_size
    else:
        assert method == "flap" and config["per_layer_config"] and config["attention_bias"] and config["mlp_bias"]
        assert "domainprune.load_pretrained(" in flat
        reloaded = load_pretrained(out)
    ids = calibration_sequences(make_recipe(method=method, sparsity=0.35, **CALIB), tokenizer)
    torch.testing.assert_close(logits_on(reloaded, ids), logits_on(expected.model, ids), rtol=1e-5, atol=1e-5)
    assert Plan.load(out / "plan.json").layers == expected.plan.layers
    assert report["total_params"] == [parameter_count(tiny_lm()), parameter_count(reloaded)]
    assert report["sparsity_achieved"] == pytest.approx(expected.report["sparsity_achieved"])
    assert 0.3 < report["sparsity_achieved"] < 0.4 and report["uniform"] == expected.report["uniform"]
    # the folder is a complete model: domainprune loads it with its tokenizer
    again = load_model(out, device="cpu")
    assert again.tokenizer("def f(x):\n    return x")["input_ids"] == tokenizer("def f(x):\n    return x")["input_ids"]
    torch.testing.assert_close(logits_on(again.model, ids), logits_on(reloaded, ids))

    if method == "flap":  # plan + apply (statistics recomputed from the cache) is the same as prune
        plan_file, applied = tmp_path / "plan.json", tmp_path / "applied"
        ok(capsys, "plan", "--model", folder, "--method", "flap", "--sparsity", "0.35", "--out", plan_file, *SMALL)
        assert Plan.load(plan_file).layers == expected.plan.layers
        ok(capsys, "apply", plan_file, "--out", applied, "--quiet")
        assert_same_state(load_file(applied / "model.safetensors"), load_file(out / "model.safetensors"))


def test_prune_with_vocabulary_trimming(capsys, tmp_path):
    """`prune --vocab-coverage` = prune, then `domainprune vocab` on the result: one checkpoint with both (SmolLM2's
    whole vocabulary, which the domain's tokens cover a small part of)."""
    from transformers import AutoTokenizer

    folder = save_folder(tiny_lm(vocab_size=FULL_VOCAB), smol_tokenizer(full=True), tmp_path / "model")
    out = tmp_path / "pruned-vocab"
    err = ok(
        capsys,
        "prune",
        "--model",
        folder,
        "--method",
        "wanda-sp",
        "--sparsity",
        "0.35",
        "--vocab-coverage",
        "0.99",
        "--out",
        out,
        *SMALL,
    )
    assert "vocabulary 49,152 →" in err.replace("\n", "")
    assert {"vocab_report.json", "vocab_map.json"} <= {p.name for p in out.iterdir()}
    report, vocab = json.loads((out / "report.json").read_text()), json.loads((out / "vocab_report.json").read_text())
    kept = json.loads((out / "vocab_map.json").read_text())["kept_old_ids"]
    assert report["vocab"]["kept_vocab"] == vocab["kept_vocab"] == len(kept) < FULL_VOCAB // 2
    assert (
        vocab["calibration_coverage"] >= 0.99
        and json.loads((out / "recipe.json").read_text())["vocab_coverage"] == 0.99
    )
    assert report["total_params"][1] == parameter_count(load_pretrained(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # uniform wanda-sp: a stock checkpoint
    assert reloaded.config.vocab_size == len(kept) and len(AutoTokenizer.from_pretrained(out)) == len(kept)
    # the trimmed model's logits over kept tokens are the pruned (untrimmed) model's restricted to them
    pruned = prune(str(folder), method="wanda-sp", sparsity=0.35, progress=False, **CALIB).model
    new_ids = torch.arange(3, len(kept), 41)[None, :24]
    want = logits_on(pruned, torch.tensor(kept)[new_ids])[..., kept]
    torch.testing.assert_close(logits_on(reloaded, new_ids), want, rtol=1e-5, atol=1e-5)
    fails(
        capsys,
        "prune",
        "--model",
        folder,
        "--sparsity",
        "0.35",
        "--vocab-coverage",
        "0.99",
        "--vocab-size",
        "900",
        "--out",
        tmp_path / "x",
        *SMALL,
        match="at most one of --vocab-coverage and --vocab-size",
    )
    fails(
        capsys,
        "prune",
        "--model",
        folder,
        "--sparsity",
        "0.35",
        "--vocab-coverage",
        "1.5",
        "--out",
        tmp_path / "x",
        *SMALL,
        match="vocab_coverage",
    )


def test_uniform_widths_with_extra_biases_need_the_domainprune_loader(capsys, tokenizer, tmp_path):
    """Mistral's config cannot express o_proj/down_proj biases: a uniform compensated model is not stock-loadable,
    and the CLI must not tell the user to load it with stock transformers (which would drop the biases)."""
    # (Mistral rather than Qwen2: transformers swaps a tokenizer saved in a qwen2 folder for Qwen2Tokenizer.)
    folder = save_folder(tiny_lm("mistral"), tokenizer, tmp_path / "mistral")
    out = tmp_path / "pruned"
    args = ["--method", "wanda-sp", "--bias-compensation", "--sparsity", "0.35"]
    err = ok(capsys, "prune", "--model", folder, *args, "--out", out, *SMALL)
    report = json.loads((out / "report.json").read_text())
    assert report["uniform"] and not report["stock_loadable"]
    assert json.loads((out / "config.json").read_text())["domainprune"]["extra_biases"] == [
        "self_attn.o_proj",
        "mlp.down_proj",
    ]
    flat = err.replace("\n", "")
    assert "domainprune.load_pretrained(" in flat and "AutoModelForCausalLM" not in flat
    expected = prune(str(folder), method="wanda-sp", bias_compensation=True, sparsity=0.35, progress=False, **CALIB)
    ids = calibration_sequences(make_recipe(sparsity=0.35, **CALIB), tokenizer)
    torch.testing.assert_close(
        logits_on(load_pretrained(out), ids), logits_on(expected.model, ids), rtol=1e-5, atol=1e-5
    )
    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # drops the compensation biases
    assert not torch.allclose(logits_on(stock, ids), logits_on(expected.model, ids), atol=1e-3)


# --- 2. plan -> hand edit -> apply -------------------------------------------------------------------------


def _rows(heads):
    return [r for h in heads for r in range(h * HD, (h + 1) * HD)]


def test_hand_edited_plan_is_applied_exactly(capsys, folder, tmp_path):
    plan_file = tmp_path / "plan.json"
    ok(capsys, "plan", "--model", folder, "--method", "magnitude", "--sparsity", "0.3", "--out", plan_file, "--quiet")
    data = json.loads(plan_file.read_text())
    assert data["recipe"]["method"] == "magnitude" and len(data["layers"]) == 4
    layers = data["layers"]
    layers[0].update(kv_heads=[1], query_heads=[3, 4, 5], mlp_channels="0-39")  # KV group 0 gone
    layers[1].update(kv_heads=[0, 1], query_heads=list(range(6)), mlp_channels="3,5-9,17,30-38")  # any channels
    layers[2]["drop"] = True  # the whole layer
    layers[3].update(kv_heads=[0, 1], query_heads=[0, 2, 4, 5], mlp_channels=[39, 1, 2])  # 2 heads per group
    plan_file.write_text(json.dumps(data))
    out = tmp_path / "edited"
    ok(capsys, "apply", plan_file, "--out", out, "--quiet")
    assert {"config.json", "model.safetensors", "tokenizer.json", "plan.json", "recipe.json"} <= {
        p.name for p in out.iterdir()
    }

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    weights = load_file(out / "model.safetensors")
    orig = load_file(folder / "model.safetensors")
    channels1 = [3, 5, 6, 7, 8, 9, 17, *range(30, 39)]
    # new layer index -> (original layer, query heads, kv heads, channels)
    expected = {
        0: (0, [3, 4, 5], [1], list(range(40))),
        1: (1, list(range(6)), [0, 1], channels1),
        2: (3, [0, 2, 4, 5], [0, 1], [1, 2, 39]),
    }
    for new, (old, heads, kv, ch) in expected.items():
        w = lambda name: weights[f"model.layers.{new}.{name}"]  # noqa: E731
        o = lambda name: orig[f"model.layers.{old}.{name}"]  # noqa: E731
        assert w("self_attn.q_proj.weight").shape == (len(heads) * HD, 48)
        assert w("mlp.down_proj.weight").shape == (48, len(ch))
        assert torch.equal(w("self_attn.q_proj.weight"), o("self_attn.q_proj.weight")[_rows(heads)])
        for proj in ("k_proj", "v_proj"):
            assert torch.equal(w(f"self_attn.{proj}.weight"), o(f"self_attn.{proj}.weight")[_rows(kv)])
        assert torch.equal(w("self_attn.o_proj.weight"), o("self_attn.o_proj.weight")[:, _rows(heads)])
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(w(f"mlp.{proj}.weight"), o(f"mlp.{proj}.weight")[ch])
        assert torch.equal(w("mlp.down_proj.weight"), o("mlp.down_proj.weight")[:, ch])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(w(f"{norm}.weight"), o(f"{norm}.weight"))
    assert not any(k.startswith("model.layers.3.") for k in weights) and not any(k.endswith("bias") for k in weights)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(weights[name], orig[name])
    assert config["per_layer_config"] == {
        "0": {"num_attention_heads": 3, "num_key_value_heads": 1},
        "1": {"intermediate_size": 16},
        "2": {"num_attention_heads": 4, "intermediate_size": 3},
    }
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (6, 2, 40)
    saved = Plan.load(out / "plan.json")
    assert [lp.drop for lp in saved.layers] == [False, False, True, False] and saved.layers[1].mlp_channels == channels1
    # the checkpoint runs with the shapes of the edit
    model = load_pretrained(out)
    assert logits_on(model, torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)
    assert parameter_count(model) == sum(t.numel() for t in weights.values())


def test_plans_that_do_not_fit_fail_in_one_line(capsys, folder, tokenizer, tmp_path):
    plan_file = tmp_path / "plan.json"
    ok(capsys, "plan", "--model", folder, "--method", "magnitude", "--sparsity", "0.3", "--out", plan_file, "--quiet")
    other = save_folder(tiny_model("llama", intermediate_size=32, vocab_size=VOCAB), tokenizer, tmp_path / "other")
    out = tmp_path / "out"
    fails(
        capsys, "apply", plan_file, "--model", other, "--out", out, "-q", match="plan does not match this model's shape"
    )
    data = json.loads(plan_file.read_text())
    data["layers"][1].update(kv_heads=[0, 1], query_heads=[0, 1, 3])  # 2 heads in group 0, 1 in group 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    fails(capsys, "apply", bad, "--out", out, "-q", match="plan layer 1: every kept KV head needs the same number")
    data["layers"][1].update(query_heads=list(range(6)), mlp_channels="0-40")
    bad.write_text(json.dumps(data))
    fails(capsys, "apply", bad, "--out", out, "-q", match="plan layer 1: mlp_channels has an index outside 0..39")
    bad.write_text("{not json")
    fails(capsys, "apply", bad, "--out", out, "-q", match=f"plan file {bad} is not a valid plan")
    fails(capsys, "apply", tmp_path / "nope.json", "--out", out, "-q", match="does not exist")
    data = json.loads(plan_file.read_text())
    data["recipe"]["sparsity"] = 2  # a hand-edited recipe is checked like the command line's
    bad.write_text(json.dumps(data))
    fails(capsys, "apply", bad, "--out", out, "-q", match="--sparsity must be in [0, 1), got 2")
    # a FLAP plan (bias compensation needs statistics) on the wrong model fails before any statistics pass
    flap_plan = tmp_path / "flap.json"
    ok(capsys, "plan", "--model", folder, "--method", "flap", "--sparsity", "0.3", "--out", flap_plan, *SMALL)
    assert Plan.load(flap_plan).recipe["bias_compensation"] is True
    stats_dir = cache.cache_dir() / "stats"
    entries = set(stats_dir.iterdir())
    fails(
        capsys, "apply", flap_plan, "--model", other, "--out", out, "-q", match="plan does not match this model's shape"
    )
    assert set(stats_dir.iterdir()) == entries
    assert leftovers(tmp_path, "out") == []


# --- 7. errors ---------------------------------------------------------------------------------------------


def test_bad_model_folders(capsys, folder, tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    fails(
        capsys,
        "prune",
        "--model",
        missing,
        "--sparsity",
        "0.3",
        "--out",
        out,
        *SMALL,
        match=f"model '{missing}' not found",
    )
    gpt2 = save_folder(
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)), tokenizer, tmp_path / "gpt2"
    )
    msg = fails(
        capsys,
        "prune",
        "--model",
        gpt2,
        "--sparsity",
        "0.3",
        "--out",
        out,
        *SMALL,
        match="architecture 'gpt2' is not supported",
    )
    assert "llama" in msg and "qwen2" in msg
    fails(
        capsys,
        "plan",
        "--model",
        gpt2,
        "--sparsity",
        "0.3",
        "--out",
        tmp_path / "p.json",
        *SMALL,
        match="'gpt2' is not supported",
    )
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    fails(capsys, "prune", "--model", no_config, "--sparsity", "0.3", "--out", out, *SMALL, match="without config.json")
    assert leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "p.json") == []


def test_bad_corpora(capsys, folder, tokenizer, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    fails(
        capsys,
        "prune",
        "--model",
        folder,
        "--data",
        empty,
        "--sparsity",
        "0.3",
        "--out",
        out,
        *SMALL,
        match=f"no supported files in {empty}",
    )
    small = tmp_path / "small-corpus"
    small.mkdir()
    for i in range(12):
        (small / f"doc{i}.txt").write_text(f"Document {i}: a few words about rivers and stones.\n")
    found = len(load_corpus(str(small)).token_stream(tokenizer, "calibration"))
    assert 0 < found < 64 * 32
    msg = fails(
        capsys,
        "prune",
        "--model",
        folder,
        "--data",
        small,
        "--sparsity",
        "0.3",
        "--calib-samples",
        "64",
        "--seq-len",
        "32",
        "--out",
        out,
        "-q",
        match="give more text or lower --calib-samples",
    )
    assert f"has {found:,} tokens" in msg and f"64 sequences need {64 * 32:,} tokens" in msg
    assert leftovers(tmp_path, "out") == []


def test_bad_budgets(capsys, folder, tmp_path):
    out = tmp_path / "out"
    fails(capsys, "prune", "--sparsity", "1.0", "--out", out, match="--sparsity must be in [0, 1), got 1.0")
    fails(capsys, "prune", "--sparsity", "-0.1", "--out", out, match="--sparsity must be in [0, 1), got -0.1")
    fails(capsys, "plan", "--sparsity", "1.5", "--out", out, match="--sparsity must be in [0, 1)")
    fails(capsys, "prune", "--out", out, match="give exactly one of sparsity, target_params and target_speedup")
    fails(capsys, "prune", "--target-params", "lots", "--out", out, match="'lots' is not a positive count")
    fails(
        capsys,
        "prune",
        "--model",
        folder,
        "--target-params",
        "10",
        "--out",
        out,
        *SMALL,
        match="--target-params 10 is out of reach",
    )
    fails(
        capsys,
        "prune",
        "--sparsity",
        "0.3",
        "--attention-unit",
        "head",
        "--out",
        out,
        match="--attention-unit must be one of kv_group, query_head",
    )
    fails(capsys, "prune", "--sparsity", "0.3", "--method", "nope", "--out", out, match="unknown method 'nope'")
    fails(capsys, "prune", "--sparsity", "0.3", "--encoder-units", "heads", "--out", out, match="one of all, ffn")
    fails(
        capsys,
        "prune",
        "--model",
        folder,
        "--sparsity",
        "0.3",
        "--encoder-units",
        "ffn",
        "--out",
        out,
        *SMALL,
        match="--encoder-units applies to sentence encoders only",
    )
    assert leftovers(tmp_path, "out") == []


def test_existing_output_needs_force(capsys, folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["prune", "--model", folder, "--method", "magnitude", "--sparsity", "0.3", "--out", out, *SMALL]
    fails(capsys, *args, match=f"--out {out} exists; choose another --out or pass --force")
    assert (out / "keep.txt").read_text() == "precious"
    ok(capsys, *args, "--force")
    assert "keep.txt" not in {p.name for p in out.iterdir()} and CHECKPOINT_FILES <= {p.name for p in out.iterdir()}
    assert leftovers(tmp_path, "out") == ["out"]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("{}")
    fails(
        capsys, "plan", "--model", folder, "--sparsity", "0.3", "--out", plan_file, *SMALL, match=f"{plan_file} exists"
    )
    assert plan_file.read_text() == "{}"
    ok(
        capsys,
        "plan",
        "--model",
        folder,
        "--method",
        "magnitude",
        "--sparsity",
        "0.3",
        "--out",
        plan_file,
        "--force",
        *SMALL,
    )
    assert Plan.load(plan_file).recipe["method"] == "magnitude"
    fails(capsys, "apply", plan_file, "--out", out, "-q", match=f"--out {out} exists")
    assert CHECKPOINT_FILES <= {p.name for p in out.iterdir()}


def test_console_script_prints_one_error_line(tmp_path):
    """The installed `domainprune` script: exit status 2 and one line even when the message is long and stderr is
    not a terminal (rich would otherwise wrap it at 80 columns), brackets in paths included."""
    missing = tmp_path / "a-rather-long-folder-name-for-a-model-[v2]" / "that-does-not-exist-anywhere"
    exe = Path(sys.executable).parent / "domainprune"  # the venv's console script
    command = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from domainprune.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    run = subprocess.run(
        [*command, "prune", "--model", str(missing), "--sparsity", "0.3", "--out", str(tmp_path / "out"), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: model '{missing}' not found: give an existing folder, a .gguf file, a hub id, or a preset "
        "(smollm2-135m, qwen2.5-coder-0.5b)"
    ]
    assert run.stdout == "" and not (tmp_path / "out").exists()


def test_help_shows_every_option_text_whole(capsys, monkeypatch):
    """Rich renders help with markup: an unescaped `[default: …]` in a help string is eaten as a tag. Every
    option's help must reach the screen as written."""
    import typer.main

    from domainprune.cli import app

    monkeypatch.setenv("COLUMNS", "1000")
    group = typer.main.get_command(app)
    assert len(group.commands) >= 8
    for name, command in group.commands.items():
        code, out, _ = cli(capsys, name, "--help")
        assert code == 0
        shown = " ".join(out.split())
        for param in command.params:
            if param.help:
                assert " ".join(param.help.split()) in shown, (name, param.name)
