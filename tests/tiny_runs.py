"""Pruned run folders of tiny models, built once per test process, for the `compare` and `report` tests: a dense
tiny Llama saved as a model folder, two `domainprune.run.prune` outputs (FLAP global 35 %, Wanda-sp uniform
50 %) with plan.json/recipe.json/report.json, a three-item JSONL task, and one `domainprune compare` of them.

The domain corpus is a small folder of standard-library code (a few kB per file), so that calibration, test
perplexity and the generation prompts cost no tokenisation of the whole `code` preset."""

from __future__ import annotations

import json
import sysconfig
from functools import lru_cache
from pathlib import Path

from tiny_pipeline import cli, loaded, save_folder, smol_tokenizer, tiny_lm

from domainprune.data import split_of
from domainprune.run import prune

RUNS = {"flap35": dict(method="flap", sparsity=0.35), "wanda50": dict(method="wanda-sp", sparsity=0.5)}
# Room for the throughput measurement's 64 + 128 tokens without a length warning.
MODEL = dict(max_position_embeddings=256)
TASK = [
    {"context": "def add(a, b):\n    return a", "choices": [" + b", " banana"], "label": 0},
    {"context": "import", "choices": [" os", " the"], "label": 0},
    {"context": "x = [1, 2", "choices": [", 3]", " dog"], "label": 1},
]
# What the compare run measures (beside --data CORPUS): tiny settings, no throughput (seconds per model).
SMALL = [
    "--samples",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--prompts",
    "2",
    "--new-tokens",
    "6",
    "--no-speed",
    "--quiet",
]


def small_corpus(folder: Path, files: int = 24, test_files: int = 3, chars: int = 3000) -> Path:
    """`files` standard-library modules (their first `chars` characters), at least `test_files` in the test split."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    written = tests = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")[:chars]
        if len(text) < chars:
            continue
        is_test = split_of(path.name) == "test"
        if written - tests >= files - test_files and not is_test:
            continue
        (folder / path.name).write_text(text)
        written, tests = written + 1, tests + is_test
        if written >= files and tests >= test_files:
            break
    return folder


@lru_cache(maxsize=None)
def build_runs(root: Path) -> dict[str, Path]:
    """{"dense": folder, "corpus": folder, "task": jsonl, "flap35": run folder, "wanda50": run folder} under `root`."""
    tok = smol_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    paths = {"dense": save_folder(tiny_lm(**MODEL), tok, root / "dense"), "task": root / "task.jsonl"}
    paths["corpus"] = small_corpus(root / "corpus")
    paths["task"].write_text("".join(json.dumps(item) + "\n" for item in TASK))
    for name, recipe in RUNS.items():
        paths[name] = prune(
            loaded(tiny_lm(**MODEL), tok),
            data=str(paths["corpus"]),
            calib_samples=2,
            seq_len=16,
            batch_size=2,
            out=root / name,
            progress=False,
            **recipe,
        ).out
    return paths


def compared(capsys, root: Path) -> Path:
    """The folder `domainprune compare flap35 wanda50 --baseline dense ...` wrote (run once per process)."""
    out = root / "compare"
    if not (out / "compare.json").is_file():
        runs = build_runs(root)
        code, _, err = cli(
            capsys,
            "compare",
            runs["flap35"],
            runs["wanda50"],
            "--baseline",
            runs["dense"],
            "--data",
            runs["corpus"],
            "--tasks",
            runs["task"],
            *SMALL,
            "--out",
            out,
        )
        assert code == 0, err
    return out
