"""Export targets of `domainprune export RUN --to NAME` and of prune's `--export NAME[:VALUE]` stage, registered by
name. Each is one module here: an `Exporter` subclass with its own pydantic `Options`, decorated with
`@EXPORTERS.register("name")`, plus its lazy line below (the module, and what it needs, is imported only when used).
"""

from __future__ import annotations

from .base import EXPORTERS, Exported, Exporter, ExportStage, NoOptions, export, parse_spec

EXPORTERS.lazy("hf", "domainprune.exporters.hf")
EXPORTERS.lazy("gguf", "domainprune.exporters.gguf")
EXPORTERS.lazy("vllm", "domainprune.exporters.vllm")

__all__ = ["EXPORTERS", "ExportStage", "Exported", "Exporter", "NoOptions", "export", "parse_spec"]
