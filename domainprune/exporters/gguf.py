"""`--to gguf`: one GGUF file for llama.cpp (and Ollama, LM Studio, llama-cpp-python's server). The writer is
`domainprune.gguf_export` (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from .base import EXPORTERS, Exported, Exporter

FLOAT_QUANTS = ("f32", "f16")  # written directly; the others by llama.cpp's own quantiser (the serve extra)


class GGUFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: str = "f32"  # f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k

    @field_validator("quant")
    @classmethod
    def _known(cls, quant: str) -> str:
        from ..gguf_export import QUANTS

        quant = quant.lower()
        if quant not in QUANTS:
            raise ValueError(f"{quant!r} is not one of {', '.join(QUANTS)}")
        return quant


@EXPORTERS.register("gguf")
class GGUF(Exporter):
    Options = GGUFOptions
    output = "file"
    suffix = ".gguf"
    spec_option = "quant"
    stage_defaults: ClassVar[dict[str, str]] = {"quant": "f16"}  # prune --export gguf: half the file of F32

    def check(self, options: GGUFOptions) -> None:
        if options.quant not in FLOAT_QUANTS:
            from ..gguf_export import llama_cpp_module

            llama_cpp_module()  # the quantiser's package, refused now rather than after the work

    def tag(self, options: GGUFOptions) -> str:
        return options.quant

    def export(self, run: Path, out: Path, options: GGUFOptions, *, force: bool) -> Exported:
        from ..encoders.model import is_encoder
        from ..gguf_export import export_run

        if is_encoder(run):  # BERT-family sentence encoders: llama.cpp's bert architecture (encoders/gguf.py)
            from ..encoders.gguf import export_encoder_gguf

            path = export_encoder_gguf(run, out, quant=options.quant, force=force)
            return Exported(path, f"encoder as llama.cpp 'bert' ({options.quant}): wrote {path}", [])
        r = export_run(run, out, quant=options.quant, force=force)
        notes = list(r.notes)
        if r.fallbacks:
            listed = ", ".join(f"{n} ({t})" for n, t in r.fallbacks[:8]) + (" …" if len(r.fallbacks) > 8 else "")
            notes.append(
                f"{len(r.fallbacks)} tensor(s) fell back from {r.quant} (width not a multiple of the block; "
                f"see --round-to): {listed}"
            )
        summary = (
            f"{r.layers} layers as llama.cpp {r.arch!r} ({r.quant}, tokenizer pre {r.pre_tokenizer!r}): wrote "
            f"{r.path} ({r.bytes / 1e6:.1f} MB)"
        )
        return Exported(r.path, summary, notes)
