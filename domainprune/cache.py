"""On-disk cache for expensive, deterministic stages (model conversion, tokenisation, statistics, scores).

Every entry lives under `cache_dir()/<kind>/<key>` where the key is a fingerprint of everything the result
depends on, so a changed input never reads a stale entry and an interrupted run resumes from what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def cache_dir() -> Path:
    """`$DOMAINPRUNE_CACHE`, else `$XDG_CACHE_HOME/domainprune`, else `~/.cache/domainprune`."""
    if env := os.environ.get("DOMAINPRUNE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "domainprune"


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (paths, settings, other fingerprints)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(payload).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """Hash of a file's name, size and modification time: cheap, and changes when the file does."""
    st = Path(path).stat()
    return fingerprint(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def entry(kind: str, key: str) -> Path:
    return cache_dir() / kind / key


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; move it into place only if the block completes.

    An exception leaves `final` untouched (and removes the partial folder), so no reader ever sees half a result.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
