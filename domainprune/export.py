"""Export a pruned model as a standard checkpoint, and load the ones stock transformers cannot.

Uniform widths give a stock config that `AutoModelForCausalLM.from_pretrained` loads. Per-layer widths are written
as transformers' `per_layer_config` (keys `num_attention_heads`, `num_key_value_heads`, `intermediate_size`, and
`skip` for a removed `self_attn`/`mlp`; for mixture-of-experts layers the architecture's expert-count key,
`num_local_experts` or `num_experts`, and `num_experts_per_tok`); biases the architecture's config cannot express
are listed under `"domainprune": {"extra_biases": [...]}`. `load_pretrained` loads both kinds in one call.
`verify_export` reloads a written folder and compares its logits with the in-memory model; `runfolder` writes the
folders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_class_for, get_adapter
from .errors import DomainpruneError

log = logging.getLogger(__name__)
VERIFY_TOKENS = 32


def export_config(model: torch.nn.Module) -> dict[str, Any]:
    adapter = get_adapter(model)
    adapter.sync_config()
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config.pop("_name_or_path", None)  # where this process loaded it from (a cache folder): nothing to keep
    config.pop("per_layer_config", None)
    if per_layer := adapter.per_layer_config():
        config["per_layer_config"] = per_layer
        # Lets stock AutoConfig/AutoTokenizer read the file (transformers' validators read global head counts);
        # stock AutoModelForCausalLM still refuses the weights with a size-mismatch error rather than misloading.
        config["allow_global_per_layer_attribute_access"] = True
    if extra := adapter.extra_biases():
        config["domainprune"] = {"extra_biases": extra}
    return config


def needs_domainprune_loader(config: dict[str, Any]) -> bool:
    return bool(config.get("per_layer_config")) or "domainprune" in config


def _state_dict_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DomainpruneError(f"{path} has no *.safetensors weights")
    return files


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load any checkpoint written by domainprune (heterogeneous widths and extra biases included); a sentence
    encoder's comes back as a `SentenceTransformer`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DomainpruneError(f"{path} has no config.json; is it a model folder?")
    raw = json.loads((path / "config.json").read_text())
    from .encoders.model import ENCODER_TYPES, load_encoder

    if raw.get("model_type") in ENCODER_TYPES:  # a sentence encoder: a SentenceTransformer, per-layer widths or not
        return load_encoder(path, device=device) if dtype is None else load_encoder(path, device=device).to(dtype)
    if not needs_domainprune_loader(raw):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        return model.to(device).eval()
    per_layer = raw.pop("per_layer_config", {}) or {}
    raw.pop("allow_global_per_layer_attribute_access", None)
    extra = (raw.pop("domainprune", {}) or {}).get("extra_biases", [])
    adapter_cls = adapter_class_for(raw.get("model_type", "?"))
    config = AutoConfig.for_model(**raw)
    torch_dtype = dtype or getattr(torch, str(raw.get("dtype") or "float32"))
    with no_init_weights():  # every weight is overwritten by the checkpoint; buffers (rotary) are still built
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    adapter = adapter_cls(model)
    adapter.reshape_to(per_layer, extra)
    state: dict[str, torch.Tensor] = {}
    for f in _state_dict_files(path):
        state.update(load_file(f))
    state = adapter.from_checkpoint_layout(state)  # e.g. MoE experts saved one by one -> fused 3-D tensors
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k == "lm_head.weight"}
    if set(missing) - tied or unexpected:
        raise DomainpruneError(
            f"{path}: weights do not match its config (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the checkpoint is damaged"
        )
    if tied:
        model.tie_weights()
    return model.to(device=device, dtype=torch_dtype).eval()


@torch.inference_mode()
def _probe_logits(model: torch.nn.Module) -> torch.Tensor:
    vocab = model.config.vocab_size
    ids = torch.arange(VERIFY_TOKENS).mul(7919).remainder(vocab)[None].to(next(model.parameters()).device)
    return model(input_ids=ids).logits.float().cpu()


def _verify_device(model: torch.nn.Module) -> torch.device:
    """Where to reload for verification: the model's own device when a second copy fits there, because bf16/fp16
    kernels differ between devices by more than any useful tolerance over a deep model; otherwise the CPU."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return torch.device("cpu")
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free, _ = torch.cuda.mem_get_info(device)
    return device if free > 1.2 * need else torch.device("cpu")


def verify_export(model: torch.nn.Module, folder: Path, atol: float | None = None) -> float:
    """Reload `folder` the way users will and compare logits with the in-memory model; returns the max difference."""
    reference = _probe_logits(model)
    reloaded = load_pretrained(folder, dtype=next(model.parameters()).dtype, device=_verify_device(model))
    got = _probe_logits(reloaded)
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    if atol is None:
        atol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    scale = max(1.0, float(reference.abs().max()))
    if not diff <= atol * scale:  # also catches NaN
        raise DomainpruneError(f"export verification failed: reloaded logits differ by {diff:.3g}; nothing was written")
    return diff
