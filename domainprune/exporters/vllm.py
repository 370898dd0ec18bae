"""`--to vllm`: a run with per-layer widths as a DeciLM (Nemotron-NAS) checkpoint folder that vLLM runs; the writer
and what it refuses are `domainprune.vllm_export`'s."""

from __future__ import annotations

from pathlib import Path

from .base import EXPORTERS, Exported, Exporter, NoOptions


@EXPORTERS.register("vllm")
class VLLM(Exporter):
    def export(self, run: Path, out: Path, options: NoOptions, *, force: bool) -> Exported:
        from ..vllm_export import export_vllm

        v = export_vllm(run, out, force=force)
        summary = (
            f"{v.layers} layers as a DeciLM checkpoint for vLLM (MLP widths {min(v.mlp_widths)}–{max(v.mlp_widths)}, "
            f"KV heads {min(v.kv_heads)}–{max(v.kv_heads)}): wrote {v.path}"
        )
        return Exported(v.path, summary, v.notes)
