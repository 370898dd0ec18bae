"""`--to hf`: a transformers checkpoint folder (safetensors, config, tokenizer; the run's plan/recipe/report carried
over), optionally in another dtype; what `domainprune prune` itself writes, through the same run-folder writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .base import EXPORTERS, Exported, Exporter


class HFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the dtype the run was saved in


@EXPORTERS.register("hf")
class HF(Exporter):
    Options = HFOptions

    def export(self, run: Path, out: Path, options: HFOptions, *, force: bool) -> Exported:
        from ..export import needs_domainprune_loader
        from ..models import load_model
        from ..runfolder import RUN_FILES, run_folder

        loaded = load_model(run, dtype=options.dtype, device="cpu")
        with run_folder(out, force=force) as folder:
            folder.write_model(loaded.model, loaded.tokenizer)
            folder.copy_from(run, RUN_FILES)
            folder.verify(loaded.model)
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        stock = not needs_domainprune_loader(json.loads((out / "config.json").read_text()))
        loader = "AutoModelForCausalLM.from_pretrained" if stock else "domainprune.load_pretrained"
        layers = loaded.model.config.num_hidden_layers
        summary = f"{layers} layers as a transformers checkpoint ({dtype}): wrote {out}"
        return Exported(out, summary, [f"load it with {loader}({str(out)!r})"])
