"""`prune --offload cpu|disk` (domainprune.streaming) gives the weights the in-memory path gives, bit for bit, for
every method that can run one layer at a time; refuses the others in one line; and holds less in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import ARCHS
from tiny_pipeline import CALIB, save_folder, smol_tokenizer, tiny_lm

from domainprune.errors import DomainpruneError
from domainprune.export import load_pretrained
from domainprune.run import prune


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_output(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape, k
        assert torch.equal(wa[k], wb[k]), k
    for name in ("config.json", "plan.json", "recipe.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved tiny model per architecture (a Hugging Face folder: config, safetensors, tokenizer)."""
    tokenizer = smol_tokenizer()
    root = tmp_path_factory.mktemp("streaming-src")
    return lambda arch: root / arch if (root / arch).is_dir() else save_folder(tiny_lm(arch), tokenizer, root / arch)


def run_both(src: Path, tmp: Path, offload: str = "disk", **recipe) -> tuple[Path, Path]:
    fields = {**CALIB, "device": "cpu", **recipe}
    prune(str(src), out=tmp / "memory", offload="none", progress=False, **fields)
    result = prune(str(src), out=tmp / offload, offload=offload, progress=False, **fields)
    assert result.report["offload"] == offload
    return tmp / "memory", tmp / offload


# every method and allocation that decides per layer or from per-layer statistics, on the one-walk and two-walk paths
RECIPES = {
    "flap-global": dict(method="flap", sparsity=0.35),
    "flap-uniform": dict(method="flap", allocation="uniform", sparsity=0.35),
    "flap-owl": dict(method="flap", allocation="owl", sparsity=0.3),
    "wanda-sp-adapt": dict(method="wanda-sp", allocation="adapt", sparsity=0.3),
    "magnitude-uniform": dict(method="magnitude", sparsity=0.35),
    "magnitude-nirvana-ratio": dict(method="magnitude", allocation="nirvana-ratio", sparsity=0.35),
    "wanda-sp-sequential": dict(method="wanda-sp", sparsity=0.35),
    "wanda-sp-sequential-bias": dict(method="wanda-sp", sparsity=0.35, bias_compensation=True),
    "wanda-sp-global": dict(method="wanda-sp", allocation="global", sparsity=0.35),
    "wanda-sp-obs": dict(method="wanda-sp", reconstruct="obs", sparsity=0.35),
    "obs": dict(method="obs", sparsity=0.35, attention_unit="query_head"),
    "cfsp": dict(method="cfsp", sparsity=0.2),
    "cfsp-obs-default": dict(sparsity=0.2),  # the default recipe: cfsp statistics walk, allocation, OBS refit walk
    "flap-obs-bias": dict(method="flap", reconstruct="obs", sparsity=0.35),
}


@pytest.mark.parametrize("name", RECIPES)
def test_disk_streaming_is_bit_identical(folders, tmp_path, name):
    memory, disk = run_both(folders("llama"), tmp_path, **RECIPES[name])
    assert_same_output(memory, disk)
    assert len(list(disk.glob("model-*.safetensors"))) == 4 + 1  # a shard per layer, then the rest
    with safe_open(str(next(disk.glob("model-00001-*.safetensors"))), "pt") as f:
        assert all(k.startswith("model.layers.0.") for k in f.keys())


@pytest.mark.parametrize("arch", ARCHS)
def test_disk_streaming_every_architecture(folders, tmp_path, arch):
    memory, disk = run_both(folders(arch), tmp_path, method="flap", sparsity=0.35)
    assert_same_output(memory, disk)
    model = load_pretrained(disk)  # what users load; the logits equal those of the in-memory output
    ids = torch.arange(24)[None] * 31 % model.config.vocab_size
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, load_pretrained(memory)(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["flap-global", "wanda-sp-obs", "cfsp-obs-default"])
def test_cpu_offload_is_bit_identical(folders, tmp_path, name):
    memory, cpu = run_both(folders("qwen2"), tmp_path, offload="cpu", **RECIPES[name])
    assert_same_output(memory, cpu)


@pytest.mark.parametrize(
    ("recipe", "why"),
    [
        (dict(method="taylor", sparsity=0.3), "back-propagates"),
        (dict(method="flap", sparsity=0.3, depth="shortgpt", depth_sparsity=0.1), "depth pruning"),
        (dict(method="flap", sparsity=0.3, hidden_sparsity=0.1), "hidden pruning"),
        (dict(method="flap", sparsity=0.3, vocab_coverage=0.99), "vocabulary"),
        (dict(method="flap", allocation="search", sparsity=0.3), "search"),
    ],
)
def test_refuses_what_needs_the_whole_model(folders, tmp_path, recipe, why):
    with pytest.raises(
        DomainpruneError, match=f"--offload disk prunes one layer at a time, and .*{why}.*: use --offload none"
    ) as e:
        prune(str(folders("llama")), out=tmp_path / "out", offload="disk", progress=False, **CALIB, **recipe)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_disk_needs_an_output_and_a_known_mode(folders, tmp_path):
    with pytest.raises(DomainpruneError, match="give --out"):
        prune(str(folders("llama")), offload="disk", progress=False, method="flap", sparsity=0.3, **CALIB)
    with pytest.raises(DomainpruneError, match="--offload must be one of"):
        prune(str(folders("llama")), offload="ssd", progress=False, method="flap", sparsity=0.3, **CALIB)


def test_disk_refuses_a_checkpoint_whose_names_do_not_match(folders, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "renamed"
    shutil.copytree(folders("llama"), src)
    state = load_file(src / "model.safetensors")
    state["model.layers.2.mlp.gate.weight"] = state.pop("model.layers.2.mlp.gate_proj.weight")
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(DomainpruneError, match=r"no tensor model\.layers\.2\.mlp\.gate_proj\.weight .*--offload none"):
        prune(str(src), out=tmp_path / "out", offload="disk", progress=False, method="flap", sparsity=0.3, **CALIB)


PEAK = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from domainprune.run import prune

    def status(key):
        return int(re.search(rf"{key}:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current resident memory
    before = status("VmRSS")
    prune(sys.argv[1], out=sys.argv[2], offload=sys.argv[3], progress=False, device="cpu", dtype="float32",
          method="flap", sparsity=0.35, data="code", calib_samples=2, seq_len=32, batch_size=2)
    print(json.dumps(status("VmHWM") - before))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak resident memory the Linux way")
def test_disk_streaming_holds_less_memory(tmp_path):
    """Relative only: the growth of the peak resident memory while pruning a model whose 32 layers outweigh its
    embedding and LM head, in a fresh process each, streaming from disk against loading it whole. Stored in bfloat16
    and pruned in float32, so that loading it whole must convert (not map) every weight."""
    model = tiny_lm(
        "llama",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ).to(torch.bfloat16)
    src = save_folder(model, smol_tokenizer(), tmp_path / "src")
    layers_bytes = sum(p.numel() * 4 for p in model.model.layers.parameters())  # in float32
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    growth = {}
    for mode in ("none", "disk"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK, str(src), str(tmp_path / mode), mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        growth[mode] = json.loads(out.strip().splitlines()[-1])
    assert_same_output(tmp_path / "none", tmp_path / "disk")
    assert growth["none"] > layers_bytes, (growth, layers_bytes)  # the whole model was resident
    assert growth["disk"] < growth["none"] - layers_bytes / 2, (growth, layers_bytes)  # half the layers never were


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [dict(method="flap"), dict()], ids=["flap", "cfsp-obs-default"])
def test_smollm2_streams_bit_identically(tmp_path, recipe):
    from domainprune.models import resolve_source

    try:
        src = resolve_source("smollm2-135m")
    except DomainpruneError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")
    memory, disk = run_both(
        src, tmp_path, sparsity=0.35, data="code", calib_samples=8, seq_len=64, batch_size=4, dtype="float32", **recipe
    )
    assert_same_output(memory, disk)


def test_tied_lm_head_streams(tmp_path):
    src = save_folder(tiny_lm("qwen2", tie_word_embeddings=True), smol_tokenizer(), tmp_path / "src")
    memory, disk = run_both(src, tmp_path, method="flap", sparsity=0.35)
    assert_same_output(memory, disk)
    assert "lm_head.weight" not in weights(disk)


def test_cli_offload_disk(capsys, folders, tmp_path):
    from domainprune.cli import app

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:
        app(
            [
                "prune",
                "--model",
                str(folders("llama")),
                "--method",
                "flap",
                "--sparsity",
                "0.35",
                "--offload",
                "disk",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--calib-samples",
                "4",
                "--seq-len",
                "32",
                "--batch-size",
                "2",
                "-q",
            ]
        )
    assert e.value.code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["offload"] == "disk" and len(report["stream"]["walks"]) == 2  # statistics, then cuts
    assert report["stream"]["verify_max_logit_diff"] < 1e-4
    memory = prune(
        str(folders("llama")),
        out=tmp_path / "memory",
        offload="none",
        progress=False,
        method="flap",
        sparsity=0.35,
        device="cpu",
        **CALIB,
    )
    assert memory.out is not None
    assert_same_output(tmp_path / "memory", out)


def test_auto_offload_follows_free_memory(folders, monkeypatch):
    from domainprune import streaming
    from domainprune.pipeline import make_recipe

    src = folders("llama")
    recipe = make_recipe(model=str(src), method="flap", sparsity=0.3)
    need = streaming.Checkpoint(src).nbytes(torch.float32)
    cpu = torch.device("cpu")
    assert streaming.choose_offload(src, recipe, cpu, torch.float32) == "none"  # a tiny model fits
    monkeypatch.setattr(streaming, "free_memory", lambda device: need)  # the weights would take all free memory
    assert streaming.choose_offload(src, recipe, cpu, torch.float32) == "disk"
    taylor = make_recipe(model=str(src), method="taylor", sparsity=0.3)
    assert streaming.choose_offload(src, taylor, cpu, torch.float32) == "none"  # cannot stream: loaded whole
    assert streaming.choose_offload("org/name", recipe, cpu, torch.float32) == "none"  # a hub id: size unknown
