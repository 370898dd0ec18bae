"""Shared pieces for the pipeline, criteria and CLI tests: the real SmolLM2 tokenizer cut to its first VOCAB tokens
(loaded once per process), tiny random models with that vocabulary, and tiny calibration settings on the real `code`
corpus. Tests that need the real 49152-token vocabulary (vocabulary trimming, GGUF export) ask for `full=True`."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from domainprune import cache
from domainprune.errors import DomainpruneError
from domainprune.models import LoadedModel, preset_gguf

SMOLLM2_MISSING = "SmolLM2 is not available"  # the skip reason conftest counts at the end of the session

# The LM head and its logits would dominate a tiny model's compute with SmolLM2's 49152 tokens, so the tiny models use
# SmolLM2's tokenizer trimmed (domainprune.vocab) to the first VOCAB ids of its keep order: special tokens, the
# byte alphabet, then the lowest ids with their merge ancestry. It encodes any text (into more tokens), so the
# bundled corpora still feed the tiny models.
VOCAB = 512
FULL_VOCAB = 49152  # SmolLM2's own vocabulary
# Calibration small enough for two shared cores: 4 sequences of 32 tokens in batches of 2.
CALIB = dict(data="code", calib_samples=4, seq_len=32, batch_size=2)


@lru_cache(maxsize=None)
def _tokenizer():
    from transformers import AutoTokenizer

    try:
        gguf = preset_gguf("smollm2-135m")
    except DomainpruneError as e:
        return e
    # The converted folder loads in a second; converting the whole model (~40 s) only for its tokenizer does not
    # pay, so a cache without it reads the tokenizer straight from the GGUF file (same vocabulary and merges).
    converted = cache.entry("models", f"{gguf.stem}-{cache.file_fingerprint(gguf)}")
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@lru_cache(maxsize=None)
def _small_tokenizer():
    import numpy as np

    from domainprune.vocab import BPEInfo, always_kept, keep_order, trim_tokenizer

    tok = _tokenizer()
    if isinstance(tok, Exception):
        return tok
    info = BPEInfo.of(tok)
    always = set().union(*always_kept(info, tok, None).values())
    order, _ = keep_order(np.zeros(len(tok), dtype=np.int64), info, always)  # no counts: ties go to the lower id
    return trim_tokenizer(tok, sorted(order[:VOCAB].tolist()), info)


def smol_tokenizer(full: bool = False):
    """SmolLM2's tokenizer (`full`) or its VOCAB-token cut that the tiny models use; skips without SmolLM2."""
    tok = _tokenizer() if full else _small_tokenizer()
    if isinstance(tok, Exception):
        pytest.skip(f"{SMOLLM2_MISSING}: {tok}")
    return tok


@lru_cache(maxsize=None)
def _tiny(arch: str, seed: int, overrides: tuple) -> torch.nn.Module:
    return tiny_model(arch, seed, **{"vocab_size": VOCAB, **dict(overrides)})


def tiny_lm(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh copy of a tiny random model with the tiny tokenizer's vocabulary (built once per process per config;
    `vocab_size=FULL_VOCAB` for SmolLM2's own tokenizer)."""
    return copy.deepcopy(_tiny(arch, seed, tuple(sorted(overrides.items()))))


def loaded(model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    return LoadedModel(model, tokenizer, path=None, source="tiny")


def flap_run(out: Path, tokenizer) -> Path:
    """A heterogeneous (global allocation) FLAP run of a tiny llama at 35 %, written to `out` like `domainprune prune
    --out`: the pruned model that the recovery tests start from."""
    from domainprune.run import prune

    prune(
        loaded(tiny_lm("llama"), tokenizer),
        out=out,
        method="flap",
        sparsity=0.35,
        data="code",
        calib_samples=2,
        seq_len=16,
        batch_size=2,
        progress=False,
    )
    return out


def save_folder(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    """An ordinary Hugging Face model folder (config, safetensors, tokenizer files)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@torch.inference_mode()
def logits_on(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `domainprune ARGS` in this process (what the console script calls); returns (exit code, stdout, stderr)."""
    import sys

    from domainprune.cli import main

    capsys.readouterr()  # drop what the test itself printed before
    argv = sys.argv
    sys.argv = ["domainprune", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return exit_.value.code, out, err
