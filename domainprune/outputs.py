"""Where a command may write: checked once, before any long work, so that a bad `--out` costs nothing and an input
(the model, its data, a plan or run folder) is never overwritten, whatever `--force` says.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import DomainpruneError


def local_inputs(*sources: str | Path | None) -> list[Path]:
    """The sources that name something on this machine (model folders, .gguf files, corpora, plan files), resolved;
    presets, hub ids and None are not local paths and drop out."""
    found = []
    for source in sources:
        if source is None or str(source) == "":
            continue
        path = Path(str(source)).expanduser()
        if path.exists():
            found.append(path.resolve())
    return found


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    out: str | Path, *, force: bool, inputs: Iterable[Path] = (), kind: str = "folder", option: str = "--out"
) -> Path:
    """Refuse, in one line naming the fix, an output that is, contains or lies inside an input; that exists without
    `force`; that has the wrong kind (folder/file); or whose location cannot be written. Returns `out`."""
    out = Path(out).expanduser()
    target = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if _within(source, target):
            what = "is" if source == target else "contains"
            raise DomainpruneError(
                f"{option} {out} {what} the input {source}; inputs are never modified: choose another {option}"
            )
        if source.is_dir() and _within(target, source):
            raise DomainpruneError(
                f"{option} {out} lies inside the input folder {source}; inputs are never modified: write elsewhere"
            )
    if out.exists() or out.is_symlink():
        if kind == "folder" and not out.is_dir():
            raise DomainpruneError(f"{option} {out} is a file; give a folder")
        if kind == "file" and out.is_dir():
            raise DomainpruneError(f"{option} {out} is a folder; give a file name")
        if not force:
            raise DomainpruneError(f"{option} {out} exists; choose another {option} or pass --force to replace it")
    _check_writable(out, option)
    return out


def _check_writable(out: Path, option: str) -> None:
    """The nearest existing ancestor must be a folder this process can create files in (a read-only mount, a missing
    permission, a file where a folder should be are all found here, not after the work)."""
    parent = out.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DomainpruneError(f"{option} {out}: {parent} is a file, not a folder; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".domainprune-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DomainpruneError(
            f"{option} {out} cannot be written ({e.strerror} in {parent}); choose another {option}"
        ) from None
