"""Corpora: loading every supported source, hash splits, cached token streams, evenly spaced sequences.

Everything runs on real files written into tmp_path and the real SmolLM2 tokenizer; token caches go to a
per-test folder so no test reads another's entries.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from domainprune import data
from domainprune.data import SPLITS, Corpus, Document, load_corpus, split_of
from domainprune.errors import DomainpruneError


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from domainprune.models import resolve_source

    try:
        folder = resolve_source("smollm2-135m")
    except DomainpruneError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def token_cache(tokenizer, tmp_path, monkeypatch) -> Path:
    # Requesting `tokenizer` first makes sure the model was resolved against the real cache.
    folder = tmp_path / "cache"
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(folder))
    return folder


def prose(seed: int, lines: int = 40) -> str:
    rng = random.Random(seed)
    words = "river stone light window garden quiet market engine paper winter signal harbour".split()
    return "".join(f"{seed}.{i} " + " ".join(rng.choices(words, k=10)) + ".\n" for i in range(lines))


def write_text_corpus(folder: Path, files: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"doc{i:02d}.txt").write_text(prose(i))
    return folder


# --- splits --------------------------------------------------------------------------------------------------


def test_split_of_matches_hand_computed_sha1():
    # sha1("abc") = a9993e36...d89d, whose value mod 10 is 7; "d" -> 8; "f" -> 9.
    assert int("a9993e364706816aba3e25717850c26c9cd0d89d", 16) % 10 == 7
    assert split_of("abc") == "calibration"
    assert split_of("d") == "validation"
    assert split_of("f") == "test"
    groups = [f"file{i}.py" for i in range(2000)]
    assert [split_of(g) for g in groups] == [split_of(g) for g in groups]
    counts = {s: sum(split_of(g) == s for g in groups) for s in SPLITS}
    assert 1450 < counts["calibration"] < 1750 and 120 < counts["validation"] < 290 and 120 < counts["test"] < 290


def test_document_group_defaults_to_key_and_decides_the_split():
    assert Document("a.py", "x").group == "a.py"
    corpus = Corpus("c", [Document("k1", "x", group="f"), Document("k2", "y", group="abc"), Document("k3", "z")])
    assert [d.key for d in corpus.split("test")] == ["k1"]
    assert sorted(d.key for d in corpus.split("calibration") + corpus.split("validation")) == ["k2", "k3"]
    with pytest.raises(DomainpruneError, match="unknown split 'train'"):
        corpus.split("train")


# --- loading files -------------------------------------------------------------------------------------------


def test_folder_of_every_file_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("plain text\n")
    (root / "b.md").write_text("# Title\n\nmarkdown\n")
    (root / "sub" / "c.py").write_text("print('hi')\n")
    (root / "empty.txt").write_text("  \n")
    (root / "notes.csv").write_text("ignored,file\n")
    (root / ".hidden" / "x.txt").write_text("hidden\n")
    # Line 3 is blank and line 4 holds a raw U+2028, which must not shift the line numbers.
    lines = [{"content": "first"}, {"content": ""}, None, {"content": "third \u2028 line"}]
    jsonl = "\n".join("" if x is None else json.dumps(x, ensure_ascii=False) for x in lines) + "\n"
    (root / "d.jsonl").write_text(jsonl)
    pq.write_table(pa.table({"content": ["row zero", None, "row two"], "n": [0, 1, 2]}), root / "e.parquet")

    corpus = load_corpus(str(root), text_field="content")
    assert corpus.name == str(root)
    assert {d.key: d.text for d in corpus.documents} == {
        "a.txt": "plain text\n",
        "b.md": "# Title\n\nmarkdown\n",
        "d.jsonl:1": "first",
        "d.jsonl:4": "third \u2028 line",
        "e.parquet:0": "row zero",
        "e.parquet:2": "row two",
        "sub/c.py": "print('hi')\n",
    }
    assert all(d.group == d.key for d in corpus.documents)
    assert load_corpus(str(root / "sub" / "c.py")).documents == [Document("c.py", "print('hi')\n")]
    assert [d.key for d in load_corpus(str(root / "e.parquet"), "content").documents] == ["e.parquet:0", "e.parquet:2"]


def test_datasets_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["one", "", "three"]}).save_to_disk(str(tmp_path / "single"))
    keys = [d.key for d in load_corpus(str(tmp_path / "single"), text_field="body").documents]
    assert keys == ["0", "2"]

    splits = {"validation": ["v0"], "train": ["t0", "t1"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dict")
    )
    corpus = load_corpus(str(tmp_path / "dict"))
    assert [(d.key, d.text) for d in corpus.documents] == [("train:0", "t0"), ("train:1", "t1"), ("validation:0", "v0")]
    with pytest.raises(DomainpruneError, match="--text-field"):
        load_corpus(str(tmp_path / "dict"), text_field="body")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DomainpruneError, match=r"bad\.jsonl line 3 is not JSON.*--text-field") as info:
        load_corpus(str(bad))
    assert "\n" not in str(info.value)
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DomainpruneError, match=r"bad\.jsonl line 2: no field 'text'.*--text-field"):
        load_corpus(str(bad))


def test_bad_sources_raise_one_line_errors(tmp_path):
    with pytest.raises(DomainpruneError, match="not found.*preset"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("x\n")
    with pytest.raises(DomainpruneError, match=r"no supported files.*\.txt, \.md, \.py, \.jsonl, \.parquet"):
        load_corpus(str(tmp_path / "csv"))
    with pytest.raises(DomainpruneError, match="not a supported file"):
        load_corpus(str(tmp_path / "csv" / "a.csv"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    with pytest.raises(DomainpruneError, match="no non-empty document"):
        load_corpus(str(tmp_path / "blank"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DomainpruneError, match="latin.txt is not UTF-8") as info:
        load_corpus(str(latin))
    assert "\n" not in str(info.value)


# --- tokenisation and sequences ------------------------------------------------------------------------------


def test_token_stream_order_eos_and_cache(tmp_path, tokenizer, token_cache):
    corpus = load_corpus(str(write_text_corpus(tmp_path / "docs")))
    docs = sorted(corpus.split("calibration"), key=lambda d: d.key)
    random.Random(0).shuffle(docs)
    expected: list[int] = []
    for i, doc in enumerate(docs):
        expected += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc.text, add_special_tokens=False)["input_ids"]

    stream = corpus.token_stream(tokenizer, "calibration")
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == expected
    assert int((stream == tokenizer.eos_token_id).sum()) == len(docs) - 1

    entries = list((token_cache / "tokens").iterdir())
    assert len(entries) == 1
    # The second call reads the entry: prove it by planting a marker there.
    data.cache.save_tensors(entries[0], {"tokens": torch.arange(7, dtype=torch.int32)})
    assert load_corpus(str(tmp_path / "docs")).token_stream(tokenizer, "calibration").tolist() == list(range(7))
    # Changed text -> a new fingerprint and a new entry.
    (tmp_path / "docs" / "doc00.txt").write_text("changed")
    changed = load_corpus(str(tmp_path / "docs"))
    assert changed.fingerprint() != corpus.fingerprint()
    changed.token_stream(tokenizer, "calibration")
    assert len(list((token_cache / "tokens").iterdir())) == 2


def test_sequences_are_evenly_spaced_and_deterministic(tmp_path, tokenizer, token_cache):
    corpus = load_corpus(str(write_text_corpus(tmp_path / "docs")))
    stream = corpus.token_stream(tokenizer, "calibration")
    seq_len, n = 32, 10
    total = len(stream) // seq_len
    assert total > 3 * n

    seqs = corpus.sequences(tokenizer, "calibration", n, seq_len)
    assert seqs.shape == (n, seq_len) and seqs.dtype == torch.long
    assert torch.equal(seqs[0], stream[:seq_len])
    for i in range(n):
        start = round(i * total / n) * seq_len
        assert torch.equal(seqs[i], stream[start : start + seq_len])
    assert torch.equal(seqs, load_corpus(str(tmp_path / "docs")).sequences(tokenizer, "calibration", n, seq_len))
    every = corpus.sequences(tokenizer, "calibration", total, seq_len)
    assert torch.equal(every, stream[: total * seq_len].view(total, seq_len))


def test_too_few_tokens_names_the_counts(tmp_path, tokenizer, token_cache):
    corpus = load_corpus(str(write_text_corpus(tmp_path / "docs")))
    stream = corpus.token_stream(tokenizer, "calibration")
    have = len(stream) // 256
    with pytest.raises(DomainpruneError) as info:
        corpus.sequences(tokenizer, "calibration", have + 1, 256)
    message = str(info.value)
    counts = (
        f"has {len(stream):,} tokens = {have:,} sequences of 256; {have + 1:,} sequences need {(have + 1) * 256:,} "
        "tokens"
    )
    assert counts in message
    assert "calibration split" in message and "--calib-samples" in message and "\n" not in message
    with pytest.raises(DomainpruneError, match="unknown split"):
        corpus.sequences(tokenizer, "train", 1, 8)
    # A split with no documents at all reports 0 tokens.
    only_test = Corpus("tiny", [Document("k", "some text", group="f")])
    with pytest.raises(
        DomainpruneError,
        match=r"'tiny' has no document in its calibration split \(0 calibration, "
        r"0 validation, 1 test; .*\): give more documents",
    ):
        only_test.sequences(tokenizer, "calibration", 1, 8)


def test_a_single_file_is_split_into_pieces_that_reach_every_split(tmp_path):
    """One file would land whole in one split; its paragraphs (else lines, else runs of characters) are documents."""
    from domainprune.data import SPLITS, split_of

    paragraphs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    (tmp_path / "one.py").write_text("\n\n".join(paragraphs))
    corpus = load_corpus(str(tmp_path / "one.py"))
    assert [d.text.strip() for d in corpus.documents] == [p.strip() for p in paragraphs]
    assert [d.key for d in corpus.documents] == [f"one.py#{i}" for i in range(60)]
    assert {split_of(d.group) for d in corpus.documents} == set(SPLITS)
    (tmp_path / "lines.txt").write_text("\n".join(f"line {i}" for i in range(100)))
    assert len(load_corpus(str(tmp_path / "lines.txt")).documents) == 100
    (tmp_path / "flat.txt").write_text("word " * 3000)  # no line breaks: runs of characters
    flat = load_corpus(str(tmp_path / "flat.txt")).documents
    assert len(flat) == 30 and "".join(d.text for d in flat) == "word " * 3000


# --- presets -------------------------------------------------------------------------------------------------


def test_code_preset_is_the_stdlib_without_tests():
    corpus = load_corpus("code")
    keys = [d.key for d in corpus.documents]
    # Python 3.11's stdlib has ~550 such files once tests, idlelib and encodings are gone.
    assert len(keys) > 500 and len(set(keys)) == len(keys)
    assert sum(len(d.text) for d in corpus.documents) > 5_000_000
    assert {"json/decoder.py", "os.py", "asyncio/tasks.py"} <= set(keys)
    for key in keys:
        parts = key.split("/")
        assert key.endswith(".py") and "\\" not in key
        assert not {"test", "tests", "site-packages"} & set(parts[:-1]), key
        assert parts[0] not in ("idlelib", "encodings"), key
    assert all(d.group == d.key and d.text.strip() for d in corpus.documents)
    assert all(corpus.split(s) for s in SPLITS)


def test_general_preset_is_deduplicated_squad_passages():
    corpus = load_corpus("general")
    docs = corpus.documents
    assert len(docs) > 500
    assert len({d.text for d in docs}) == len(docs) and len({d.key for d in docs}) == len(docs)
    assert all(d.key.startswith(d.group + "#") for d in docs)
    assert all("Question:" not in d.text and not d.text.startswith(("Title:", "Background:")) for d in docs)
    assert "Harvard_University" in {d.group for d in docs}
    # Split by title: every title lies in exactly one split.
    titles = {s: {d.group for d in corpus.split(s)} for s in SPLITS}
    assert all(titles.values()) and not titles["test"] & (titles["calibration"] | titles["validation"])
