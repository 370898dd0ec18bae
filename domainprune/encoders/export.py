"""Write a pruned encoder as a sentence-transformers folder, verified by reloading it the way users will."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import DomainpruneError
from ..runfolder import run_folder
from .model import encoder_units, load_encoder

log = logging.getLogger(__name__)
PROBES = (
    "def parse_header(line): return line.split(':', 1)",
    "Return the number of items in the queue.",
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
)


@torch.inference_mode()
def probe_embeddings(model: Any) -> torch.Tensor:
    return model.encode(list(PROBES), convert_to_tensor=True, show_progress_bar=False).float().cpu()


def save_encoder(
    model: Any,
    out: str | Path,
    *,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
    verify: bool = True,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Config, safetensors, tokenizer and pooling modules in `out`, moved into place once reloaded and checked."""
    units = encoder_units(model)
    units.sync_config()
    with run_folder(out, force=force, inputs=inputs) as folder:
        tmp = folder.path
        model.save(str(tmp), create_model_card=False)
        folder.write_files(extra_files or {})
        if verify:
            device = next(model.parameters()).device
            reference = probe_embeddings(model)
            got = probe_embeddings(load_encoder(tmp, device=device))
            diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
            if not diff <= 1e-4:  # also catches NaN
                raise DomainpruneError(
                    f"export verification failed: reloaded embeddings differ by {diff:.3g}; nothing was written"
                )
            log.info("export verified: max embedding difference after reload %.2e", diff)
    return folder.out
