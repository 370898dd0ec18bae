"""The `domainprune` console script run as a separate process (a real kill -9 needs one), and a digest of the
weights it wrote."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(sys.executable).with_name("domainprune"))


def run(args: list, cache_dir: Path, cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`domainprune ARGS` with its own cache; `kill_at` makes it kill itself there (domainprune.faults)."""
    env = {**os.environ, "DOMAINPRUNE_CACHE": str(cache_dir), "TQDM_DISABLE": "1", "COLUMNS": "200"}
    env.pop("DOMAINPRUNE_KILL_AT", None)
    if kill_at:
        env["DOMAINPRUNE_KILL_AT"] = kill_at
    return subprocess.run([SCRIPT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()
