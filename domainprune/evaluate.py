"""Model-agnostic measurements: log-likelihood / perplexity, decode and prefill throughput, size.

Everything here works on any Hugging Face causal LM (dense or pruned); device and dtype come from the model.
"""

from __future__ import annotations

import inspect
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import DomainpruneError

T = TypeVar("T")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the device of the model's first parameter (its embedding for HF models)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise DomainpruneError("the model has no parameters; pass a loaded causal LM") from None


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` can skip the LM head on positions whose logits are not needed."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _check_sequences(sequences: torch.Tensor) -> None:
    if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2:
        raise DomainpruneError("sequences must be a 2-D LongTensor of token ids (n, L); stack them with torch.stack")
    if sequences.dtype not in (torch.int64, torch.int32):
        raise DomainpruneError(f"sequences have dtype {sequences.dtype}; convert them with .long()")
    if sequences.shape[0] == 0 or sequences.shape[1] < 2:
        raise DomainpruneError(f"sequences have shape {tuple(sequences.shape)}; need at least 1 sequence of 2+ tokens")


def nll(
    model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> tuple[float, int]:
    """Total next-token negative log-likelihood (nats, summed in float64) and the number of predicted tokens."""
    _check_sequences(sequences)
    if batch_size < 1:
        raise DomainpruneError(f"batch_size must be at least 1, got {batch_size}")
    device = model_device(model)
    total, count = 0.0, 0
    starts = range(0, sequences.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="nll", unit="batch", file=sys.stderr, disable=not progress):
            batch = sequences[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=batch, use_cache=False).logits
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            total += losses.double().sum().item()
            count += losses.numel()
    return total, count


def perplexity(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True) -> float:
    total, count = nll(model, sequences, batch_size=batch_size, progress=progress)
    return math.exp(total / count)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], T], device: torch.device, repeats: int, warmup: bool = True) -> tuple[float, T]:
    """One untimed warm-up call (unless `warmup` is False), then the median wall time of `repeats` calls (and the last
    call's result)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        result = fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class _TokenClock:
    """A `generate` streamer that only timestamps what it is handed: the prompt first, then each new token (after
    the host has the token, so the step's device work is done)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def throughput(
    model: torch.nn.Module,
    *,
    vocab_size: int | None = None,
    prompt_len: int = 64,
    new_tokens: int = 128,
    prefill_len: int = 256,
    repeats: int = 3,
    seed: int = 0,
    warmup: bool = True,
) -> dict[str, float]:
    """Batch-1 speed on random tokens: greedy decode (`new_tokens` after a `prompt_len` prompt) and prefill.

    `decode_tokens_per_s` is 1 / the median inter-token time of `generate` (every gap between two consecutive new
    tokens of every timed run, `generate`'s own per-step work included; the first token, which carries the prompt's
    prefill, is left out), so a stall of the machine during a few steps does not move it; `decode_s` is the median
    wall time of a whole `generate` call. `prefill_tokens_per_s` is prefill_len / the median wall time of one cached
    forward pass that, like the prefill inside `generate`, computes logits for the last position only. One untimed
    warm-up run of each precedes the `repeats` timed ones, unless `warmup` is False (a model just timed needs none).
    """
    for name, value in (
        ("prompt_len", prompt_len),
        ("new_tokens", new_tokens),
        ("prefill_len", prefill_len),
        ("repeats", repeats),
    ):
        if value < 1:
            raise DomainpruneError(f"throughput: {name} must be at least 1, got {value}")
    if new_tokens < 2:
        raise DomainpruneError("throughput: new_tokens must be at least 2 (decode speed is timed between new tokens)")
    device = model_device(model)
    if vocab_size is None:
        vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(vocab_size, (1, prompt_len), generator=generator).to(device)
    prefill = torch.randint(vocab_size, (1, prefill_len), generator=generator).to(device)

    eos = getattr(model.generation_config, "eos_token_id", None)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    # min_new_tokens == max_new_tokens masks EOS at every step, so every run decodes exactly new_tokens.
    generate_kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad,
    )
    prefill_kwargs: dict[str, object] = {"use_cache": True}
    if accepts_logits_to_keep(model):
        prefill_kwargs["logits_to_keep"] = 1
    clocks: list[_TokenClock] = []

    def generate() -> torch.Tensor:
        clocks.append(_TokenClock())
        return model.generate(prompt, streamer=clocks[-1], **generate_kwargs)

    with torch.inference_mode():
        decode_s, output = _median_seconds(generate, device, repeats, warmup)
        prefill_s, _ = _median_seconds(lambda: model(input_ids=prefill, **prefill_kwargs), device, repeats, warmup)
    if output.shape[1] - prompt_len != new_tokens or any(len(c.times) != new_tokens + 1 for c in clocks):
        raise DomainpruneError(f"throughput: generate produced {output.shape[1] - prompt_len} tokens, not {new_tokens}")
    gaps = [b - a for c in clocks[1 if warmup else 0 :] for a, b in zip(c.times[1:], c.times[2:])]
    step_s = statistics.median(gaps)
    return {
        "decode_tokens_per_s": 1 / step_s,
        "prefill_tokens_per_s": prefill_len / prefill_s,
        "decode_step_s": step_s,
        "decode_s": decode_s,
        "prefill_s": prefill_s,
    }


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters, counting tied or otherwise shared tensors once."""
    seen: set[tuple[object, ...]] = set()
    total = 0
    for param in model.parameters():  # already skips repeated Parameter objects (e.g. tied lm_head)
        # Distinct Parameter objects can still share memory; key on the storage region they cover.
        key: tuple[object, ...] = (
            (id(param),) if param.device.type == "meta" else (param.data_ptr(), tuple(param.shape), param.stride())
        )
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def checkpoint_bytes(folder: str | Path) -> int:
    """Size on disk of a saved checkpoint: the sum of its *.safetensors files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DomainpruneError(f"{folder} is not a folder; pass the folder the model was saved to")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DomainpruneError(f"{folder} has no *.safetensors files; save the model with save_pretrained()")
    return sum(f.stat().st_size for f in files)
