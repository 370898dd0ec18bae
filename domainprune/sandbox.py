"""Run untrusted generated code in a separate, fenced-in process (never in this one).

`run_program(source)` writes the program into a fresh scratch folder and runs it as `python -I program.py` in a
child process whose parent is a small trusted launcher (`_LAUNCHER`, itself a fresh `python -I`). The launcher,
before it replaces itself with the program's interpreter:

- when run as root with `unshare` available (`isolation() == "namespaces"`): lives in new network, mount and PID
  namespaces (no network interface but a down loopback; the PID namespace dies with it, taking every process
  the program forked), remounts every file system read-only except the scratch folder, and drops to the
  unprivileged user `nobody` (who then cannot remount, signal our processes, or exceed RLIMIT_NPROC);
- always: sets resource limits (address space, CPU seconds, file size, processes, no core files), empties the
  environment (only HOME and TMPDIR, both the scratch folder) and runs with stdin from /dev/null.

The limits are set in the launcher rather than in a `preexec_fn`: the evaluating process runs torch threads, and
Python code between fork and exec in a threaded parent can deadlock. A wall-clock timeout kills the whole process
group. Without root or `unshare` (`isolation() == "limits"`), only the limits, the scratch working directory, the
empty environment and the timeout apply: the program could then read and write wherever the user can, and reach
the network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

from .errors import DomainpruneError

TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
PROCESSES = 16
OUTPUT_CHARS = 2000  # of stdout/stderr kept for diagnosis
NOBODY = 65534
# New network, mount and PID namespaces; the PID namespace (and every process in it) dies with the launcher.
UNSHARE = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")

# The trusted launcher. argv: folder, uid (-1: keep), memory, cpu seconds, file bytes, processes, fence (0/1).
# The program runs in folder/work; with the fence, folder/python is a mount point used while fencing.
LAUNCH_FAILED = 97
_LAUNCHER = r"""
import ctypes, os, resource, stat, sys

def main():
    folder, uid, mem, cpu, fsize, nproc, fence = sys.argv[1], *map(int, sys.argv[2:8])
    work = os.path.join(folder, "work")
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if fence:
        libc = ctypes.CDLL(None, use_errno=True)
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MNT_DETACH = 1, 2, 4, 8, 32, 4096, 2
        def mount(src, target, flags, fstype=None, data=None):
            if libc.mount(src and src.encode(), target.encode(), fstype, flags, data) != 0:
                raise OSError(ctypes.get_errno(), "mount " + target)
        # nobody must reach the interpreter: over the first folder on its path that others cannot enter (e.g. /root),
        # lay an empty tmpfs holding only the interpreter's prefix (hiding the rest of that folder too).
        prefix = os.path.realpath(sys.base_prefix)
        parts = prefix.strip("/").split("/")
        closed = next((d for d in ("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
                       if not os.stat(d).st_mode & stat.S_IXOTH), None)
        if closed:
            hold = os.path.join(folder, "python")
            mount(prefix, hold, MS_BIND)
            mount("tmpfs", closed, MS_NOSUID | MS_NODEV, b"tmpfs", b"mode=755,size=1m")
            os.umask(0o022)
            os.makedirs(prefix, exist_ok=True)
            mount(hold, prefix, MS_BIND)
            libc.umount2(hold.encode(), MNT_DETACH)
        mount(work, work, MS_BIND)  # the working folder becomes its own mount, left writable
        keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
        with open("/proc/self/mountinfo") as f:
            rows = [line.split() for line in f]
        for row in rows:
            target = row[4].encode().decode("unicode_escape")
            if target == work:
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for opt in row[5].split(","):
                flags |= keep.get(opt, 0)
            try:
                mount(None, target, flags)
            except OSError:
                if target == "/":
                    raise
    os.chdir(work)
    for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.execve(python, [python, "-I", "program.py"], {"HOME": work, "TMPDIR": work})


try:
    main()
except Exception as e:  # before the program starts: tell the caller the sandbox itself failed
    sys.stderr.write(f"domainprune-sandbox: {e}\n")
    sys.exit(97)  # LAUNCH_FAILED
"""


@dataclass
class Outcome:
    passed: bool  # exit status 0 within the time limit
    returncode: int | None  # None when killed at the timeout
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


@lru_cache(maxsize=None)
def isolation() -> str:
    """'namespaces' when the program can be fenced by namespaces, a read-only file system and user nobody;
    'limits' when only resource limits, the scratch folder and the timeout apply (say so in results)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "limits"
    probe = _run("print('ok')", True, 60.0, MEMORY_BYTES, FILE_BYTES, PROCESSES)
    return "namespaces" if probe.passed and probe.stdout.strip() == "ok" else "limits"


def run_program(
    source: str,
    *,
    timeout: float = TIMEOUT_S,
    memory_bytes: int = MEMORY_BYTES,
    file_bytes: int = FILE_BYTES,
    processes: int = PROCESSES,
) -> Outcome:
    """Run `source` as a Python program in a fresh sandboxed process (see the module docstring)."""
    outcome = _run(source, isolation() == "namespaces", timeout, memory_bytes, file_bytes, processes)
    if outcome.returncode == LAUNCH_FAILED and outcome.stderr.startswith("domainprune-sandbox:"):
        raise DomainpruneError(
            f"the code sandbox could not start ({outcome.stderr.strip()}); report it with this message"
        )
    return outcome


def _run(source: str, fenced: bool, timeout: float, memory_bytes: int, file_bytes: int, processes: int) -> Outcome:
    folder = os.path.realpath(tempfile.mkdtemp(prefix="domainprune-sandbox-"))
    work = os.path.join(folder, "work")
    try:
        os.mkdir(work)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        uid = -1
        if fenced:
            uid = NOBODY
            os.mkdir(os.path.join(folder, "python"))
            os.chmod(folder, 0o711)
            os.chown(work, NOBODY, NOBODY)  # nobody may write in the working folder, and only there
        cpu = max(1, int(timeout + 0.999))
        launcher = [
            sys.executable,
            "-I",
            "-c",
            _LAUNCHER,
            folder,
            str(uid),
            str(memory_bytes),
            str(cpu),
            str(file_bytes),
            str(processes),
            str(int(fenced)),
        ]
        if fenced:
            launcher = [shutil.which("unshare"), *UNSHARE, *launcher]
        start = time.perf_counter()
        proc = subprocess.Popen(
            launcher,
            cwd=work,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - start
        _kill_group(proc.pid)  # anything the program left running in its session
        code = None if timed_out else proc.returncode
        return Outcome(code == 0, code, timed_out, _text(out), _text(err), seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "…"
