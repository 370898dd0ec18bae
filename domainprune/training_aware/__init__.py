"""Training-aware pruning (issue 18, docs/training-aware.md): methods that decide what to remove while tuning on the
domain, registered by name like the criteria. `prune --method atp|loraprune` runs one; `prune --iterative N` runs any
width criterion in N stages with a short domain tune between them. Each writes an ordinary run folder.

This package's own import registers the methods and checks recipes; it never imports `iterative` (which plans with
`domainprune.pipeline`, which checks recipes here): `domainprune.run` does, when it runs one."""

from __future__ import annotations

from typing import Any

from ..errors import DomainpruneError
from . import atp, common, loraprune  # noqa: F401  (atp, loraprune: registration)
from .common import TRAINING_METHODS, IterativeOptions

# recipe fields the training-aware methods do not combine with (what the user wrote -> the option to leave out)
EXCLUSIVE = {
    "depth": "--depth",
    "hidden_sparsity": "--hidden-sparsity",
    "experts_keep": "--experts-keep",
    "target_speedup": "--target-speedup",
    "target_params": "--target-params",
}


def is_training(recipe) -> bool:
    return recipe.method in TRAINING_METHODS or bool(recipe.iterative)


def options_class(recipe) -> type[common.TrainOptions]:
    return TRAINING_METHODS[recipe.method].options if recipe.method in TRAINING_METHODS else IterativeOptions


def check_recipe(recipe) -> dict[str, Any]:
    """Refuse what a training-aware recipe cannot combine with; its options validated and filled in."""
    what = f"--method {recipe.method}" if recipe.method in TRAINING_METHODS else f"--iterative {recipe.iterative}"
    for name, option in EXCLUSIVE.items():
        if getattr(recipe, name) is not None:
            raise DomainpruneError(f"{what} does not combine with {option}; give --sparsity alone")
    if recipe.sparsity is None:
        raise DomainpruneError(f"{what} needs --sparsity (the fraction of attention+MLP parameters removed)")
    if recipe.calib_candidates > 1:
        raise DomainpruneError(f"{what} does not combine with --calib-candidates")
    if recipe.method in TRAINING_METHODS:
        if recipe.iterative:
            raise DomainpruneError(
                f"--iterative runs a width criterion in stages; {what} decides while it trains: give one of them"
            )
        for name in ("allocation", "reconstruct", "bias_compensation", "taylor_mode", "micro_batch"):
            if getattr(recipe, name) not in (None, False):
                raise DomainpruneError(f"{what} decides its own units and widths; leave out --{name.replace('_', '-')}")
    return common.parse_options(options_class(recipe), recipe.train, what).model_dump()
