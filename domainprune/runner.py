"""The layer runner: one walk over the decoder layers that every layer-wise stage uses.

A stage (statistics, sequential scoring, surgery, OBS refit) loops `for i in walk(adapter, source): ...`; inside the
body layer i is on the compute device and the stage may observe it (hooks), decide (scores, a sequential choice), cut
it (surgery) and refit it (OBS) before its outputs become the next layer's inputs. Where the layers live between
their turns is the `LayerSource`'s business, so one stage's code serves every `--offload` mode (docs/streaming.md):

- `LayerSource` (`--offload none`): the whole model sits on the compute device; nothing moves.
- `CpuOffload` (`--offload cpu`): the model sits in CPU memory; layer i moves to the compute device for its turn and
  back afterwards.
- `streaming.DiskStream` (`--offload disk`): the model is built on the meta device; layer i is read from the input
  checkpoint's safetensors shards for its turn and, on the last pass, written to the output and dropped.

Only the current layer and the calibration activations entering it are on the device at once (plus the embedding,
which the activations of layer 0 come from). Several GPUs: see docs/streaming.md ("Several GPUs") for where a
device map plugs in.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from .adapters import DecoderAdapter


class LayerSource:
    """Every layer resident on one device (`--offload none`): loading and releasing are no-ops."""

    name = "none"
    # a streamed walk's progress on disk (`streaming.WalkResume`): the stages resume from it and stage into it
    resume = None

    def load(self, adapter: DecoderAdapter, i: int) -> None:
        """Make layer i's weights usable on its compute device."""

    def release(self, adapter: DecoderAdapter, i: int) -> None:
        """Layer i's turn is over (in its final form if this is the last pass)."""


RESIDENT = LayerSource()


class CpuOffload(LayerSource):
    """The model in CPU memory; layer i on `device` only during its turn (`--offload cpu`)."""

    name = "cpu"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def load(self, adapter, i):
        adapter.layers[i].to(self.device)

    def release(self, adapter, i):
        adapter.layers[i].to("cpu")


def walk(
    adapter: DecoderAdapter,
    source: LayerSource | None = None,
    *,
    start: int = 0,
    desc: str = "layers",
    progress: bool = True,
) -> Iterator[int]:
    """Layer indices start..n-1 in order, each loaded by `source` before the loop body runs and released after it."""
    source = source or RESIDENT
    n = adapter.num_layers
    bar = tqdm(total=n, initial=start, desc=desc, unit="layer", disable=not progress)
    try:
        for i in range(start, n):
            source.load(adapter, i)
            yield i
            source.release(adapter, i)
            bar.update(1)
    finally:
        bar.close()
