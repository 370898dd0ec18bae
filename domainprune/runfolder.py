"""The one writer of model folders: `prune` (in memory and streamed; sentence encoders too), `apply`, `recover`,
`vocab` and the `hf` and `vllm` exporters all write through `run_folder`.

The rules live here once: the output is checked before anything is written (never an input; an existing one only
replaced with `--force`); everything goes into a hidden partial folder beside it (`cache.atomic_dir`), which is moved
into place only when the block completes, so a failure or a kill leaves the old output (or nothing); and a folder
without the files every model folder has (config.json and safetensors weights) is never moved into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import cache, faults
from .adapters import ADAPTERS
from .errors import DomainpruneError
from .export import export_config, verify_export
from .outputs import check_output

log = logging.getLogger(__name__)

# What `prune` writes beside the weights and what later commands carry over from the run they read.
RUN_FILES = ("plan.json", "recipe.json", "report.json", "vocab_report.json", "vocab_map.json")


class RunFolder:
    """The partial folder being filled; `path` is where files go until the block completes."""

    def __init__(self, path: Path, out: Path):
        self.path = path
        self.out = out  # where the folder will be once complete

    def write_config(self, model: torch.nn.Module, config: dict[str, Any] | None = None) -> None:
        self.write_json("config.json", config or _config(model), indent=2, sort_keys=True)

    def write_model(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Weights (safetensors), config.json, generation_config.json and the tokenizer files."""
        config = _config(model)  # first: it syncs the config's widths with the sliced layers the weights are saved from
        model.save_pretrained(self.path)
        self.write_config(model, config)
        self.write_tokenizer(tokenizer)

    def write_generation_config(self, model: torch.nn.Module) -> None:
        """For writers that save the weights themselves (streamed shards); `write_model` writes it already."""
        if model.generation_config is not None and model.can_generate():
            model.generation_config.save_pretrained(self.path)

    def write_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(self.path)

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)

    def write_json(self, name: str, value: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
        self.write_text(name, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")

    def write_files(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            self.write_text(name, text)

    def copy_from(self, source: Path, names: Iterable[str]) -> None:
        """The files of `names` that `source` has (a run's plan/recipe/report carried to what is made from it)."""
        for name in names:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, self.path / name)

    def verify(self, model: torch.nn.Module, atol: float | None = None) -> float:
        """Reload the folder as users will and compare its logits with `model`'s; refuses the folder if they differ."""
        diff = verify_export(model, self.path, atol)
        log.info("export verified: max logit difference after reload %.2e", diff)
        return diff

    def check_complete(self) -> None:
        missing = [what for what, ok in self._required() if not ok]
        if missing:  # a writer's bug, caught before a folder that nothing can load replaces a good one
            raise DomainpruneError(f"internal error: the output lacks {', '.join(missing)}; nothing was written")

    def _required(self) -> list[tuple[str, bool]]:
        return [
            ("config.json", (self.path / "config.json").is_file()),
            ("safetensors weights", any(self.path.glob("*.safetensors"))),
        ]


def _config(model: torch.nn.Module) -> dict[str, Any]:
    """config.json: per-layer widths and extra biases for models domainprune prunes, the model's own otherwise."""
    if model.config.model_type in ADAPTERS:
        return export_config(model)
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    return config


@contextmanager
def run_folder(out: str | Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[RunFolder]:
    """Yield a `RunFolder` to fill; the output replaces `out` only when the block completes (see module docstring).
    `inputs`: local paths `out` must not be, contain or lie in (callers also check them before their long work)."""
    out = check_output(out, force=force, inputs=inputs)
    with cache.atomic_dir(out, overwrite=force) as tmp:
        folder = RunFolder(tmp, out)
        yield folder
        folder.check_complete()
        faults.point("export")


def save_pruned(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | Path,
    *,
    extra_files: dict[str, str] | None = None,
    force: bool = False,
    verify: bool = True,
) -> Path:
    """A model folder for an in-memory model: weights, config, tokenizer and `extra_files` (plan.json, recipe.json,
    …), verified by reloading it before it is moved into place."""
    with run_folder(out, force=force) as folder:
        folder.write_model(model, tokenizer)
        folder.write_files(extra_files or {})
        if verify:
            folder.verify(model)
    return folder.out
