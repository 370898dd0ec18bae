"""Shared pieces for the pipeline, criteria and CLI tests: the real SmolLM2 tokenizer (loaded once per process),
tiny random models with its 49152-token vocabulary, and tiny calibration settings on the real `code` corpus."""

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

VOCAB = 49152  # SmolLM2's vocabulary, so its tokenizer and the bundled corpora can feed the tiny models
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


def smol_tokenizer():
    tok = _tokenizer()
    if isinstance(tok, Exception):
        pytest.skip(f"SmolLM2 is not available: {tok}")
    return tok


@lru_cache(maxsize=None)
def _tiny(arch: str, seed: int, overrides: tuple) -> torch.nn.Module:
    return tiny_model(arch, seed, vocab_size=VOCAB, **dict(overrides))


def tiny_lm(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh copy of a tiny random model with SmolLM2's vocabulary (built once per process per config)."""
    return copy.deepcopy(_tiny(arch, seed, tuple(sorted(overrides.items()))))


def loaded(model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    return LoadedModel(model, tokenizer, path=None, source="tiny")


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
