"""GGUF export, checked with real llama.cpp (llama-cpp-python): for tiny random models of every dense architecture
and for every kind of non-uniform plan, the F32 file run by llama.cpp gives the HF model's logits at every position
of a probe sequence (within 1e-3 of the largest logit); the real SmolLM2 tokenizer, trimmed or not, tokenises a
fixed text set in llama.cpp exactly as in transformers; quantised files load and report their fallback tensors;
exports llama.cpp cannot run fail with one line (CLI exit code 2).

Skipped only where llama-cpp-python is not installed; under CI (the CI variable set) a missing one fails instead.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import pytest
import tiny_pipeline
import torch
from tiny_pipeline import FULL_VOCAB, cli, logits_on

from domainprune.adapters import get_adapter
from domainprune.errors import DomainpruneError
from domainprune.export import load_pretrained
from domainprune.gguf_export import export_gguf, tensor_types
from domainprune.runfolder import save_pruned

if os.environ.get("CI"):
    import llama_cpp  # CI installs the serve extra: a missing llama.cpp must fail there, not skip
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[serve]')")

RTOL = 1e-3


# llama.cpp recognises SmolLM2's pre-tokenizer by how it splits a test text, so these tests keep its whole vocabulary
def smol_tokenizer():
    return tiny_pipeline.smol_tokenizer(full=True)


def tiny_lm(arch: str = "llama", **overrides):
    return tiny_pipeline.tiny_lm(arch, **{"vocab_size": FULL_VOCAB, **overrides})


PROBE = [int(x) for x in torch.randint(0, FULL_VOCAB, (24,), generator=torch.Generator().manual_seed(3))]
D = 48  # hidden size of the tiny models (tests/tiny_models.py): 6 query heads in 2 KV groups of 3, head_dim 8
TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n",
    "class Foo(Base):\n\tdef __init__(self, *args, **kw) -> None:\n\t\tsuper().__init__()\n",
    "  leading, trailing  \n\n\n   \t mixed \r\n whitespace\t\t",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский, emoji 🚀🦙 and 😶‍🌫️",
    "numbers 3 33 333 3333 1234567890 3.14159 1e-5 0x1F",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL ------======= \"\"\"\"......!!!!!!??????",
    'x = {"key": [1, 2, 3], \'s\': None}\nprint(f"{x!r:>10}")\n',
    "<|im_start|>user\nHello<|im_end|>\n",
]


def run_llama(path, ids: list[int] = PROBE) -> np.ndarray:
    """Logits at every position of `ids`, computed by llama.cpp (F32 KV cache, so only the weights' type counts)."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        verbose=False,
        n_threads=1,
        type_k=0,
        type_v=0,  # GGML_TYPE_F32
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def rel_diff(model, path, ids: list[int] = PROBE) -> float:
    ids = [i % model.config.vocab_size for i in ids]  # the CLI runs' tiny models have the tiny tokenizer's vocabulary
    want = logits_on(model, torch.tensor([ids]))[0].double().numpy()
    got = run_llama(path, ids)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def exported(model, tmp_path, name: str = "model", **kw):
    return export_gguf(model, smol_tokenizer(), tmp_path / f"{name}.gguf", **kw)


def check(model, tmp_path, arch: str) -> float:
    r = exported(model, tmp_path)
    assert r.arch == arch
    diff = rel_diff(model, r.path)
    print(f"\n{arch}: llama.cpp logits differ by {diff:.2e} of the largest")  # the figure docs/serve.md reports
    assert diff < RTOL, f"llama.cpp logits differ by {diff:.2e} of the largest"
    return diff


def bias(seed: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


# ----- logits ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,gguf_arch",
    [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma3_text", "gemma3")],
)
def test_dense_model_exports_to_its_own_architecture_with_same_logits(arch, gguf_arch, tmp_path):
    check(tiny_lm(arch), tmp_path, gguf_arch)


def test_gemma3_uniform_pruning_dropped_layer_and_query_scale(tmp_path):
    """Gemma 3 pruned alike in every layer, with a layer dropped (the sliding-window pattern becomes irregular:
    sliding, sliding, full) and a query_pre_attn_scalar that is not head_dim (folded into the q norm)."""
    model = tiny_lm("gemma3_text", query_pre_attn_scalar=20)
    a = get_adapter(model)
    a.keep_layers([0, 2, 3])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    for i in range(a.num_layers):
        a.slice_attention(i, [0, 1, 3, 4], [0, 1])
        a.slice_mlp(i, list(range(24)))
    check(model, tmp_path, "gemma3")


def test_gemma3_per_layer_widths_are_refused_naming_the_option(tmp_path):
    model = tiny_lm("gemma3_text")
    per_layer_heads_and_widths(model)
    with pytest.raises(DomainpruneError, match="--allocation uniform"):
        exported(model, tmp_path)
    assert not list(tmp_path.iterdir())


# llama.cpp renormalises the top-k routing weights for llama (Mixtral) and qwen3moe, not for qwen2moe and olmoe;
# OLMoE's key norm spans the hidden size in llama.cpp, so it runs without GQA only
MOE = {
    "mixtral": ("llama", {}),
    "qwen2_moe": ("qwen2moe", {"norm_topk_prob": False}),
    "qwen3_moe": ("qwen3moe", {"norm_topk_prob": True}),
    "olmoe": ("olmoe", {"norm_topk_prob": False, "num_key_value_heads": 4}),
}


def tiny_moe(arch: str, **overrides):
    from test_moe import tiny_moe

    return tiny_moe(arch, vocab_size=FULL_VOCAB, **{**MOE[arch][1], **overrides})


@pytest.mark.parametrize("arch", list(MOE))
def test_moe_with_equal_expert_counts_runs_in_its_own_architecture(arch, tmp_path):
    """Dense, then 6 of 8 experts kept in every layer and 8 of 16/24 channels of each expert (and 12 of the Qwen2-MoE
    shared expert's 20): llama.cpp's logits equal transformers' both times."""
    model = tiny_moe(arch)
    check(model, tmp_path, MOE[arch][0])
    a = get_adapter(model)
    for i in range(a.num_layers):
        a.slice_experts(i, [0, 1, 2, 3, 5, 7])
        a.slice_expert_channels(i, [list(range(e, e + 8)) for e in range(6)])
        if a.shared_expert(i) is not None:
            a.slice_shared_expert(i, list(range(3, 15)))
    r = exported(model, tmp_path, "pruned")
    assert r.arch == MOE[arch][0] and rel_diff(model, r.path) < RTOL
    types = tensor_types(r.path)
    assert types["blk.0.ffn_gate_inp.weight"] == ("F32", [32, 6])
    assert types["blk.0.ffn_down_exps.weight"][1] == [8, 32, 6]


def test_moe_f16_keeps_the_router_in_f32_and_q8_0_reports_no_router_fallback(tmp_path):
    model = tiny_moe("qwen3_moe")
    types = tensor_types(exported(model, tmp_path, "half", quant="f16").path)
    assert types["blk.0.ffn_gate_inp.weight"][0] == "F32" and types["blk.0.ffn_up_exps.weight"][0] == "F16"
    r = exported(model, tmp_path, "q8", quant="q8_0")
    assert all("ffn_gate_inp" not in name for name, _ in r.fallbacks)
    assert tensor_types(r.path)["blk.0.ffn_up_exps.weight"][0] == "Q8_0"


@pytest.mark.parametrize(
    "arch,overrides,edit,message",
    [
        ("qwen2_moe", {"norm_topk_prob": True}, None, "norm_topk_prob"),
        ("qwen3_moe", {"norm_topk_prob": False}, None, "norm_topk_prob"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, None, "dense layers"),
        ("olmoe", {"num_key_value_heads": 2}, None, "KV heads"),
        ("qwen2_moe", {}, "heads", "query projection"),
        ("mixtral", {}, "widths", "one width"),
    ],
)
def test_moe_refusals(arch, overrides, edit, message, tmp_path):
    model = tiny_moe(arch, **overrides)
    a = get_adapter(model)
    for i in range(a.num_layers):
        if edit == "heads":
            a.slice_attention(i, [0, 1], [0])
        elif edit == "widths":
            a.slice_expert_channels(i, [list(range(8 + 8 * (i % 2)))] * 8)
    with pytest.raises(DomainpruneError, match=message):
        exported(model, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_uniform_pruning_keeps_the_own_architecture(arch, tmp_path):
    """Every layer keeps 4 of 6 query heads (2 per KV group) and 24 of 40 MLP channels: still the stock arch."""
    model = tiny_lm(arch)
    a = get_adapter(model)
    for i in range(a.num_layers):
        a.slice_attention(i, [0, 1, 3, 4], [0, 1])
        a.slice_mlp(i, list(range(0, 40, 2))[:24] + list(range(1, 9, 2)))
    check(model, tmp_path, arch)


def per_layer_heads_and_widths(model) -> None:
    a = get_adapter(model)
    a.slice_attention(0, [0, 1, 3, 4], [0, 1])  # 4 query heads, 2 KV groups
    a.slice_attention(2, [3, 4, 5], [1])  # 3 query heads, 1 KV group
    a.slice_attention(3, [2, 5], [0, 1])  # 2 query heads, 2 KV groups
    a.slice_mlp(0, list(range(0, 40, 3)))
    a.slice_mlp(3, [1, 2, 39])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_per_layer_query_heads_kv_groups_and_mlp_widths_run_as_deci(arch, tmp_path):
    model = tiny_lm(arch)
    per_layer_heads_and_widths(model)
    check(model, tmp_path, "deci")
    types = tensor_types(tmp_path / "model.gguf")
    assert types["blk.2.attn_q.weight"][1] == [D, 3 * 8] and types["blk.2.attn_k.weight"][1] == [D, 8]
    assert types["blk.3.ffn_down.weight"][1] == [3, D]


def test_removed_attention_including_the_first_layer(tmp_path):
    """Layer 0 without attention gets a zero one-head linear attention (llama.cpp takes the head size from layer 0)."""
    model = tiny_lm("llama")
    a = get_adapter(model)
    a.slice_attention(0, [], [])
    a.slice_attention(2, [], [])
    r = exported(model, tmp_path)
    assert r.arch == "deci" and any("linear attention" in n for n in r.notes)
    assert rel_diff(model, r.path) < RTOL


def test_removed_mlp_with_attention_kept_computes_the_attention(tmp_path):
    """deci's n_ff = 0 would drop the attention output; the one zero channel keeps it (and the test fails without:
    the attention output of layer 1 is large)."""
    model = tiny_lm("llama")
    a = get_adapter(model)
    a.slice_mlp(1, [])
    a.slice_mlp(3, [])
    r = exported(model, tmp_path)
    assert rel_diff(model, r.path) < RTOL
    assert tensor_types(r.path)["blk.1.ffn_down.weight"][1] == [1, D]


def test_layer_with_both_sublayers_removed_is_left_out(tmp_path):
    model = tiny_lm("llama")
    a = get_adapter(model)
    a.slice_attention(1, [], [], bias=bias(1))
    a.slice_mlp(1, [], bias=bias(2))
    r = exported(model, tmp_path)
    assert r.arch == "deci" and r.layers == 3
    assert rel_diff(model, r.path) < RTOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dropped_layers_keep_the_own_architecture(arch, tmp_path):
    model = tiny_lm(arch)
    get_adapter(model).keep_layers([0, 2, 3])
    r = exported(model, tmp_path)
    assert (r.arch, r.layers) == (arch, 3)
    assert rel_diff(model, r.path) < RTOL


@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("qwen3", "qwen3"), ("qwen2", "deci")])
def test_hidden_pruning(arch, gguf_arch, tmp_path):
    """42 of 48 residual channels (a multiple of the 6 heads, as LlamaConfig wants); llama.cpp's qwen2 sizes q/o as
    hidden_size, so a Qwen2 whose heads no longer fill it runs as deci."""
    model = tiny_lm(arch)
    get_adapter(model).slice_hidden([c for c in range(D) if c not in (1, 5, 17, 30, 41, 47)])
    check(model, tmp_path, gguf_arch)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_bias_compensation_is_carried_including_removed_sublayers(arch, tmp_path):
    """FLAP-style biases on kept and on removed sublayers (those fold into the previous bias, or the embeddings)."""
    model = tiny_lm(arch)
    a = get_adapter(model)
    a.slice_attention(0, [], [], bias=bias(1))  # before any other sublayer: into the token embeddings
    a.slice_attention(1, [0, 1, 2], [0], bias=bias(2))
    a.slice_mlp(1, [], bias=bias(3))
    a.slice_attention(2, [], [], bias=bias(4))
    a.slice_mlp(2, list(range(17)), bias=bias(5))
    a.slice_mlp(3, list(range(30)), bias=bias(6))
    a.ensure_output_biases()
    check(model, tmp_path, "deci")


def test_uniform_llama_bias_compensation_stays_llama(tmp_path):
    model = tiny_lm("llama")
    a = get_adapter(model)
    for i in range(a.num_layers):
        a.slice_attention(i, [0, 1, 3, 4], [0, 1], bias=bias(i))
        a.slice_mlp(i, list(range(24)), bias=bias(10 + i))
    a.ensure_output_biases()
    check(model, tmp_path, "llama")


def trimmed(model, tok, texts: list[str] = TEXTS):
    """The model and tokenizer trimmed to the tokens of `texts` (with their merge ancestry and the always-kept set)."""
    from domainprune.vocab import BPEInfo, always_kept, keep_order, trim_model, trim_tokenizer

    info = BPEInfo.of(tok)
    counts = np.zeros(FULL_VOCAB, dtype=np.int64)
    for t in texts:
        np.add.at(counts, tok.encode(t, add_special_tokens=False), 1)
    order, _ = keep_order(counts, info, set().union(*always_kept(info, tok, model).values()))
    used = set(np.flatnonzero(counts).tolist())
    last = max(i for i, t in enumerate(order.tolist()) if t in used)
    kept = sorted(order[: last + 1].tolist())
    return trim_model(model, kept), trim_tokenizer(tok, kept, info), kept


def test_trimmed_vocabulary_logits_and_tokens(tmp_path):
    tok = smol_tokenizer()
    model, small_tok, kept = trimmed(tiny_lm("llama"), tok)
    assert len(kept) < 2000
    r = export_gguf(model, small_tok, tmp_path / "trim.gguf")
    assert r.pre_tokenizer == "smollm"
    ids = small_tok.encode(TEXTS[0], add_special_tokens=False)
    assert rel_diff(model, r.path, ids) < RTOL
    assert_same_tokens(r.path, small_tok)


# ----- tokenizer -------------------------------------------------------------------------------------------------


def assert_same_tokens(path, tok, texts: list[str] = TEXTS) -> None:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            want = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        # what a chat/completion call does: llama.cpp adds a BOS exactly when the HF tokenizer does
        assert llm.tokenize(b"hi", add_bos=True, special=False) == tok.encode("hi")
    finally:
        llm.close()


@lru_cache(maxsize=None)
def sentencepiece_style_tokenizer(style: str):
    """A real BPE tokenizer with byte fallback over "▁"-escaped text, trained by `tokenizers` on 100 files of the
    bundled code corpus, in the three layouts SentencePiece models take in tokenizer.json: Llama 2 (Prepend + Replace
    normalizer, BOS added), Gemma (Replace only, no space prefix) and Metaspace (newer Llama/Mistral conversions).
    Pieces are numbered as SentencePiece numbers them: <unk> <s> </s>, the 256 byte pieces, then the learned ones."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from domainprune.data import load_code

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", "merged_with_previous")  # training only: merges within lines
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False, max_token_length=16)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.train_from_iterator([d.text for d in load_code().documents[:100]], trainer)
    spec = json.loads(tok.to_str())
    learned = sorted((t for t in spec["model"]["vocab"] if t not in specials), key=spec["model"]["vocab"].get)
    order = specials + [f"<0x{i:02X}>" for i in range(256)] + learned
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in spec["added_tokens"]:
        added["id"] = order.index(added["content"])
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = None
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif style == "metaspace":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_that_splits_before_bpe_is_refused(tmp_path):
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(sentencepiece_style_tokenizer("gemma"))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=True)
    with pytest.raises(DomainpruneError, match="splits text before BPE"):
        export_gguf(tiny_lm("llama", vocab_size=len(tok)), tok, tmp_path / "split.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("style", ["llama2", "gemma", "metaspace"])
def test_sentencepiece_style_tokenizer_tokenises_like_transformers(style, tmp_path):
    """llama.cpp's SentencePiece tokenizer ("llama" model: merges by score, byte fallback) tokenises the fixed text
    set and 40 held-out code snippets exactly as the HF tokenizer does; a tiny model's logits agree as well."""
    from domainprune.data import load_code

    tok = sentencepiece_style_tokenizer(style)
    model = tiny_lm("llama", vocab_size=len(tok))
    r = export_gguf(model, tok, tmp_path / "spm.gguf")
    assert r.pre_tokenizer == "default"
    texts = TEXTS + [d.text[:1500] for d in load_code().documents[400:440]]
    if style == "metaspace":  # HF's Metaspace adds no "▁" before a text that starts with a space; llama.cpp does
        texts = [t for t in texts if not t.startswith(" ")]
    assert_same_tokens(r.path, tok, texts)
    ids = tok.encode(TEXTS[0])
    assert rel_diff(model, r.path, ids) < RTOL
    llm = llama_cpp.Llama(model_path=str(r.path), vocab_only=True, verbose=False)
    try:  # byte-fallback pieces decode to the bytes they stand for
        ids = tok.encode("naïve 日本 🚀", add_special_tokens=False)
        # llama-cpp-python's detokenize joins token_to_piece outputs, without llama_detokenize's removal of the
        # space prefix (src/llama-vocab.cpp, `remove_space`)
        assert llm.detokenize(ids).decode().removeprefix(" ") == tok.decode(ids) == "naïve 日本 🚀"
    finally:
        llm.close()


def test_smollm2_tokenizer_tokenises_like_transformers(tmp_path):
    tok = smol_tokenizer()
    r = exported(tiny_lm("llama"), tmp_path)
    assert r.pre_tokenizer == "smollm"
    assert_same_tokens(r.path, tok)
    llm = llama_cpp.Llama(model_path=str(r.path), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
        assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
        assert meta["tokenizer.chat_template"] == tok.chat_template
    finally:
        llm.close()


# ----- quantisation ----------------------------------------------------------------------------------------------


def test_q8_0_loads_close_to_f32_and_reports_fallbacks(tmp_path):
    """Rows of 48 (hidden) or 17 channels are not multiples of Q8_0's 32-block: llama.cpp stores them as F16, and
    the report lists exactly the 2-D weights whose row length is not a multiple of 32."""
    model = tiny_lm("llama")
    a = get_adapter(model)
    a.slice_mlp(1, list(range(17)))
    r = exported(model, tmp_path, quant="q8_0")
    types = tensor_types(r.path)
    odd = {n for n, (_, shape) in types.items() if sum(x > 1 for x in shape) == 2 and shape[0] % 32}
    assert {n for n, _ in r.fallbacks} == odd and odd
    assert all(t == "F16" for _, t in r.fallbacks)
    assert rel_diff(model, r.path) < 2e-2


def test_q4_k_m_on_block_multiples(tmp_path):
    """Widths that are multiples of 256 keep Q4_K_M's own types; one layer's 40 MLP channels (not even a multiple
    of 32) make exactly its ffn_down fall back, to F16. Four-bit logits follow the HF ones (weights drawn smaller
    than the other tests' so that 4-bit rounding does not flip the random model's attention: corr 0.955 measured)."""
    model = tiny_lm(
        "llama", hidden_size=256, head_dim=32, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    get_adapter(model).slice_mlp(1, list(range(40)))
    r = exported(model, tmp_path, quant="q4_k_m")
    types = tensor_types(r.path)
    assert r.fallbacks == [("blk.1.ffn_down.weight", "F16")]
    assert types["blk.0.attn_q.weight"][0] == "Q4_K" and types["blk.0.ffn_down.weight"][0] in ("Q4_K", "Q6_K")
    want = logits_on(model, torch.tensor([PROBE]))[0].double().numpy().ravel()
    got = run_llama(r.path).ravel()
    assert np.corrcoef(want, got)[0, 1] > 0.9


# ----- refusals --------------------------------------------------------------------------------------------------


def save_run(model, root, name: str = "run"):
    return save_pruned(model, smol_tokenizer(), root / name, verify=False)


def test_cli_export_of_a_flap_run_matches_load_pretrained(capsys, tmp_path):
    """A real `prune` output (FLAP global 35 %: per-layer widths and compensation biases) through the CLI."""
    from tiny_runs import build_runs

    runs = build_runs(tmp_path / "runs")
    out = tmp_path / "flap35.gguf"
    code, _, err = cli(capsys, "export", runs["flap35"], "--to", "gguf", "--out", out, "--quiet")
    assert code == 0, err
    model = load_pretrained(runs["flap35"])
    assert rel_diff(model, out) < RTOL
    code, _, err = cli(capsys, "export", runs["flap35"], "--out", out, "--quiet")
    assert code == 2 and "exists" in err and "--force" in err and len(err.strip().splitlines()) == 1


def test_prune_export_stage_writes_the_gguf_beside_the_run_folder(capsys, tmp_path):
    from tiny_runs import build_runs

    runs = build_runs(tmp_path / "runs")
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--model",
        runs["dense"],
        "--data",
        runs["corpus"],
        "--method",
        "flap",
        "--sparsity",
        "0.35",
        "--calib-samples",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--out",
        out,
        "--quiet",
    ]
    assert "gguf:q4_k_m" in one_line_error(capsys, *args, "--export", "onnx")
    assert not out.exists()  # refused before any work
    code, _, err = cli(capsys, *args, "--export", "gguf:f32")
    assert code == 0, err
    assert rel_diff(load_pretrained(out), tmp_path / "pruned.f32.gguf") < RTOL


def one_line_error(capsys, *args) -> str:
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_cli_refusals(capsys, tmp_path):
    model = tiny_lm("qwen3")
    per_layer_heads_and_widths(model)
    run = save_run(model, tmp_path, "qwen3")
    assert "--allocation uniform" in one_line_error(capsys, "export", run, "--out", tmp_path / "q.gguf")
    unknown = one_line_error(capsys, "export", run, "--to", "onnx", "--out", tmp_path / "q.gguf")
    assert "unknown exporter 'onnx'; available: gguf, hf, vllm" in unknown
    assert "q4_k_m" in one_line_error(capsys, "export", run, "--quant", "q3_x", "--out", tmp_path / "q.gguf")
    assert "input" in one_line_error(capsys, "export", run, "--out", run / "inside.gguf", "--force")
    assert "input" in one_line_error(capsys, "export", run, "--out", run, "--force")
    assert not (tmp_path / "q.gguf").exists() and not list(tmp_path.glob(".q.gguf*"))


def test_qwen3_compensation_bias_is_refused_naming_the_option(tmp_path):
    model = tiny_lm("qwen3")
    a = get_adapter(model)
    for i in range(a.num_layers):
        a.slice_mlp(i, list(range(20)), bias=bias(i))
    with pytest.raises(DomainpruneError, match="--no-bias-compensation"):
        exported(model, tmp_path)


def test_unequal_expert_counts_are_refused(capsys, tmp_path):
    from test_moe import tiny_moe

    model = tiny_moe("mixtral", vocab_size=FULL_VOCAB)
    get_adapter(model).slice_experts(0, [0, 1, 2, 3, 4, 5])
    run = save_run(model, tmp_path)
    assert "expert count" in one_line_error(capsys, "export", run, "--out", tmp_path / "m.gguf")


# ----- the real SmolLM2 ------------------------------------------------------------------------------------------


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding one token at a time through llama.cpp's KV cache (batch 1, as a server decodes)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def llama_nll(llm, seqs: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over the sequences, from llama.cpp's logits."""
    total, count = 0.0, 0
    for seq in seqs.tolist():
        llm.reset()
        llm.eval(seq)
        logits = np.array(llm.scores[: len(seq) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(seq) - 1), seq[1:]]).sum())
        count += len(seq) - 1
    return total / count


@pytest.mark.slow
def test_smollm2_cfsp_obs_35_greedy_continuations_and_q8_0_perplexity(tmp_path):
    """SmolLM2 pruned with --method cfsp --reconstruct obs --sparsity 0.35 (per-layer widths: deci): llama.cpp's
    greedy 32-token continuations of three held-out code prompts equal transformers' (F32), and Q8_0's test
    perplexity is within 2 % of F32's (both in llama.cpp)."""
    from domainprune.generation import domain_prompts
    from domainprune.measure import heldout_sequences
    from domainprune.models import load_model
    from domainprune.run import prune

    dense = load_model("smollm2-135m", dtype="float32", device="cpu")
    result = prune(
        dense,
        data="code",
        method="cfsp",
        reconstruct="obs",
        sparsity=0.35,
        calib_samples=8,
        seq_len=64,
        batch_size=4,
        out=tmp_path / "cfsp35",
        progress=False,
    )
    model, tok = load_pretrained(result.out), dense.tokenizer
    f32 = export_gguf(model, tok, tmp_path / "f32.gguf")
    q8 = export_gguf(model, tok, tmp_path / "q8.gguf", quant="q8_0")
    assert f32.arch == "deci" and f32.layers == 30
    llm = llama_cpp.Llama(
        model_path=str(f32.path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0
    )
    try:
        for prompt in domain_prompts("code"):
            ids = tok(prompt).input_ids
            with torch.inference_mode():
                want = model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=32,
                    min_new_tokens=32,
                    do_sample=False,
                )[0, len(ids) :].tolist()
            assert llama_greedy(llm, ids, 32) == want, prompt
        seqs = heldout_sequences("code", tok, 8, 256)
        nll_f32 = llama_nll(llm, seqs)
    finally:
        llm.close()
    llm = llama_cpp.Llama(model_path=str(q8.path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    try:
        nll_q8 = llama_nll(llm, seqs)
    finally:
        llm.close()
    print(
        f"\nSmolLM2 cfsp+obs 35 %: code perplexity F32 {math.exp(nll_f32):.3f}, Q8_0 {math.exp(nll_q8):.3f}; "
        f"fallbacks {len(q8.fallbacks)}; sizes {f32.bytes / 1e6:.1f} / {q8.bytes / 1e6:.1f} MB"
    )
    assert abs(math.exp(nll_q8 - nll_f32) - 1) < 0.02
