"""Vocabulary trimming: keep the tokens a domain uses, drop the other rows of the embedding and the LM head.

How it works (METHODS.md §10):

1. Count how often every token id occurs in the domain corpus's calibration split (original tokenizer; the EOS
   that `Corpus.token_stream` puts between documents is not counted).
2. Put the ids in one *keep order*: first the always-kept set (special and added tokens, the BPE alphabet -- every
   token no merge produces, which for a byte-level BPE holds the 256 byte tokens --, and the ids the model's
   config names), then the other ids by descending frequency (ties: ascending id). Every id is preceded by its
   merge ancestry (the two parts of every merge producing it, recursively), so *every prefix of the order is
   closed under merge ancestry*.
3. Choose how many to keep: the shortest prefix whose calibration coverage reaches `coverage`, a fixed `size`,
   or the `optuna` optimum of U(k) = α·C(k) + (1−α)·R(k) with R(k) = 1 − FLOPs(k)/FLOPs(V),
   FLOPs(k) = 2·(parameters of the transformer body) + 2·d·k (TPE sampler, seed 42; C(k) < min_coverage scores −1).
4. Renumber the kept ids in ascending old-id order and rewrite the tokenizer's JSON (vocab, merges whose parts and
   result survive, added tokens, post-processor and padding ids) through the `tokenizers` library, slice the
   embedding and LM-head rows (and an LM-head bias) with the same index list, and map the config's and the
   generation config's token ids.

Guarantees: the BPE alphabet and all special tokens survive, so any text the original tokenizer encodes still
encodes, only into more tokens when it uses dropped ones; on text whose original tokens are all kept, the trimmed
tokenizer reproduces the original segmentation exactly (BPE applies the lowest-ranked applicable merge; the
merges that text needs all survive in the same relative order, and the surviving merges are a subset); the
trimmed model's logits equal the original's restricted to the kept ids. `save` verifies the written folder by
reloading it and comparing logits with the original model's before moving it into place.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Corpus, load_corpus
from .errors import DomainpruneError
from .evaluate import checkpoint_bytes, model_device, parameter_count, throughput
from .models import LoadedModel

log = logging.getLogger(__name__)

STRATEGIES = ("coverage", "size", "optuna")
DEFAULT_COVERAGE = 0.999
OPTUNA_SEED = 42
OPTUNA_TRIALS = 30
PROBE_TOKENS = 32
# Token-id fields of config.json / generation_config.json that are mapped to the new ids (and always kept).
CONFIG_ID_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


# --- the tokenizer's BPE model ---------------------------------------------------------------------------------


def _walk_types(node: Any) -> list[str]:
    """Types of a normalizer/pre-tokenizer/decoder JSON node, Sequence members included."""
    if not isinstance(node, dict):
        return []
    types = [node.get("type", "")]
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        for child in node.get(key) or []:
            types += _walk_types(child)
    return types


@dataclass
class BPEInfo:
    """What trimming needs to know about a `tokenizers` BPE model, read from its JSON."""

    spec: dict[str, Any]  # the whole tokenizer.json
    vocab: dict[str, int]  # the BPE model's vocabulary
    merges: list[tuple[str, str]]
    merge_results: list[str]  # the token each merge produces
    token_of: dict[int, str]  # every id the tokenizer knows: vocabulary and added tokens
    added: set[int]  # ids of added (and special) tokens
    parents: dict[int, list[tuple[int, int]]]  # id -> the (part, part) of every merge that produces it
    alphabet: set[int]  # vocabulary ids no merge produces: the symbols BPE starts from
    byte_level: bool

    @classmethod
    def of(cls, tokenizer: Any) -> "BPEInfo":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DomainpruneError(
                f"vocabulary trimming needs a fast (`tokenizers`) tokenizer; {type(tokenizer).__name__} has none"
            )
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        kind = model.get("type") or ("BPE" if "merges" in model else type(backend.model).__name__)
        if kind != "BPE":
            raise DomainpruneError(
                f"vocabulary trimming supports BPE tokenizers only; this tokenizer's model is {kind}"
            )
        if model.get("dropout"):
            raise DomainpruneError(
                "the tokenizer uses BPE dropout (random segmentation); trimming needs a deterministic BPE"
            )
        vocab: dict[str, int] = dict(model["vocab"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        prefix_len = len((model.get("continuing_subword_prefix") or "").encode())
        # tokenizers builds a merge's token as `a + b[prefix_len:]` (bytes), whether or not b carries the prefix.
        results = [a + b.encode()[prefix_len:].decode("utf-8", "replace") for a, b in merges]
        parents: dict[int, list[tuple[int, int]]] = {}
        for (a, b), r in zip(merges, results):
            if a not in vocab or b not in vocab or r not in vocab:
                raise DomainpruneError(f"the tokenizer's merge {a!r} + {b!r} names a token outside its vocabulary")
            parents.setdefault(vocab[r], []).append((vocab[a], vocab[b]))
        token_of = {i: t for t, i in vocab.items()}
        added = set()
        for tok in spec.get("added_tokens") or []:
            added.add(tok["id"])
            token_of.setdefault(tok["id"], tok["content"])
        alphabet = {i for i in vocab.values() if i not in parents}
        byte_level = "ByteLevel" in _walk_types(spec.get("pre_tokenizer"))
        if byte_level:
            from tokenizers import pre_tokenizers

            missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
            if missing:
                # Then the original tokenizer cannot encode those bytes either (it drops them); nothing to keep.
                log.info(
                    "the byte-level vocabulary lacks %d of the 256 byte tokens (the original drops them too)",
                    len(missing),
                )
        return cls(spec, vocab, merges, results, token_of, added, parents, alphabet, byte_level)


def _config_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for name in CONFIG_ID_FIELDS:
            value = getattr(cfg, name, None) if cfg is not None else None
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and v >= 0:
                    ids.add(v)
    return ids


def always_kept(info: BPEInfo, tokenizer: Any, model: torch.nn.Module | None) -> dict[str, set[int]]:
    """The ids every trimmed vocabulary keeps, by reason (a token may appear under several)."""
    special = set(info.added) | {i for i in getattr(tokenizer, "all_special_ids", []) if i in info.token_of}
    if (unk := info.spec["model"].get("unk_token")) in info.vocab:  # the BPE model's own unknown token
        special.add(info.vocab[unk])
    config = {i for i in _config_ids(model) if i in info.token_of} if model is not None else set()
    return {"special and added tokens": special, "BPE alphabet": set(info.alphabet), "ids named by the config": config}


def keep_order(counts: np.ndarray, info: BPEInfo, always: set[int]) -> tuple[np.ndarray, int]:
    """All tokenizer ids in keep order (see the module docstring) and the length of the always-kept prefix.

    Each id comes after every part of every merge producing it, so any prefix is closed under merge ancestry.
    """
    done: set[int] = set()
    order: list[int] = []

    def emit(token: int) -> None:
        if token in done:
            return
        stack, active = [(token, False)], set()
        while stack:
            t, expanded = stack.pop()
            if t in done:
                continue
            if expanded:
                active.discard(t)
                done.add(t)
                order.append(t)
                continue
            active.add(t)
            stack.append((t, True))
            for a, b in reversed(info.parents.get(t, ())):
                for p in (b, a):
                    if p not in done and p not in active:  # `active` guards against a (malformed) merge cycle
                        stack.append((p, False))

    for t in sorted(always):
        emit(t)
    n_always = len(order)
    ids = np.array(sorted(info.token_of), dtype=np.int64)
    freq = counts[ids]
    for t in ids[np.lexsort((ids, -freq))]:
        emit(int(t))
    return np.array(order, dtype=np.int64), n_always


# --- choosing the kept set -------------------------------------------------------------------------------------


def count_tokens(corpus: Corpus, tokenizer: Any, rows: int, split: str = "calibration") -> np.ndarray:
    """Occurrences of every id (0..rows-1) in the split's token stream, without the EOS between documents."""
    stream = corpus.token_stream(tokenizer, split)
    counts = np.bincount(stream.numpy(), minlength=rows).astype(np.int64)
    separators = max(0, len(corpus.split(split)) - 1)
    eos = tokenizer.eos_token_id
    if separators and eos is not None and eos < rows:
        counts[eos] = max(0, counts[eos] - separators)
    return counts


def lm_flops(model: torch.nn.Module) -> tuple[int, int, int]:
    """(parameters of the transformer body, hidden size d, LM-head rows V): FLOPs per token = 2·body + 2·d·V."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    rows, d = emb.weight.shape
    body = parameter_count(model) - emb.weight.numel()
    if head is not None and head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr():
        body -= head.weight.numel()
    if head is not None and getattr(head, "bias", None) is not None:
        body -= head.bias.numel()
    return body, d, rows


def _optuna_size(
    cum: np.ndarray, total: int, low: int, flops: tuple[int, int, int], alpha: float, min_coverage: float, trials: int
) -> tuple[int, dict[str, Any]]:
    try:
        import optuna
    except ImportError:
        raise DomainpruneError(
            "--strategy optuna needs the optuna package; install it with `pip install optuna`"
        ) from None
    body, d, rows = flops
    full = 2 * body + 2 * d * rows

    def figures(k: int) -> tuple[float, float, float]:
        c = float(cum[k - 1]) / total
        r = 1 - (2 * body + 2 * d * k) / full
        return c, r, (alpha * c + (1 - alpha) * r if c >= min_coverage else -1.0)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=OPTUNA_SEED))
    study.optimize(lambda trial: figures(trial.suggest_int("k", low, len(cum)))[2], n_trials=trials)
    k = int(study.best_params["k"])
    c, r, u = figures(k)
    if u < 0:
        raise DomainpruneError(
            f"optuna found no size reaching --min-coverage {min_coverage} in {trials} trials; lower it or use "
            "--coverage"
        )
    return k, {
        "trials": trials,
        "seed": OPTUNA_SEED,
        "alpha": alpha,
        "min_coverage": min_coverage,
        "best_size": k,
        "utility": u,
        "coverage": c,
        "latency_gain": r,
    }


def choose_size(
    order: np.ndarray,
    n_always: int,
    counts: np.ndarray,
    *,
    strategy: str,
    coverage: float | None,
    size: int | None,
    alpha: float,
    min_coverage: float,
    trials: int,
    flops: tuple[int, int, int],
) -> tuple[int, dict[str, Any] | None]:
    """How many ids of the keep order to keep (and the optuna summary)."""
    cum = np.cumsum(counts[order])
    total = int(cum[-1]) if len(cum) else 0
    if total == 0:
        raise DomainpruneError("the domain corpus's calibration split has no tokens; give more text with --data")
    if strategy == "size":
        if size > len(order):
            raise DomainpruneError(f"--size {size} exceeds the tokenizer's {len(order)} tokens; give a smaller size")
        if size < n_always:
            raise DomainpruneError(
                f"--size {size} is below the {n_always} tokens every trimmed vocabulary keeps "
                "(special tokens, BPE alphabet, config ids); give at least that"
            )
        return size, None
    if strategy == "coverage":
        need = coverage * total * (1 - 1e-12)  # exact targets (1.0) must not fail on rounding
        k = int(np.searchsorted(cum, need, side="left")) + 1
        return min(max(k, n_always), len(order)), None
    return _optuna_size(cum, total, max(n_always, 1), flops, alpha, min_coverage, trials)


def _check_options(
    strategy: str | None, coverage: float | None, size: int | None, alpha: float, min_coverage: float, trials: int
) -> tuple[str, float | None]:
    if strategy is None:
        strategy = "size" if size is not None else "coverage"
    if strategy not in STRATEGIES:
        raise DomainpruneError(f"--strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if strategy == "coverage":
        if size is not None:
            raise DomainpruneError("--size goes with --strategy size; give --coverage or --size, not both")
        coverage = DEFAULT_COVERAGE if coverage is None else coverage
    elif strategy == "size":
        if size is None:
            raise DomainpruneError("--strategy size needs --size N (the number of tokens to keep)")
        if coverage is not None:
            raise DomainpruneError("--coverage goes with --strategy coverage; give --coverage or --size, not both")
    elif coverage is not None or size is not None:
        raise DomainpruneError("--strategy optuna chooses the size itself; drop --coverage/--size (use --min-coverage)")
    if coverage is not None and not (isinstance(coverage, (int, float)) and 0 < coverage <= 1):
        raise DomainpruneError(f"--coverage must be in (0, 1], got {coverage}")
    if strategy == "optuna":
        if not 0 <= alpha <= 1:
            raise DomainpruneError(f"--alpha must be in [0, 1], got {alpha}")
        if not 0 <= min_coverage <= 1:
            raise DomainpruneError(f"--min-coverage must be in [0, 1], got {min_coverage}")
        if trials < 1:
            raise DomainpruneError(f"--trials must be at least 1, got {trials}")
    return strategy, coverage


# --- rewriting the tokenizer and the model ---------------------------------------------------------------------


def _remap_post_processor(node: Any, new_id: dict[int, int]) -> None:
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TemplateProcessing":
        for special in (node.get("special_tokens") or {}).values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            if key in node:
                node[key] = [node[key][0], new_id[node[key][1]]]
    for child in node.get("processors") or []:
        _remap_post_processor(child, new_id)


def trimmed_spec(info: BPEInfo, kept: list[int]) -> dict[str, Any]:
    """tokenizer.json for the kept ids, renumbered in ascending old-id order."""
    new_id = {old: new for new, old in enumerate(kept)}
    # Copy only what changes: deep-copying the original vocabulary and merges would cost more than the rest.
    spec = {k: (copy.deepcopy(v) if k != "model" else dict(v)) for k, v in info.spec.items()}
    model = spec["model"]
    vocab = {t: new_id[i] for t, i in info.vocab.items() if i in new_id}
    model["vocab"] = dict(sorted(vocab.items(), key=lambda item: item[1]))
    as_strings = any(isinstance(m, str) for m in info.spec["model"].get("merges", []))
    model["merges"] = [
        f"{a} {b}" if as_strings else [a, b]
        for (a, b), r in zip(info.merges, info.merge_results)
        if a in vocab and b in vocab and r in vocab
    ]
    for tok in spec.get("added_tokens") or []:
        tok["id"] = new_id[tok["id"]]
    _remap_post_processor(spec.get("post_processor"), new_id)
    padding = spec.get("padding")
    if isinstance(padding, dict) and padding.get("pad_id") in new_id:
        padding["pad_id"] = new_id[padding["pad_id"]]
    return spec


def trim_tokenizer(tokenizer: Any, kept: list[int], info: BPEInfo | None = None) -> Any:
    """A new tokenizer (same class, loaded by `AutoTokenizer`) over the kept ids, renumbered in ascending order."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    info = info or BPEInfo.of(tokenizer)
    new_id = {old: new for new, old in enumerate(kept)}
    spec = trimmed_spec(info, kept)
    try:
        text = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)).to_str()
    except Exception as e:  # tokenizers raises plain Exceptions for inconsistent JSON
        raise DomainpruneError(f"the trimmed tokenizer does not build: {str(e).splitlines()[0]}") from e
    stage = Path(tempfile.mkdtemp(prefix="domainprune-vocab-tok-"))
    try:
        tokenizer.save_pretrained(stage)
        (stage / "tokenizer.json").write_text(text, encoding="utf-8")
        _rewrite_side_files(stage, spec, new_id)
        trimmed = AutoTokenizer.from_pretrained(stage)
        # Forget the staging folder: the tokenizer lives in memory until `save` writes it.
        trimmed.name_or_path = trimmed.init_kwargs["name_or_path"] = getattr(tokenizer, "name_or_path", "")
        trimmed.init_kwargs.pop("vocab_file", None)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    expected = {info.token_of[old]: new for old, new in new_id.items() if old in info.token_of}
    got = trimmed.get_vocab()
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()), key=lambda item: item[1])[:3]
        raise DomainpruneError(
            f"the trimmed tokenizer reloads with a different vocabulary (e.g. {wrong}); nothing was written"
        )
    return trimmed


def _rewrite_side_files(folder: Path, spec: dict[str, Any], new_id: dict[int, int]) -> None:
    """Make the files `save_pretrained` writes beside tokenizer.json agree with it."""
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {
                str(new_id[int(k)]): v for k, v in config["added_tokens_decoder"].items() if int(k) in new_id
            }
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        added = json.loads(added_path.read_text())
        added_path.write_text(
            json.dumps({t: new_id[i] for t, i in added.items() if i in new_id}, ensure_ascii=False) + "\n"
        )
    # Slow-tokenizer files, when a class writes them: rewrite them from the new BPE model rather than leave stale ones.
    if (folder / "vocab.json").is_file():
        (folder / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False) + "\n")
    if (folder / "merges.txt").is_file():
        lines = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")


def _map_config_ids(cfg: Any, new_id: dict[int, int]) -> None:
    if cfg is None:
        return
    for name in CONFIG_ID_FIELDS:
        value = getattr(cfg, name, None)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            mapped = [new_id[v] for v in value if v in new_id]
            setattr(cfg, name, mapped or None)
        elif isinstance(value, int):
            if value not in new_id:
                log.warning("%s=%d is not a token of the tokenizer; setting it to None", name, value)
            setattr(cfg, name, new_id.get(value))


def trim_model(model: torch.nn.Module, kept: list[int], *, inplace: bool = False) -> torch.nn.Module:
    """The model with embedding and LM-head rows (and LM-head bias) `kept`, in that order; config ids mapped.

    Tied embeddings stay tied. Without `inplace` the input model is left untouched (only its small tensors are
    copied before slicing, never the full embedding).
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    rows = emb.weight.shape[0]
    if not kept or min(kept) < 0 or max(kept) >= rows:
        raise DomainpruneError(f"kept ids must lie in [0, {rows}); the tokenizer does not match the model")
    index = torch.tensor(kept, dtype=torch.long, device=emb.weight.device)

    def sliced(p: torch.nn.Parameter) -> torch.nn.Parameter:
        return torch.nn.Parameter(p.detach().index_select(0, index.to(p.device)).clone(), requires_grad=p.requires_grad)

    replace: dict[int, torch.nn.Parameter] = {id(emb.weight): sliced(emb.weight)}
    if head is not None:
        if id(head.weight) not in replace:
            replace[id(head.weight)] = sliced(head.weight)
        if getattr(head, "bias", None) is not None:
            replace[id(head.bias)] = sliced(head.bias)
    if inplace:
        trimmed = model
        emb.weight = replace[id(emb.weight)]
        if head is not None:
            head.weight = replace[id(head.weight)]
            if getattr(head, "bias", None) is not None:
                head.bias = replace[id(head.bias)]
    else:
        # deepcopy's memo maps the old parameters straight to their slices: tied ones stay one parameter.
        trimmed = copy.deepcopy(model, memo={k: v for k, v in replace.items()})
    new_id = {old: new for new, old in enumerate(kept)}
    k = len(kept)
    new_emb, new_head = trimmed.get_input_embeddings(), trimmed.get_output_embeddings()
    new_emb.num_embeddings = k
    if getattr(new_emb, "padding_idx", None) is not None:
        new_emb.padding_idx = new_id.get(new_emb.padding_idx)
    if new_head is not None and hasattr(new_head, "out_features"):
        new_head.out_features = k
    for module in trimmed.modules():
        if isinstance(getattr(module, "vocab_size", None), int) and module.vocab_size == rows:
            module.vocab_size = k
    trimmed.config.vocab_size = k
    _map_config_ids(trimmed.config, new_id)
    _map_config_ids(getattr(trimmed, "generation_config", None), new_id)
    return trimmed


# --- the API -------------------------------------------------------------------------------------------------------


@dataclass
class VocabReport:
    model: str
    model_path: str | None
    corpus: str
    strategy: str
    coverage_target: float | None
    size_target: int | None
    original_vocab: int  # embedding rows of the input model
    tokenizer_tokens: int  # ids the tokenizer knows
    kept_vocab: int
    always_kept: dict[str, int]  # reason -> count (overlapping), plus "total (closed)"
    calibration_tokens: int
    calibration_coverage: float
    params_original: int
    params_trimmed: int
    flops_per_token_original: int
    flops_per_token_trimmed: int
    merges_original: int
    merges_trimmed: int
    optuna: dict[str, Any] | None = None
    checkpoint_bytes_original: int | None = None
    checkpoint_bytes_trimmed: int | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    kept_ids: list[int] = field(default_factory=list, repr=False)  # new id i = old id kept_ids[i]
    probe_ids: torch.Tensor | None = field(default=None, repr=False)  # new ids
    probe_logits: torch.Tensor | None = field(default=None, repr=False)  # original logits on them, kept columns

    @property
    def latency_gain(self) -> float:
        """R(k) = 1 − FLOPs(k)/FLOPs(V)."""
        return 1 - self.flops_per_token_trimmed / self.flops_per_token_original

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("kept_ids", "probe_ids", "probe_logits"):
            out.pop(key)
        out["latency_gain"] = self.latency_gain
        out["parameter_saving"] = 1 - self.params_trimmed / self.params_original
        return out


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[None].to(model_device(model))).logits[0].float().cpu()


def _compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    if diff > atol * max(1.0, float(want.abs().max())):
        raise DomainpruneError(
            f"{what}: logits over the kept tokens differ by {diff:.3g} from the original; nothing was written"
        )
    return diff


def trim_vocabulary(
    loaded: LoadedModel,
    corpus_or_source: Corpus | str,
    *,
    coverage: float | None = None,
    size: int | None = None,
    strategy: str | None = None,
    alpha: float = 0.5,
    min_coverage: float = 0.0,
    trials: int = OPTUNA_TRIALS,
    text_field: str = "text",
    inplace: bool = False,
) -> tuple[torch.nn.Module, Any, VocabReport]:
    """Trim `loaded`'s vocabulary to what the domain corpus uses: returns (model, tokenizer, report).

    `strategy` defaults to "size" when `size` is given, else "coverage" (target `coverage`, default 0.999).
    "optuna" maximises α·C(k) + (1−α)·R(k) subject to C(k) ≥ `min_coverage` (TPE, seed 42, `trials` trials).
    The input model is not modified unless `inplace`.
    """
    start = time.perf_counter()
    strategy, coverage = _check_options(strategy, coverage, size, alpha, min_coverage, trials)
    model, tokenizer = loaded.model, loaded.tokenizer
    info = BPEInfo.of(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(info.token_of) >= rows:
        raise DomainpruneError(
            f"the tokenizer has id {max(info.token_of)} but the model only {rows} embedding rows; they do not belong "
            "together"
        )
    corpus = corpus_or_source if isinstance(corpus_or_source, Corpus) else load_corpus(corpus_or_source, text_field)
    counts = count_tokens(corpus, tokenizer, rows)
    reasons = always_kept(info, tokenizer, model)
    order, n_always = keep_order(counts, info, set().union(*reasons.values()))
    flops = lm_flops(model)
    k, optuna_summary = choose_size(
        order,
        n_always,
        counts,
        strategy=strategy,
        coverage=coverage,
        size=size,
        alpha=alpha,
        min_coverage=min_coverage,
        trials=trials,
        flops=flops,
    )
    kept = sorted(int(i) for i in order[:k])
    total = int(counts.sum())
    log.info("keeping %d of %d tokens (%.4f%% of the calibration tokens)", k, rows, 100 * counts[kept].sum() / total)

    new_tokenizer = trim_tokenizer(tokenizer, kept, info)
    params_original = parameter_count(model)
    # Probe: the original model's logits over the kept columns on kept ids, for checking the slice and the export.
    probe_new = torch.arange(PROBE_TOKENS).mul(7919).remainder(k)
    probe_old = torch.tensor(kept)[probe_new]
    reference = _logits(model, probe_old)[:, kept]
    new_model = trim_model(model, kept, inplace=inplace)
    _compare(_logits(new_model, probe_new), reference, next(new_model.parameters()).dtype, "trimming")
    body, d, _ = flops
    report = VocabReport(
        model=loaded.source,
        model_path=str(loaded.path) if loaded.path is not None else None,
        corpus=corpus.name,
        strategy=strategy,
        coverage_target=coverage,
        size_target=size,
        original_vocab=rows,
        tokenizer_tokens=len(info.token_of),
        kept_vocab=k,
        always_kept={**{r: len(ids) for r, ids in reasons.items()}, "total (closed under merges)": n_always},
        calibration_tokens=total,
        calibration_coverage=float(counts[kept].sum()) / total,
        params_original=params_original,
        params_trimmed=parameter_count(new_model),
        flops_per_token_original=2 * body + 2 * d * rows,
        flops_per_token_trimmed=2 * body + 2 * d * k,
        merges_original=len(info.merges),
        merges_trimmed=len(json.loads(new_tokenizer.backend_tokenizer.to_str())["model"]["merges"]),
        optuna=optuna_summary,
        kept_ids=kept,
        probe_ids=probe_new,
        probe_logits=reference,
    )
    if loaded.path is not None and any(Path(loaded.path).glob("*.safetensors")):
        report.checkpoint_bytes_original = checkpoint_bytes(loaded.path)
    report.seconds = time.perf_counter() - start
    return new_model, new_tokenizer, report


def save(model: torch.nn.Module, tokenizer: Any, report: VocabReport, out: str | Path, *, force: bool = False) -> Path:
    """Write the trimmed checkpoint (+ vocab_report.json, vocab_map.json) to `out`, atomically and verified.

    The folder is reloaded (stock `AutoModelForCausalLM`/`AutoTokenizer`, or `domainprune.load_pretrained` for a
    pruned heterogeneous model) and its logits compared with the original model's before it is moved into place.
    """
    from transformers import AutoTokenizer

    from .export import load_pretrained
    from .runfolder import run_folder

    if report.model_path and Path(out).resolve() == Path(report.model_path).resolve():
        raise DomainpruneError(f"--out {out} is the input model's folder; write the trimmed model somewhere else")
    dtype = next(model.parameters()).dtype
    with run_folder(out, force=force) as folder:
        tmp = folder.path
        folder.write_model(model, tokenizer)
        folder.write_json("vocab_map.json", {"kept_old_ids": report.kept_ids}, indent=None)
        reloaded = load_pretrained(tmp, dtype=dtype, device="cpu")
        if reloaded.config.vocab_size != report.kept_vocab:
            raise DomainpruneError(
                f"the written config has vocab_size {reloaded.config.vocab_size}, not {report.kept_vocab}"
            )
        if report.probe_ids is not None:
            _compare(_logits(reloaded, report.probe_ids), report.probe_logits, dtype, "export verification")
        del reloaded
        tok = AutoTokenizer.from_pretrained(tmp)
        if tok.get_vocab() != tokenizer.get_vocab():
            raise DomainpruneError("export verification: the written tokenizer reloads with a different vocabulary")
        report.checkpoint_bytes_trimmed = checkpoint_bytes(tmp)
        folder.write_json("vocab_report.json", report.to_dict())
    return folder.out


# --- evaluation ----------------------------------------------------------------------------------------------------


def heldout_text(corpus: Corpus, chars: int) -> list[str]:
    """The first `chars` characters of the test split's ordered documents, as a list of (the last cut) documents."""
    pieces, left = [], chars
    for doc in corpus.ordered("test"):
        if left <= 0:
            break
        pieces.append(doc.text[:left])
        left -= len(pieces[-1])
    return pieces


def text_figures(
    model: torch.nn.Module, tokenizer: Any, pieces: list[str], *, seq_len: int = 256, batch_size: int = 4
) -> dict[str, float]:
    """Tokens per character and bits per byte of `model` on the text `pieces` (documents), tokenised by `tokenizer`.

    The stream is EOS, doc, EOS, doc, ...; it is cut into `seq_len` windows that overlap by one token, so every
    text token is predicted exactly once (EOS targets are not scored). bits/byte = Σ NLL (nats) / ln 2 / UTF-8 bytes.
    """
    eos = tokenizer.eos_token_id
    ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    stream, target = [eos], [False]
    for one in ids:
        stream += one + [eos]
        target += [True] * len(one) + [False]
    stream, target = torch.tensor(stream[:-1]), torch.tensor(target[:-1])
    step = seq_len - 1
    starts = list(range(0, max(1, len(stream) - 1), step))
    chunks = [(stream[s : s + seq_len], target[s : s + seq_len]) for s in starts]
    total = 0.0
    device = model_device(model)
    with torch.inference_mode():
        i = 0
        while i < len(chunks):
            # batch equal-length windows (all but possibly the last)
            j = i + 1
            while j < len(chunks) and j - i < batch_size and len(chunks[j][0]) == len(chunks[i][0]):
                j += 1
            x = torch.stack([c[0] for c in chunks[i:j]]).to(device)
            m = torch.stack([c[1] for c in chunks[i:j]])[:, 1:].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            total += losses[m.flatten()].double().sum().item()
            i = j
    n_chars = sum(len(p) for p in pieces)
    n_bytes = sum(len(p.encode("utf-8")) for p in pieces)
    n_tokens = int(target.sum())
    return {
        "chars": n_chars,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "tokens_per_char": n_tokens / n_chars,
        "bits_per_byte": total / math.log(2) / n_bytes,
    }


def _head_seconds(head: torch.nn.Module, d: int, reps: int = 50) -> float:
    """Median seconds of one batch-1 decode step's LM head (a single hidden state)."""
    p = head.weight
    h = torch.randn(1, 1, d, dtype=p.dtype, device=p.device)
    dev = p.device
    with torch.inference_mode():
        head(h)
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            head(h)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed_figures(
    original: torch.nn.Module, trimmed: torch.nn.Module, *, rounds: int = 3, repeats: int = 1, head_rounds: int = 7
) -> dict[str, float]:
    """LM-head time per decode step and end-to-end throughput of both models, measured alternately in this process.

    On a shared machine load drifts, so the two models alternate: `head_rounds` rounds of 30 LM-head calls each,
    `rounds` rounds of `throughput` (each with its own warm-up and `repeats` timed runs; which model goes first
    alternates too); speedups are the median of
    the per-round ratios, absolute figures the medians. Both models get random prompts of ids below the trimmed
    vocabulary size (valid for both). `decode_speedup_predicted` is what the LM-head saving alone predicts:
    t_step / (t_step − Δt_head), with t_step the original's decode time per token.
    """
    k, d = trimmed.get_input_embeddings().weight.shape
    median = statistics.median
    heads = [
        (_head_seconds(original.get_output_embeddings(), d, 30), _head_seconds(trimmed.get_output_embeddings(), d, 30))
        for _ in range(head_rounds)
    ]
    runs = []
    for i in range(rounds):  # alternate which model goes first, so a drift in load favours neither
        first, second = (original, trimmed) if i % 2 == 0 else (trimmed, original)
        a, b = throughput(first, vocab_size=k, repeats=repeats), throughput(second, vocab_size=k, repeats=repeats)
        runs.append((a, b) if i % 2 == 0 else (b, a))
    head_o, head_t = median(h[0] for h in heads), median(h[1] for h in heads)
    out = {
        "lm_head_ms_original": 1e3 * head_o,
        "lm_head_ms_trimmed": 1e3 * head_t,
        "lm_head_speedup": median(o / t for o, t in heads),
        "rounds": rounds,
    }
    for kind in ("decode", "prefill"):
        key = f"{kind}_tokens_per_s"
        out[f"{key}_original"] = median(o[key] for o, _ in runs)
        out[f"{key}_trimmed"] = median(t[key] for _, t in runs)
        out[f"{kind}_speedup"] = median(t[key] / o[key] for o, t in runs)
    step = 1 / out["decode_tokens_per_s_original"]
    out["decode_speedup_predicted"] = step / max(step - (head_o - head_t), 1e-9)
    return out


def evaluate_trim(
    original: LoadedModel,
    model: torch.nn.Module,
    tokenizer: Any,
    report: VocabReport,
    *,
    domain: Corpus | str,
    general: Corpus | str | None = "general",
    chars: int = 50_000,
    seq_len: int = 256,
    batch_size: int = 4,
    speed: bool = True,
    speed_rounds: int = 3,
    text_field: str = "text",
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill `report.evaluation`: per source (domain, general) coverage of the test split, tokens per character and
    bits per byte of both models on the same test text; with `speed`, LM-head and decode speed of both.

    `reference` (an earlier evaluation of the same original model and sources) reuses its original-model figures.
    """
    if chars < 0:
        raise DomainpruneError(f"--eval-chars must be at least 0, got {chars}")
    kept = np.zeros(report.original_vocab, dtype=bool)
    kept[report.kept_ids] = True
    evaluation: dict[str, Any] = {"chars": chars, "seq_len": seq_len, "sources": {}}
    for role, source in (("domain", domain), ("general", general)):
        if source is None or source == "":
            continue
        corpus = source if isinstance(source, Corpus) else load_corpus(source, text_field)
        counts = count_tokens(corpus, original.tokenizer, report.original_vocab, "test")
        figures: dict[str, Any] = {"source": corpus.name}
        if counts.sum() == 0:
            log.warning("%s has an empty test split; no %s figures", corpus.name, role)
            evaluation["sources"][role] = figures
            continue
        figures["test_coverage"] = float(counts[kept].sum() / counts.sum())
        pieces = heldout_text(corpus, chars) if chars else []
        if pieces:
            ref = ((reference or {}).get("sources", {}).get(role) or {}).get("original")
            if ref is None or ref.get("chars") != sum(len(p) for p in pieces):
                ref = text_figures(original.model, original.tokenizer, pieces, seq_len=seq_len, batch_size=batch_size)
            figures["original"] = ref
            figures["trimmed"] = text_figures(model, tokenizer, pieces, seq_len=seq_len, batch_size=batch_size)
            figures["tokens_per_char_ratio"] = figures["trimmed"]["tokens_per_char"] / ref["tokens_per_char"]
            figures["bits_per_byte_ratio"] = figures["trimmed"]["bits_per_byte"] / ref["bits_per_byte"]
        evaluation["sources"][role] = figures
    if speed:
        evaluation["speed"] = speed_figures(original.model, model, rounds=speed_rounds)
    report.evaluation = evaluation
    return evaluation


def report_rows(report: VocabReport) -> list[tuple[str, str, str, str]]:
    """(figure, original, trimmed, change) rows for printing."""
    rows = [
        (
            "vocabulary",
            f"{report.original_vocab:,}",
            f"{report.kept_vocab:,}",
            f"{report.kept_vocab / report.original_vocab:.1%} kept",
        ),
        (f"coverage calibration ({report.corpus})", "100%", f"{report.calibration_coverage:.4%}", ""),
    ]
    for role, fig in report.evaluation.get("sources", {}).items():
        name = f"{role} ({fig['source']})"
        if "test_coverage" in fig:
            rows.append((f"coverage test {name}", "100%", f"{fig['test_coverage']:.4%}", ""))
        if "original" in fig:
            o, t = fig["original"], fig["trimmed"]
            rows.append(
                (
                    f"tokens/char {name}",
                    f"{o['tokens_per_char']:.4f}",
                    f"{t['tokens_per_char']:.4f}",
                    f"{fig['tokens_per_char_ratio'] - 1:+.2%}",
                )
            )
            rows.append(
                (
                    f"bits/byte {name}",
                    f"{o['bits_per_byte']:.4f}",
                    f"{t['bits_per_byte']:.4f}",
                    f"{fig['bits_per_byte_ratio'] - 1:+.2%}",
                )
            )
    rows.append(
        (
            "parameters",
            f"{report.params_original:,}",
            f"{report.params_trimmed:,}",
            f"{report.params_trimmed / report.params_original - 1:+.1%}",
        )
    )
    if report.checkpoint_bytes_original and report.checkpoint_bytes_trimmed:
        o, t = report.checkpoint_bytes_original, report.checkpoint_bytes_trimmed
        rows.append(("checkpoint MB", f"{o / 1e6:.1f}", f"{t / 1e6:.1f}", f"{t / o - 1:+.1%}"))
    rows.append(
        (
            "FLOPs/token (R(k) gain)",
            f"{report.flops_per_token_original / 1e6:.1f}M",
            f"{report.flops_per_token_trimmed / 1e6:.1f}M",
            f"{report.latency_gain:.1%} fewer",
        )
    )
    if s := report.evaluation.get("speed"):
        rows.append(
            (
                "LM head ms/step",
                f"{s['lm_head_ms_original']:.3f}",
                f"{s['lm_head_ms_trimmed']:.3f}",
                f"{s['lm_head_speedup']:.2f}× faster",
            )
        )
        rows.append(
            (
                "decode tokens/s",
                f"{s['decode_tokens_per_s_original']:.1f}",
                f"{s['decode_tokens_per_s_trimmed']:.1f}",
                f"{s['decode_speedup']:.3f}× (LM head predicts {s['decode_speedup_predicted']:.3f}×)",
            )
        )
        rows.append(
            (
                "prefill tokens/s",
                f"{s['prefill_tokens_per_s_original']:.1f}",
                f"{s['prefill_tokens_per_s_trimmed']:.1f}",
                f"{s['prefill_speedup']:.3f}×",
            )
        )
    return rows
