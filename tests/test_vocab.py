"""Vocabulary trimming (`domainprune.vocab`): the real SmolLM2 tokenizer, tiny random models with its 49152-token
vocabulary. The trimmed tokenizer must encode any text the original encodes (round trip), reproduce the original
segmentation on text made of kept tokens, and the trimmed model must give the original's logits over kept tokens."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from tiny_pipeline import smol_tokenizer

from domainprune import load_pretrained
from domainprune.adapters import get_adapter
from domainprune.data import Corpus, Document, split_of
from domainprune.errors import DomainpruneError
from domainprune.models import LoadedModel, load_model
from domainprune.runfolder import save_pruned
from domainprune.vocab import (
    BPEInfo,
    always_kept,
    count_tokens,
    evaluate_trim,
    heldout_text,
    keep_order,
    save,
    speed_figures,
    text_figures,
    trim_model,
    trim_vocabulary,
)

VOCAB = 49152
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real Python for the domain: a few standard-library modules (~200 kB), split into calibration and test documents.
DOMAIN_FILES = [
    "textwrap.py",
    "string.py",
    "json/encoder.py",
    "json/decoder.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
    "keyword.py",
    "colorsys.py",
    "calendar.py",
    "csv.py",
    "queue.py",
    "sched.py",
]

# Strings that are not code: unicode, emoji (ZWJ sequences, skin tones), CJK, RTL, whitespace runs, tabs and
# newlines, special-token text, control characters the original keeps.
TRICKY = [
    "def f(x):\n\treturn {'a': x ** 2}  # ok\r\n",
    "naïve café — Straße, Ærø, ñandú, İstanbul",
    "日本語のテキストと中文字符，한국어 텍스트。",
    "emoji 😀👍🏽 👩‍👩‍👧 🇫🇷 ❤️",
    "مرحبا بالعالم שלום עולם",
    "math ∑∫√∞ ≤ ≥ ≠ ∂x/∂t",
    " " * 37 + "x" + "\t" * 5 + "\n" * 7 + "  \r\n \u00a0\u2028\u200b end",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<file_sep><|endoftext|>",
    "a\x00b\x01c\x7f" + "zzzzzzzzzzzzzzzzqqqqqqqqqxxxxx",
    "",
    " leading and trailing  ",
]


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer(full=True)  # skips when SmolLM2 is not available


def keyed(prefix: str, split: str) -> str:
    """A document key that lands in `split` (splits are decided by a hash of the key)."""
    i = 0
    while split_of(f"{prefix}#{i}") != split:
        i += 1
    return f"{prefix}#{i}"


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    docs = []
    for n, rel in enumerate(DOMAIN_FILES):
        text = (STDLIB / rel).read_text(encoding="utf-8")
        docs.append(Document(keyed(rel, "test" if n % 5 == 4 else "calibration"), text))
    return Corpus("stdlib-sample", docs)


@lru_cache(maxsize=None)
def _tiny(arch: str, tie: bool) -> torch.nn.Module:
    return tiny_model(arch, vocab_size=VOCAB, tie_word_embeddings=tie)


def tiny(arch: str = "llama", tie: bool = True) -> torch.nn.Module:
    return copy.deepcopy(_tiny(arch, tie))


@pytest.fixture(scope="module")
def trimmed(tok, corpus):
    """(original LoadedModel, trimmed model, trimmed tokenizer, report) for a tied tiny llama at 0.99 coverage."""
    loaded = LoadedModel(tiny("llama", True), tok, None, "tiny")
    model, new_tok, report = trim_vocabulary(loaded, corpus, coverage=0.99)
    return loaded, model, new_tok, report


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def mapped(report, old_ids: list[int]) -> list[int]:
    new_id = {old: new for new, old in enumerate(report.kept_ids)}
    return [new_id[i] for i in old_ids]


# --- tokenizer ---------------------------------------------------------------------------------------------------


def random_unicode(seed: int, n: int = 400) -> str:
    """Characters from many scripts and planes (the original tokenizer encodes all of them)."""
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x52F),
        (0x590, 0x6FF),
        (0x900, 0x97F),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1FAFF),
        (0x20000, 0x2A6DF),
        (0x9, 0xA),
        (0xD, 0xD),
    ]
    rng = random.Random(seed)
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


@pytest.mark.parametrize("text", TRICKY + [random_unicode(s) for s in range(3)], ids=lambda t: repr(t[:12]))
def test_round_trip_any_text(tok, trimmed, text):
    *_, new_tok, report = trimmed
    plain = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    original = tok.encode(text, add_special_tokens=False)
    assert tok.decode(original, **plain) == text, "the original tokenizer itself must round-trip this string"
    ids = new_tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < report.kept_vocab for i in ids)
    assert new_tok.decode(ids, **plain) == text
    assert len(ids) >= len(original)  # dropped tokens only ever split into more tokens
    # Decoding the original ids mapped to new ids gives the same text wherever they are all kept.
    if set(original) <= set(report.kept_ids):
        assert ids == mapped(report, original)


def test_bytes_the_original_lacks_are_dropped_alike(tok, trimmed):
    # SmolLM2's byte-level vocabulary lacks 21 of the 256 byte tokens (e.g. 0x04, and 0xF1, the lead byte of
    # U+40000..U+7FFFF): the original silently drops them, and so does the trimmed tokenizer -- nothing new is lost.
    *_, new_tok, _ = trimmed
    for text in ["a\x04b", "x\U00050000y"]:
        assert new_tok.decode(new_tok.encode(text)) == tok.decode(tok.encode(text)) != text


def test_same_segmentation_on_text_of_kept_tokens(tok, corpus, trimmed):
    *_, new_tok, report = trimmed
    kept = set(report.kept_ids)
    texts = [line for doc in corpus.documents for line in doc.text.split("\n") if line.strip()]
    rng = random.Random(0)
    for _ in range(300):  # text decoded from random kept tokens, including rare ones
        texts.append(tok.decode(rng.sample(report.kept_ids[300:], 6)))
    originals = tok(texts, add_special_tokens=False)["input_ids"]
    news = new_tok(texts, add_special_tokens=False)["input_ids"]
    compared = 0
    for text, original, new in zip(texts, originals, news):
        if set(original) <= kept:
            assert new == mapped(report, original), text
            compared += 1
    assert compared > 1000


def test_kept_set_closed_under_merges_and_always_kept(tok, trimmed):
    *_, report = trimmed
    info = BPEInfo.of(tok)
    kept = set(report.kept_ids)
    for t in kept:
        for a, b in info.parents.get(t, ()):
            assert a in kept and b in kept
    assert info.alphabet <= kept and info.added <= kept and {0, 1, 2} <= kept
    assert len(info.alphabet) == 252  # 235 of the 256 byte tokens (the rest are absent) + 17 added tokens


def test_tokenizer_files_are_consistent(tok, trimmed, tmp_path):
    loaded, model, new_tok, report = trimmed
    out = save(model, new_tok, report, tmp_path / "out")
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    old = tok.get_vocab()
    # renumbered in ascending old-id order: new id i is old id kept_ids[i]
    assert sorted(vocab.values()) == list(range(report.kept_vocab))
    assert all(old[t] == report.kept_ids[i] for t, i in vocab.items())
    assert report.kept_ids == sorted(report.kept_ids)
    # merges: the original's, in the same order, whose parts and result survive
    original_merges = [tuple(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    got = [tuple(m) for m in spec["model"]["merges"]]
    expected = [m for m in original_merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    assert got == expected and 0 < len(got) < len(original_merges)
    assert [(a["content"], a["id"]) for a in spec["added_tokens"]] == [
        (c, mapped(report, [old[c]])[0]) for c in [a["content"] for a in spec["added_tokens"]]
    ]
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["vocab_size"] == report.kept_vocab == len(new_tok)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        old_id = getattr(loaded.model.config, key)
        if old_id is not None:
            assert config[key] == mapped(report, [old_id])[0]
            assert generation.get(key, config[key]) == config[key]
    assert new_tok.eos_token == tok.eos_token and new_tok.eos_token_id == mapped(report, [tok.eos_token_id])[0]
    assert json.loads((out / "vocab_map.json").read_text())["kept_old_ids"] == report.kept_ids
    saved = json.loads((out / "vocab_report.json").read_text())
    assert saved["kept_vocab"] == report.kept_vocab and saved["checkpoint_bytes_trimmed"] > 0


# --- model -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,tie",
    [("llama", True), ("llama", False), ("qwen2", False), ("gemma3_text", True), ("mistral", False), ("qwen3", True)],
)
def test_logits_over_kept_tokens_equal_the_original(arch, tie, trimmed):
    *_, report = trimmed
    original = tiny(arch, tie)
    model = trim_model(original, report.kept_ids)
    assert model.get_input_embeddings().weight.shape[0] == report.kept_vocab
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    g = torch.Generator().manual_seed(1)
    new_ids = torch.randint(report.kept_vocab, (2, 12), generator=g)
    old_ids = torch.tensor(report.kept_ids)[new_ids]
    want = logits(original, old_ids)[..., report.kept_ids]
    torch.testing.assert_close(logits(model, new_ids), want, rtol=1e-5, atol=1e-5)
    # the input model is untouched
    assert original.get_input_embeddings().weight.shape[0] == VOCAB and original.config.vocab_size == VOCAB


def test_lm_head_bias_is_sliced_too(trimmed):
    *_, report = trimmed
    original = tiny("llama", False)
    original.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB))
    model = trim_model(original, report.kept_ids)
    assert model.lm_head.bias.shape == (report.kept_vocab,)
    new_ids = torch.arange(0, report.kept_vocab, 997)[None]
    want = logits(original, torch.tensor(report.kept_ids)[new_ids])[..., report.kept_ids]
    torch.testing.assert_close(logits(model, new_ids), want, rtol=1e-5, atol=1e-5)


def files_digest(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_reloads_with_stock_classes(tok, corpus, tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "src"
    tiny("llama", tie).save_pretrained(src)
    tok.save_pretrained(src)
    before = files_digest(src)
    loaded = load_model(str(src), dtype="float32", device="cpu")
    model, new_tok, report = trim_vocabulary(loaded, corpus, size=3000)
    out = save(model, new_tok, report, tmp_path / "out")
    assert files_digest(src) == before  # the input model folder is never modified
    stock = AutoModelForCausalLM.from_pretrained(out)
    stock_tok = AutoTokenizer.from_pretrained(out)
    assert stock.config.vocab_size == 3000 == len(stock_tok) and stock.config.tie_word_embeddings == tie
    text = (STDLIB / "textwrap.py").read_text()[:3000]
    new_ids = torch.tensor([stock_tok.encode(text)])
    assert new_ids.max() < 3000
    old_ids = torch.tensor(report.kept_ids)[new_ids]
    want = logits(loaded.model, old_ids)[..., report.kept_ids]
    torch.testing.assert_close(logits(stock, new_ids), want, rtol=1e-5, atol=1e-5)
    assert stock_tok.decode(new_ids[0]) == text


def test_pruned_heterogeneous_model(tok, corpus, tmp_path):
    model = tiny("qwen2", False)
    get_adapter(model).slice_mlp(1, list(range(0, 40, 2)))  # layer 1 keeps 20 of 40 MLP channels
    src = save_pruned(model, tok, tmp_path / "pruned")
    loaded = load_model(str(src), dtype="float32", device="cpu")
    trimmed_model, new_tok, report = trim_vocabulary(loaded, corpus, coverage=0.9)
    out = save(trimmed_model, new_tok, report, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] and config["vocab_size"] == report.kept_vocab
    reloaded = load_pretrained(out)
    new_ids = torch.arange(5, report.kept_vocab, 97)[None, :20]
    want = logits(loaded.model, torch.tensor(report.kept_ids)[new_ids])[..., report.kept_ids]
    torch.testing.assert_close(logits(reloaded, new_ids), want, rtol=1e-5, atol=1e-5)


# --- choosing the kept set ---------------------------------------------------------------------------------------


def test_coverage_and_size_hit_their_targets(tok, corpus):
    loaded = LoadedModel(tiny("llama", True), tok, None, "tiny")
    counts = count_tokens(corpus, tok, VOCAB)
    total = counts.sum()
    info = BPEInfo.of(tok)
    order, n_always = keep_order(counts, info, set().union(*always_kept(info, tok, loaded.model).values()))
    for target in (0.95, 1.0):
        _, _, report = trim_vocabulary(loaded, corpus, coverage=target)
        assert report.calibration_coverage >= target
        assert counts[report.kept_ids].sum() / total == pytest.approx(report.calibration_coverage)
        # the smallest prefix of the keep order that reaches the target
        assert sorted(order[: report.kept_vocab].tolist()) == report.kept_ids
        assert counts[order[: report.kept_vocab - 1]].sum() < target * total
    assert report.calibration_coverage == 1.0 and report.kept_vocab < VOCAB
    for size in (n_always, 777):
        _, new_tok, report = trim_vocabulary(loaded, corpus, size=size)
        assert report.kept_vocab == size == len(new_tok)


def test_optuna_strategy(tok, corpus):
    pytest.importorskip("optuna")
    loaded = LoadedModel(tiny("llama", True), tok, None, "tiny")
    _, _, report = trim_vocabulary(loaded, corpus, strategy="optuna", alpha=0.5, min_coverage=0.95, trials=12)
    o = report.optuna
    assert o["best_size"] == report.kept_vocab and o["seed"] == 42 and o["trials"] == 12
    assert report.calibration_coverage >= 0.95 and o["coverage"] == pytest.approx(report.calibration_coverage)
    assert o["utility"] == pytest.approx(0.5 * o["coverage"] + 0.5 * o["latency_gain"])
    assert o["latency_gain"] == pytest.approx(report.latency_gain)
    _, _, again = trim_vocabulary(loaded, corpus, strategy="optuna", alpha=0.5, min_coverage=0.95, trials=12)
    assert again.kept_ids == report.kept_ids  # seeded


# --- report ------------------------------------------------------------------------------------------------------


def test_report_figures(tok, corpus, trimmed):
    loaded, model, new_tok, report = trimmed
    evaluation = evaluate_trim(
        loaded, model, new_tok, report, domain=corpus, general=None, chars=4000, seq_len=64, speed=False
    )
    fig = evaluation["sources"]["domain"]
    assert 0.7 < fig["test_coverage"] <= 1
    o, t = fig["original"], fig["trimmed"]
    assert o["chars"] == t["chars"] == 4000 and o["bytes"] == t["bytes"]
    assert t["tokens"] >= o["tokens"] and fig["tokens_per_char_ratio"] >= 1
    assert 0 < o["bits_per_byte"] < 30 and 0 < t["bits_per_byte"] < 30
    # bits/byte by hand for the original: one window over the whole (short) text, every token predicted
    pieces = heldout_text(corpus, 300)
    ids = [tok.eos_token_id]
    for p in pieces:
        ids += tok.encode(p) + [tok.eos_token_id]
    x = torch.tensor([ids[:-1]])
    lp = torch.log_softmax(logits(loaded.model, x)[0, :-1], -1)
    target = x[0, 1:]
    nll = -lp[torch.arange(len(target)), target][target != tok.eos_token_id].double().sum().item()
    by_hand = nll / np.log(2) / sum(len(p.encode()) for p in pieces)
    assert text_figures(loaded.model, tok, pieces, seq_len=len(ids))["bits_per_byte"] == pytest.approx(
        by_hand, rel=1e-6
    )


def test_speed_figures_use_valid_ids(trimmed):
    loaded, model, *_ = trimmed
    s = speed_figures(loaded.model, model, rounds=1, repeats=1)
    assert s["lm_head_ms_trimmed"] > 0 and s["decode_tokens_per_s_trimmed"] > 0 and s["decode_speedup"] > 0


# --- errors ------------------------------------------------------------------------------------------------------


def one_line_error(fn, match: str):
    with pytest.raises(DomainpruneError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_input(tok, corpus, trimmed, tmp_path):
    loaded, model, new_tok, report = trimmed
    for bad in (0, -0.1, 1.5):
        one_line_error(lambda: trim_vocabulary(loaded, corpus, coverage=bad), "coverage must be in")
    one_line_error(lambda: trim_vocabulary(loaded, corpus, size=100), "below the 252 tokens")
    one_line_error(lambda: trim_vocabulary(loaded, corpus, size=VOCAB + 1), "exceeds")
    one_line_error(lambda: trim_vocabulary(loaded, corpus, size=500, coverage=0.9), "not both")
    one_line_error(lambda: trim_vocabulary(loaded, corpus, strategy="optuna", coverage=0.9), "optuna chooses")
    one_line_error(lambda: trim_vocabulary(loaded, corpus, strategy="frequency"), "unknown")
    one_line_error(lambda: trim_vocabulary(loaded, corpus, strategy="optuna", alpha=2), "alpha")
    empty = Corpus("empty-calibration", [Document(keyed("only-test", "test"), "x = 1\n")])
    one_line_error(lambda: trim_vocabulary(loaded, empty, coverage=0.9), "no tokens")
    (tmp_path / "exists").mkdir()
    one_line_error(lambda: save(model, new_tok, report, tmp_path / "exists"), "exists")
    # the input model's folder is refused even with force
    src = tmp_path / "src"
    src.mkdir()
    one_line_error(
        lambda: save(model, new_tok, dataclasses.replace(report, model_path=str(src)), src, force=True), "input model"
    )


def test_byte_fallback_bpe_without_byte_level(corpus):
    # A SentencePiece-style BPE (Metaspace normalisation, <0xNN> byte fallback) trained here on a small text: its
    # alphabet (every token no merge produces, the byte tokens included) is kept, so any text still encodes.
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator([(STDLIB / "textwrap.py").read_text()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    loaded = LoadedModel(tiny_model("llama", vocab_size=len(tok)), tok, None, "sentencepiece-like")
    model, new_tok, report = trim_vocabulary(loaded, corpus, coverage=0.9)
    assert report.kept_vocab < len(tok) == VOCAB_SMALL
    kept = set(report.kept_ids)
    for text in [*TRICKY[:6], (STDLIB / "csv.py").read_text()[:3000]]:
        original = tok.encode(text, add_special_tokens=False)
        ids = new_tok.encode(text, add_special_tokens=False)
        assert new_tok.decode(ids) == tok.decode(original)
        assert new_tok.unk_token_id not in ids or tok.unk_token_id in original
        if set(original) <= kept:
            assert ids == mapped(report, original)


VOCAB_SMALL = 900


def test_non_bpe_tokenizer_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="b")
    loaded = LoadedModel(tiny_model("llama", vocab_size=3), word_level, None, "word-level")
    one_line_error(
        lambda: trim_vocabulary(loaded, Corpus("c", [Document(keyed("d", "calibration"), "a b")]), coverage=0.5),
        "BPE tokenizers only",
    )


def test_cli(tok, corpus, tmp_path):
    from typer.testing import CliRunner

    from domainprune.cli import app

    src = tmp_path / "src"
    tiny("llama", True).save_pretrained(src)
    tok.save_pretrained(src)
    data = tmp_path / "data"
    data.mkdir()
    for n, doc in enumerate(corpus.documents):  # file names (the split keys) chosen to keep the same splits
        name = next(f"d{n}_{i}.txt" for i in range(1000) if split_of(f"d{n}_{i}.txt") == split_of(doc.group))
        (data / name).write_text(doc.text)
    out = tmp_path / "out"
    args = [
        "vocab",
        str(src),
        "--data",
        str(data),
        "--coverage",
        "0.99",
        "--out",
        str(out),
        "--general",
        "",
        "--eval-chars",
        "2000",
        "--seq-len",
        "64",
        "--no-speed",
        "--device",
        "cpu",
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "vocab_report.json").read_text())
    assert saved["calibration_coverage"] >= 0.99 and "domain" in saved["evaluation"]["sources"]
    assert "bits/byte" in result.output
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, DomainpruneError) and "--force" in str(again.exception)
    bad = CliRunner().invoke(app, [*args[:4], "--coverage", "1.5", "--out", str(tmp_path / "o2")])
    assert isinstance(bad.exception, DomainpruneError) and "coverage" in str(bad.exception)
