"""On-disk cache for expensive, deterministic stages (model conversion, tokenisation, statistics, scores).

Every entry lives under `cache_dir()/<kind>/<key>` where the key is a fingerprint of everything the result
depends on, so a changed input never reads a stale entry and an interrupted run resumes from what is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


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


PARTIAL = ".domainprune-partial-"  # marks every temporary file or folder this tool creates, for the sweep below


def _partial_prefix(name: str) -> str:
    return f".{name}{PARTIAL}{os.getpid()}-"


def sweep_partials(folder: Path) -> None:
    """Remove temporary files/folders a killed domainprune process left in `folder`: only our own (the marker in the
    name), only those whose process is gone, and only those older than this process."""
    try:
        candidates = [p for p in Path(folder).iterdir() if PARTIAL in p.name]
    except OSError:
        return
    started = _process_start()
    for p in candidates:
        try:
            pid = int(p.name.split(PARTIAL, 1)[1].split("-", 1)[0])
            if pid == os.getpid() or _alive(pid) or p.lstat().st_mtime >= started:
                continue
        except (ValueError, OSError):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start() -> float:
    """This process's start time (seconds since the epoch): /proc/<pid>'s timestamp, where there is a /proc."""
    try:
        return os.stat(f"/proc/{os.getpid()}").st_ctime
    except OSError:
        return _IMPORTED


_IMPORTED = time.time()  # where /proc is missing: no later than the process start


def _umask_mode(path: Path, folder: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; the final output gets what the user's umask gives any new file."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; move it into place only if the block completes.

    An exception leaves `final` untouched (and removes the partial folder), so no reader ever sees half a result; a
    killed run's partial folder is removed by the next run that writes beside it (`sweep_partials`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(final.name), dir=final.parent))
    try:
        yield tmp
        _umask_mode(tmp, folder=True)
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f"{_partial_prefix(final.name)}old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is renamed into place when complete and removed on
    any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _umask_mode(Path(tmp), folder=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- cache entries without pickle: tensors in safetensors, everything else in JSON ---------------------------------


def save_tensors(path: Path, tensors: dict[str, Any], meta: Any = None, copy: bool = True) -> None:
    """Tensors (contiguous CPU copies) in a safetensors file; `meta` (JSON) in its header. `copy=False` writes a CPU
    tensor that is already contiguous as it is, for large tensors that share no storage (activations)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=copy).contiguous() for k, v in tensors.items()}  # no shared storage
    header = {"json": json.dumps(meta)} if meta is not None else None
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_tensors(path: Path) -> tuple[dict[str, Any], Any] | None:
    """(tensors, meta) saved by `save_tensors`, or None (with a warning naming the entry) when it is missing or
    unreadable: a cache entry is only ever a shortcut, so a damaged one is rebuilt, never trusted."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("json")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, (json.loads(meta) if meta is not None else None)
    except Exception as e:  # noqa: BLE001 - any damage means the same thing: recompute
        log.warning("cache entry %s is unreadable (%s); it will be rebuilt", path, str(e).splitlines()[0][:120])
        return None


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj).encode())


def load_json(path: Path) -> Any | None:
    """A JSON cache entry, or None (with a warning) when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cache entry %s is unreadable (%s); it will be rebuilt", path, e)
        return None
