"""Crashes and planted files, against the installed console script on a tiny model folder.

- A real `kill -9` (the process SIGKILLs itself at a named point, domainprune.faults) during statistics, OBS
  reconstruction, the allocation search, recovery and export; the rerun finishes and its weights are bit-identical to
  an uninterrupted run's, and the killed run's partial output is gone.
- No file read back from disk is unpickled: malicious pickles planted over every cache entry, as resume files and in
  the recovery staging folder run nothing; damaged cache entries are rebuilt with a warning naming them.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import run, weights_digest
from tiny_pipeline import save_folder, smol_tokenizer, tiny_lm

from domainprune import cache

SMALL = ["--calib-samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    model = save_folder(tiny_lm(), smol_tokenizer(), root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(os.__file__).parent
    for name in sorted(p.name for p in stdlib.glob("*.py"))[:60]:
        shutil.copy(stdlib / name, corpus / name)
    return model, corpus


def prune_args(model, corpus, *extra):
    return ["prune", "--model", model, "--data", corpus, *SMALL, *extra]


SCENARIOS = {
    "statistics": (["--method", "flap", "--sparsity", "0.3"], "statistics:1"),
    "obs": (["--method", "cfsp", "--reconstruct", "obs", "--sparsity", "0.3"], "obs:1"),
    "search": (
        [
            "--method",
            "magnitude",
            "--allocation",
            "search",
            "--sparsity",
            "0.3",
            "--search-generations",
            "2",
            "--search-offspring",
            "2",
            "--search-rounds",
            "1",
            "--search-samples",
            "2",
        ],
        "search:1",
    ),
    "export": (["--method", "magnitude", "--sparsity", "0.3"], "export"),
}


@pytest.mark.parametrize("stage", list(SCENARIOS))
def test_kill_9_then_rerun_gives_the_same_weights(inputs, tmp_path, stage):
    model, corpus = inputs
    extra, point = SCENARIOS[stage]
    reference = run(prune_args(model, corpus, *extra, "--out", "ref"), tmp_path / "cache-ref", tmp_path)
    assert reference.returncode == 0, reference.stderr

    killed = run(prune_args(model, corpus, *extra, "--out", "out"), tmp_path / "cache", tmp_path, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written in place
    resumed = run(prune_args(model, corpus, *extra, "--out", "out"), tmp_path / "cache", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")
    assert not [p.name for p in tmp_path.iterdir() if cache.PARTIAL in p.name]  # the killed run's partial: swept
    assert not list((tmp_path / "cache").rglob(f"*{cache.PARTIAL}*"))


def test_kill_9_during_recovery_then_rerun_gives_the_same_weights(inputs, tmp_path):
    model, corpus = inputs
    pruned = run(
        prune_args(model, corpus, "--method", "magnitude", "--sparsity", "0.3", "--out", "run"),
        tmp_path / "cache",
        tmp_path,
    )
    assert pruned.returncode == 0, pruned.stderr
    recover = [
        "recover",
        "run",
        "--data",
        corpus,
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--time-budget",
        "0",
        "--quiet",
    ]
    reference = run([*recover, "--out", "ref"], tmp_path / "cache", tmp_path)
    assert reference.returncode == 0, reference.stderr
    killed = run([*recover, "--out", "out"], tmp_path / "cache", tmp_path, kill_at="recovery:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any((tmp_path / ".out.recovery").glob("checkpoint-2"))
    resumed = run([*recover, "--out", "out"], tmp_path / "cache", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")


class _Plant:
    """Unpickling this creates the marker file: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickles_run_nothing_and_damaged_entries_are_rebuilt(inputs, tmp_path):
    model, corpus = inputs
    marker = tmp_path / "PWNED"
    args = prune_args(model, corpus, "--method", "flap", "--sparsity", "0.3")
    first = run([*args, "--out", "ref"], tmp_path / "cache", tmp_path)
    assert first.returncode == 0, first.stderr
    payload = pickle.dumps(_Plant(marker))
    entries = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any("stats" in p.parts for p in entries) and any("tokens" in p.parts for p in entries)
    for p in entries:  # every cache entry becomes a malicious pickle ...
        p.write_bytes(payload)
    for folder in {p.parent for p in entries}:  # ... and old-style resume files appear beside them
        for name in ("resume.pt", "state.pt", "units.pt", "recovery_data.pt"):
            torch.save({"x": _Plant(marker)}, folder / name)
    loud = [
        "prune",
        "--model",
        model,
        "--data",
        corpus,
        "--method",
        "flap",
        "--sparsity",
        "0.3",
        "--calib-samples",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--out",
        "out",
    ]  # not --quiet: the warnings are checked
    again = run(loud, tmp_path / "cache", tmp_path)
    assert again.returncode == 0, again.stderr
    assert not marker.exists()
    assert "it will be rebuilt" in again.stderr  # the damaged entries are named, then rebuilt
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")

    staging = tmp_path / ".rec.recovery"  # a recovery staging folder with planted files
    staging.mkdir()
    (staging / "recovery_data.safetensors").write_bytes(payload)
    torch.save({"x": _Plant(marker)}, staging / "recovery_data.pt")
    rec = run(
        [
            "recover",
            "out",
            "--data",
            corpus,
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--time-budget",
            "0",
            "--quiet",
            "--out",
            "rec",
        ],
        tmp_path / "cache",
        tmp_path,
    )
    assert rec.returncode == 0, rec.stderr
    assert not marker.exists()


def test_no_torch_load_without_weights_only():
    root = Path(__file__).resolve().parent.parent / "domainprune"
    for path in root.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{lineno}"


def test_outputs_follow_the_umask_and_only_stale_partials_of_this_tool_are_swept(tmp_path):
    mask = os.umask(0o022)
    try:
        with cache.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 is not what the user gets
        cache.atomic_write_bytes(tmp_path / "file.json", b"{}")
        assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".run{cache.PARTIAL}{pid}-abc"  # a killed run's partial folder
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = cache._process_start() - 60
    os.utime(stale, (old, old))
    alive = tmp_path / f".run{cache.PARTIAL}{os.getppid()}-def"  # a running process's: not ours to remove
    alive.mkdir()
    foreign = tmp_path / ".run.partial-xyz"  # another tool's: never touched
    foreign.mkdir()
    cache.sweep_partials(tmp_path)
    assert not stale.exists() and alive.exists() and foreign.exists()
