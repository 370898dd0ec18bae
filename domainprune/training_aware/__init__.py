"""Training-aware pruning (issue 18, docs/training-aware.md): methods that decide what to remove while tuning on the
domain, registered by name like the criteria. `prune --method atp|loraprune` runs one; `prune --iterative N` runs any
width criterion in N stages with a short domain tune between them. Each writes an ordinary run folder.

This package's own import registers the methods and checks recipes; it never imports `iterative` (which plans with
`domainprune.pipeline`, which checks recipes here): `domainprune.run` does, when it runs one."""

from __future__ import annotations

from typing import Any

from . import atp, common, loraprune  # noqa: F401  (atp, loraprune: registration)
from .common import TRAINING_METHODS, IterativeOptions


def is_training(recipe) -> bool:
    return recipe.method in TRAINING_METHODS or bool(recipe.iterative)


def options_class(method: str | None) -> type[common.TrainOptions]:
    return TRAINING_METHODS[method].options if method in TRAINING_METHODS else IterativeOptions


def train_options(method: str | None, iterative: int | None, fields: dict[str, Any] | None) -> dict[str, Any]:
    """The training options of a training method (or of `--iterative N`) validated and filled in; a bad one is refused
    in one line naming it. Which recipes may train at all is the width stage's check (domainprune.stages)."""
    what = f"--method {method}" if method in TRAINING_METHODS else f"--iterative {iterative}"
    return common.parse_options(options_class(method), fields, what).model_dump()
