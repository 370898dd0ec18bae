"""Behaviour-preservation record: a fixed set of recipes on a tiny model of every architecture, compared with the
weights recorded in tests/golden/weights.json.

Every width method × uniform/global allocation, OBS reconstruction, depth (alone and beside a width method), hidden
and vocabulary pruning on the dense architectures of tests/tiny_models.py, and every expert method plus channel
pruning on the mixture-of-experts ones, each `domainprune.run.prune`d from the same tiny random model with
calibration from tests/golden/ (fixed text, so the record does not move with the interpreter's standard library)
and written with `out=`. A recipe that is refused records its one-line error instead.

Per recipe the record holds
- the sha256 of the saved safetensors files, asserted only when the machine fingerprint (CPU, torch, transformers)
  recorded at the top of the file is this machine's: float kernels round differently on other CPUs;
- a robust fingerprint, asserted everywhere: a hash of the plan's kept unit indices and one of every saved tensor's
  name and shape (exact), and per decoder layer (and for the rest: embedding, final norm, LM head) the float64 sum
  and sum of absolute values of its tensors (within RTOL of the recorded abs-sum). Per layer rather than per tensor
  keeps the record small (about 50 kB for 155 recipes); a plan decided by a near-tie may still flip on another CPU.

Regenerate the record (after a change that is meant to change weights, or on the machine the checks should be
bit-exact on) with the whole file, and commit tests/golden/weights.json:

    DOMAINPRUNE_GOLDEN=record python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_moe import tiny_moe
from tiny_models import ARCHS
from tiny_pipeline import VOCAB, loaded, smol_tokenizer, tiny_lm

from domainprune.errors import DomainpruneError
from domainprune.run import prune

HERE = Path(__file__).with_name("golden")
RECORD = HERE / "weights.json"
RECORDING = os.environ.get("DOMAINPRUNE_GOLDEN") == "record"
RTOL = 1e-6  # float64 sums of the same float32 weights rounded differently: far below any real change
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
CALIB = dict(
    data=str(HERE / "code.jsonl"), general_data=str(HERE / "general.jsonl"), calib_samples=4, seq_len=16, batch_size=2
)
WIDTH_METHODS = ["magnitude", "wanda-sp", "flap", "cfsp", "taylor", "fisher", "nirvana", "dpruner", "gaprune"]


def dense_recipes() -> dict[str, dict]:
    recipes = {
        f"{m}-{a}": dict(method=m, allocation=a, sparsity=0.3) for m in WIDTH_METHODS for a in ("uniform", "global")
    }
    recipes |= {
        "obs": dict(method="obs", sparsity=0.3),  # greedy OBS: uniform only
        "default": dict(sparsity=0.3),  # cfsp + OBS
        "flap-obs": dict(method="flap", allocation="uniform", reconstruct="obs", sparsity=0.3),
        "wanda-sp-obs": dict(method="wanda-sp", allocation="uniform", reconstruct="obs", sparsity=0.3),
        "shortgpt": dict(method="shortgpt", sparsity=0.25),
        "finercut": dict(method="finercut", sparsity=0.25),
        "flap-depth": dict(method="flap", depth="shortgpt", depth_sparsity=0.2, sparsity=0.4),
        "flap-hidden": dict(method="flap", hidden_sparsity=0.2, sparsity=0.4),
        "flap-vocab": dict(method="flap", sparsity=0.3, vocab_size=300),
    }
    return recipes


def moe_recipes() -> dict[str, dict]:
    return {
        "easy-ep": dict(method="easy-ep", experts_keep=4),
        "expert-frequency": dict(method="expert-frequency", experts_keep=0.5),
        "tcess": dict(method="tcess", experts_keep=3),
        "flap-global": dict(method="flap", allocation="global", sparsity=0.3),
        "wanda-sp-uniform": dict(method="wanda-sp", allocation="uniform", sparsity=0.3),
    }


def machine() -> dict[str, str]:
    """What decides float rounding: the CPU and its kernels' dispatch, and the libraries doing the arithmetic."""
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def group(name: str) -> str:
    """The decoder layer a tensor belongs to ("3"), or "rest" (embedding, final norm, LM head)."""
    parts = name.split(".")
    return parts[2] if parts[:2] == ["model", "layers"] else "rest"


def fingerprint(out: Path) -> dict:
    digest, shapes = hashlib.sha256(), hashlib.sha256()
    sums: dict[str, list[float]] = {}
    for f in sorted(out.glob("*.safetensors")):
        digest.update(f.read_bytes())
        for name, t in sorted(load_file(f).items()):
            shapes.update(f"{name}:{list(t.shape)};".encode())
            s = sums.setdefault(group(name), [0.0, 0.0])
            s[0] += float(t.double().sum())
            s[1] += float(t.double().abs().sum())
    plan = json.loads((out / "plan.json").read_text())
    units = json.dumps({"hidden": plan.get("hidden_channels"), "layers": plan["layers"]}, sort_keys=True)
    return {
        "sha256": digest.hexdigest(),
        "plan": hashlib.sha256(units.encode()).hexdigest()[:16],
        "params": plan["params"]["attention_mlp_after"],
        "shapes": shapes.hexdigest()[:16],
        "sums": {g: [float(f"{v:.10g}") for v in s] for g, s in sums.items()},
    }


def dump(record: dict) -> str:
    """One line per recipe, so that a changed recipe is one line of a diff."""
    lines = [
        f" {json.dumps(k)}: {json.dumps(v, sort_keys=True, separators=(',', ':'))}"
        for k, v in record["recipes"].items()
    ]
    head = f'{{\n "machine": {json.dumps(record["machine"], sort_keys=True)},\n "recipes": {{\n'
    return head + ",\n".join(lines) + "\n }\n}\n"


def run(model: torch.nn.Module, recipe: dict, out: Path) -> dict:
    torch.manual_seed(0)
    try:
        prune(loaded(model, smol_tokenizer()), out=out, verify=False, progress=False, **CALIB, **recipe)
    except DomainpruneError as e:
        return {"error": str(e)}
    return fingerprint(out)


def differences(name: str, got: dict, want: dict | None, exact: bool) -> list[str]:
    if want is None:
        return [f"{name}: not in the record (regenerate it: see this file's docstring)"]
    if "error" in got or "error" in want:
        same = got.get("error") == want.get("error")
        return [] if same else [f"{name}: {want.get('error')!r} -> {got.get('error')!r}"]
    found = []
    if got["plan"] != want["plan"] or got["params"] != want["params"]:
        found.append(f"{name}: plan changed (kept attention+MLP parameters {want['params']} -> {got['params']})")
    if got["shapes"] != want["shapes"]:
        found.append(f"{name}: tensor names or shapes changed")
    if got["sums"].keys() != want["sums"].keys():
        found.append(f"{name}: layers {sorted(got['sums'].keys() ^ want['sums'].keys())} added or removed")
    for g in sorted(got["sums"].keys() & want["sums"].keys()):
        (s, a), (s0, a0) = got["sums"][g], want["sums"][g]
        if abs(s - s0) > RTOL * a0 or abs(a - a0) > RTOL * a0:
            found.append(f"{name}: layer {g} sum {s0:.10g} -> {s:.10g}, abs-sum {a0:.10g} -> {a:.10g}")
    if exact and not found and got["sha256"] != want["sha256"]:
        found.append(f"{name}: weights within tolerance but not bit-identical (sha256, on the recording machine)")
    return found


def check(group: str, build, recipes: dict[str, dict], tmp_path: Path) -> None:
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {"machine": machine(), "recipes": {}}
    got = {f"{group}/{name}": run(build(), recipe, tmp_path / name) for name, recipe in recipes.items()}
    if RECORDING:
        if record["machine"] != machine():
            record = {"machine": machine(), "recipes": {}}
        record["recipes"] = dict(sorted({**record["recipes"], **got}.items()))
        RECORD.write_text(dump(record))
        return
    exact = record["machine"] == machine()
    found = [d for name, fp in got.items() for d in differences(name, fp, record["recipes"].get(name), exact)]
    assert not found, f"{len(found)} differences from {RECORD.name}:\n" + "\n".join(found[:30])
    # the record itself must hold weights, not only refusals: a recipe that started failing would show above
    assert sum("error" not in fp for fp in got.values()) >= len(got) // 2


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_architecture_weights_unchanged(arch, tmp_path):
    check(arch, lambda: tiny_lm(arch), dense_recipes(), tmp_path)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_architecture_weights_unchanged(arch, tmp_path):
    model = tiny_moe(arch, vocab_size=VOCAB)
    check(arch, lambda: copy.deepcopy(model), moe_recipes(), tmp_path)
