"""A streamed run (`prune --offload disk`) killed with a real `kill -9` after a layer resumes at the next one: the rerun
gives the uninterrupted run's weights bit for bit and does not redo the finished layers (its report counts the layers
each walk computed and where it resumed); damaged progress is rebuilt, not trusted (docs/streaming.md, "Resuming")."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cli_runs import run, weights_digest
from tiny_pipeline import save_folder, smol_tokenizer, tiny_lm

from domainprune import cache

SMALL = ["--data", "code", "--calib-samples", "4", "--seq-len", "32", "--batch-size", "2", "--offload", "disk"]
LAYERS = 4  # tiny_lm's


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_folder(tiny_lm("llama"), smol_tokenizer(), tmp_path_factory.mktemp("resume") / "model")


def walks(out: Path) -> dict[str, tuple[int, int]]:
    """Per walk of the run: (the layer it resumed at, the layers it computed)."""
    report = json.loads((out / "report.json").read_text())
    return {w["name"]: (w["resumed_at"], w["layers"]) for w in report["stream"]["walks"]}


# recipe, kill point, and then the rerun's walks: two walks (statistics, then the cut), one walk (a sequential
# criterion cuts as it scores), and two walks whose cut refits with OBS (the activations carried between layers)
SCENARIOS = {
    "flap-statistics": (
        ["--method", "flap", "--sparsity", "0.35"],
        "stream:statistics:1",
        {"statistics": (2, 2), "cut": (0, 4)},
    ),
    "flap-cut": (["--method", "flap", "--sparsity", "0.35"], "stream:cut:1", {"statistics": (4, 0), "cut": (2, 2)}),
    "wanda-sp-sequential": (["--method", "wanda-sp", "--sparsity", "0.35"], "stream:cut:2", {"cut": (3, 1)}),
    "cfsp-obs": (["--sparsity", "0.2"], "stream:cut:0", {"statistics": (4, 0), "cut": (1, 3)}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_kill_9_then_rerun_resumes_and_gives_the_same_weights(model, tmp_path, name):
    extra, point, resumed = SCENARIOS[name]
    args = ["prune", "--model", model, *SMALL, *extra]
    reference = run([*args, "--out", "ref", "--quiet"], tmp_path / "cache-ref", tmp_path)
    assert reference.returncode == 0, reference.stderr
    assert all(start == 0 and layers == LAYERS for start, layers in walks(tmp_path / "ref").values())

    killed = run([*args, "--out", "out", "--quiet"], tmp_path / "cache", tmp_path, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out").exists()
    rerun = run([*args, "--out", "out"], tmp_path / "cache", tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")
    assert walks(tmp_path / "out") == resumed  # the finished layers were not computed again
    last = max(resumed.values())[0]
    assert f"resuming at layer {last}/{LAYERS}" in " ".join(rerun.stderr.split())
    assert not list((tmp_path / "cache" / "stream").iterdir())  # the progress is removed once the output is in place
    assert not [p.name for p in tmp_path.iterdir() if cache.PARTIAL in p.name]


@pytest.mark.parametrize("damage", ["resume", "shard"])
def test_damaged_progress_is_rebuilt_not_trusted(model, tmp_path, damage):
    args = ["prune", "--model", model, *SMALL, "--method", "flap", "--sparsity", "0.35", "--quiet"]
    reference = run([*args, "--out", "ref"], tmp_path / "cache-ref", tmp_path)
    assert reference.returncode == 0, reference.stderr
    killed = run([*args, "--out", "out"], tmp_path / "cache", tmp_path, kill_at="stream:cut:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (entry,) = (tmp_path / "cache" / "stream").iterdir()
    if damage == "resume":  # the resume point of the cut, cut short
        target = entry / "cut" / "resume.safetensors"
    else:  # the shard of a finished layer, cut short: the resume point names it, but it cannot be read
        target = next((entry / "shards").glob("model-00002-*.safetensors"))
    target.write_bytes(target.read_bytes()[:40])
    rerun = run([*args, "--out", "out"], tmp_path / "cache", tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "starting at layer 0" in " ".join(rerun.stderr.split())
    assert walks(tmp_path / "out") == {"statistics": (4, 0), "cut": (0, 4)}  # the statistics were sound: kept
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")
