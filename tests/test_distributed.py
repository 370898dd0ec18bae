"""Distributed recovery: `domainprune recover` run unchanged by `accelerate launch` with 2 data-parallel CPU processes
(gloo) gives the weights one process gives with the same global batch (docs/recovery.md, "Several processes").
`--use_fsdp` on CPUs trains data-parallel too (accelerate 1.15 shards with FSDP on GPUs only), with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipeline import loaded, smol_tokenizer, tiny_lm

from domainprune.recover import recover
from domainprune.run import prune

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests" / "golden" / "code.jsonl")  # small and fixed: each process tokenises it quickly
# LoRA dropout off: each process would draw its own dropout masks
TRAIN = dict(data=CORPUS, samples=8, seq_len=16, max_steps=3, time_budget=None, lr=5e-3, lora_dropout=0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "pruned"
    prune(
        loaded(tiny_lm("llama"), smol_tokenizer()),
        out=out,
        method="flap",
        sparsity=0.35,
        data=CORPUS,
        calib_samples=2,
        seq_len=16,
        batch_size=2,
        progress=False,
    )
    return out


# the FSDP2 launch a GPU user would give (docs/recovery.md)
FSDP = [
    "--use_fsdp",
    "--fsdp_version=2",
    "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer",
    "--fsdp_state_dict_type=FULL_STATE_DICT",
]


def launch(run_dir: Path, out: Path, processes: int, batch_size: int, mode: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of the console command on CPU processes (accelerate's `--cpu` starts one process only;
    its multi-GPU launcher falls back to gloo on CPUs when no GPU is visible)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this checkout's domainprune
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items() if v is not None]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *mode,
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "-m",
        "domainprune.cli",
        "recover",
        str(run_dir),
        "--out",
        str(out),
        f"--batch-size={batch_size}",
        "--time-budget=0",
        "--quiet",
    ]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("mode", [["--multi_gpu"], FSDP], ids=["ddp", "fsdp-flags"])
def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(run_dir, tmp_path, mode):
    done = launch(run_dir, tmp_path / "ddp", processes=2, batch_size=2, mode=mode)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "recovery.json").read_text())["report"]
    assert report["processes"] == 2 and report["steps"] == 3
    assert report["distributed"] == "MULTI_CPU"  # data-parallel over gloo, FSDP asked for or not
    warned = "accelerate shards with FSDP on GPUs only" in " ".join(done.stderr.split())
    assert warned == (mode == FSDP)
    assert not (tmp_path / ".ddp.recovery").exists()  # the first process cleaned up after the others finished

    single = recover(run_dir, out=tmp_path / "one", batch_size=4, progress=False, **TRAIN)
    assert single.report["processes"] == 1 and single.report["distributed"] == "NO"
    pruned, two, one = (load_file(p / "model.safetensors") for p in (run_dir, tmp_path / "ddp", tmp_path / "one"))
    assert two.keys() == one.keys()
    moved = max(float((one[k] - pruned[k]).abs().max()) for k in one)
    assert moved > 1e-4, "training changed nothing"
    for k in one:  # the same 4 sequences per step, gradients averaged over 2 × 2 instead of 4: float rounding only
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    log = json.loads((tmp_path / "ddp" / "recovery_log.json").read_text())  # losses averaged over both processes
    assert [e["loss"] for e in log] == pytest.approx([e["loss"] for e in single.log], rel=1e-5)
