import os
import tempfile

# Tests never touch the user's cache: conversions, tokens and statistics go to a per-session folder unless the
# caller points DOMAINPRUNE_CACHE somewhere (CI reuses one so the GGUF is converted once).
os.environ.setdefault("DOMAINPRUNE_CACHE", tempfile.mkdtemp(prefix="domainprune-test-cache-"))
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
