"""Architecture adapters: the only place that knows module names and config keys of a model family.

`get_adapter(model)` returns the adapter registered for `model.config.model_type`; an unsupported architecture
fails with one line naming the supported ones.
"""

from __future__ import annotations

from ..errors import DomainpruneError
from . import gemma3, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe  # noqa: F401  (registration)
from .base import ADAPTERS, DecoderAdapter, RemovedAttention, RemovedMLP, register
from .moe import MoEAdapter


def adapter_class_for(model_type: str) -> type[DecoderAdapter]:
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise DomainpruneError(f"architecture {model_type!r} is not supported; supported model types: {supported}")
    return ADAPTERS[model_type]


def get_adapter(model) -> DecoderAdapter:
    return adapter_class_for(model.config.model_type)(model)


__all__ = [
    "ADAPTERS",
    "DecoderAdapter",
    "MoEAdapter",
    "RemovedAttention",
    "RemovedMLP",
    "adapter_class_for",
    "get_adapter",
    "register",
]
