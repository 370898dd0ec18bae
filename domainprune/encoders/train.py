"""The contrastive objective of sentence encoders, and short contrastive recovery after pruning.

InfoNCE with in-batch negatives (and the pairs' hard negatives, when given): cosine similarity × 20 (τ = 0.05),
cross-entropy against each query's own positive, as GAPrune's HardNegativeNLLLoss and sentence-transformers'
MultipleNegativesRankingLoss compute it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

from ..errors import DomainpruneError

log = logging.getLogger(__name__)
SCALE = 20.0
T = TypeVar("T")


def batches(items: Sequence[T], size: int, progress: bool, desc: str) -> Iterator[list[T]]:
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, leave=False, disable=not progress) as bar:
        for start in range(0, len(items), size):
            chunk = list(items[start : start + size])
            yield chunk
            bar.update(len(chunk))


def embed(model: Any, texts: list[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(inputs=texts).items()}
    return torch.nn.functional.normalize(model(features)["sentence_embedding"].float(), dim=-1)


def info_nce(model: Any, pairs: list[tuple[str, ...]]) -> torch.Tensor:
    """Mean InfoNCE loss of (query, positive, *hard negatives) tuples against every positive and negative in the
    batch."""
    queries = [p[0] for p in pairs]
    documents = [p[1] for p in pairs] + [n for p in pairs for n in p[2:]]
    logits = SCALE * embed(model, queries) @ embed(model, documents).T
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(pairs), device=logits.device))


def recover(
    model: Any,
    pairs: list[tuple[str, ...]],
    *,
    steps: int = 60,
    batch_size: int = 32,
    lr: float = 2e-5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Full fine-tuning with InfoNCE on `pairs` for `steps` batches (AdamW, linear warm-up over the first 10 %, then
    linear decay), pairs drawn in a seeded order; returns the loss before/after and the time."""
    from tqdm.auto import tqdm

    if len(pairs) < 2 or batch_size < 2:
        raise DomainpruneError(
            "contrastive recovery needs batches of at least 2 pairs; give more training pairs or raise --batch-size"
        )
    if steps < 1:
        raise DomainpruneError("--steps must be at least 1")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order: list[tuple[str, ...]] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    losses = []
    started = time.perf_counter()
    model.train()
    try:
        for _ in tqdm(range(steps), desc="contrastive recovery", leave=False, disable=not progress):
            if len(order) < batch_size:
                shuffled = list(pairs)
                rng.shuffle(shuffled)
                order.extend(shuffled)
            batch, order = order[:batch_size], order[batch_size:]
            loss = info_nce(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    window = max(1, steps // 10)
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
