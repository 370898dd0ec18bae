"""The tokenizer part of a GGUF file, written as llama.cpp's converter writes a byte-level BPE ("gpt2") tokenizer,
or a SentencePiece-style one ("llama": Llama 2, Mistral, Gemma; scores from the merges, see `spm_scores`).

Mirrors `get_vocab_base`, `get_vocab_base_pre` and `_set_vocab_gpt2` in llama.cpp's `conversion/base.py`: every id
below the model's vocabulary size becomes a token (`[PAD{i}]`, type UNUSED, where the tokenizer has none), added
tokens are CONTROL when special (or when they look special) and USER_DEFINED otherwise, `tokenizer.ggml.pre` is
found by hashing the tokenizer's output on the converter's check text, and merges, special-token ids and the chat
template come from gguf-py's own `SpecialVocab` reading the saved tokenizer files.

A trimmed vocabulary (`domainprune vocab`) renumbers tokens, so its hash is not in the converter's table; its
pre-tokenizer is then recognised by its normalizer/pre-tokenizer definition, which trimming leaves unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import DomainpruneError
from .gguf_pretok import CHKTXT, PRE_BY_HASH

# sha256 of the canonical JSON of {"normalizer", "pre_tokenizer"} -> llama.cpp pre-tokenizer name, for tokenizers
# whose check-text hash is unknown only because their vocabulary was trimmed (the definition is the same).
PRE_BY_DEFINITION: dict[str, str] = {
    # SmolLM2 as transformers reads it from the preset's GGUF: ByteLevel(add_prefix_space=False, use_regex=True),
    # no normalizer; its check-text hash is the converter's "smollm" entry
    "11032a73bb79f61a7aa18b0d862909452f989d72cd0fff483463f7aac8ae7b2c": "smollm",
}


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DomainpruneError(
            f"the tokenizer ({type(tokenizer).__name__}) has no fast (tokenizers) backend; GGUF export needs a "
            "byte-level BPE tokenizer.json"
        )
    return json.loads(backend.to_str())


def definition_hash(spec: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def pre_tokenizer_name(tokenizer: Any, spec: dict[str, Any] | None = None) -> str:
    """`tokenizer.ggml.pre` as llama.cpp's converter chooses it (falling back on the definition, see above)."""
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in PRE_BY_HASH:
        return PRE_BY_HASH[chkhsh]
    spec = spec if spec is not None else _backend_json(tokenizer)
    if (name := PRE_BY_DEFINITION.get(definition_hash(spec))) is not None:
        return name
    raise DomainpruneError(
        f"llama.cpp does not know this tokenizer's pre-tokenizer (check hash {chkhsh[:12]}…); export a model whose "
        "tokenizer llama.cpp's convert_hf_to_gguf.py recognises"
    )


def tokenizer_kind(spec: dict[str, Any]) -> str:
    """ "gpt2" (byte-level BPE) or "llama" (BPE with byte fallback over "▁"-escaped text, SentencePiece-style), or a
    one-line refusal."""
    model = spec.get("model") or {}
    kinds = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if model.get("type") == "BPE" and not model.get("byte_fallback") and "ByteLevel" in kinds:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and "\u2581" in kinds and "ByteLevel" not in kinds:
        if not _splits_nothing(spec):
            raise DomainpruneError(
                "this SentencePiece-style tokenizer splits text before BPE, which llama.cpp's SentencePiece "
                f"tokenizer does not; its pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]} cannot export"
            )
        return "llama"
    raise DomainpruneError(
        "only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) and SentencePiece-style BPE ones with "
        f"byte fallback (Llama 2, Mistral, Gemma) export to GGUF here; this one is {model.get('type', '?')}"
    )


def _splits_nothing(spec: dict[str, Any]) -> bool:
    """Whether the pre-tokenizer leaves the normalised text whole, as SentencePiece does: none, a Metaspace that does
    not split, or a split on " " after a normalizer that already turned every space into "▁" (Gemma's)."""
    pre = spec.get("pre_tokenizer")
    if pre is None:
        return True
    if pre.get("type") == "Metaspace":
        return pre.get("split") is False
    replaces = '"Replace", "pattern": {"String": " "}' in json.dumps(spec.get("normalizer"))
    return pre.get("type") == "Split" and pre.get("pattern") == {"String": " "} and replaces


def spm_scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges, among adjacent pieces, the pair forming the highest-scoring
    token first (`llm_tokenizer_spm_session`, src/llama-vocab.cpp); a BPE tokenizer.json merges the pair of lowest
    rank first. So the token a merge of rank r makes gets the score -r, and tokens no merge makes get SentencePiece's
    -1000 (`_create_vocab_sentencepiece` in llama.cpp's converter, for added tokens)."""
    scores = [-1000.0] * len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    for rank, merge in enumerate(spec["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = index.get(left + right)
        if i is not None and scores[i] == -1000.0:
            scores[i] = -float(rank)
    return scores


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2: Prepend; Metaspace with prepend_scheme first/always);
    Gemma does not."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text


def _looks_special(token: str) -> bool:
    """`does_token_look_special` of the converter."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def vocab_tokens(tokenizer: Any, vocab_size: int, byte_fallback: bool = False) -> tuple[list[str], list[int]]:
    """Token strings and gguf token types for ids 0..vocab_size-1 (`get_vocab_base`)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.vocab.items()}
    if reverse and max(reverse) >= vocab_size:
        raise DomainpruneError(f"the tokenizer has ids up to {max(reverse)} but the model only {vocab_size} rows")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes CONTROL/USER_DEFINED tokens are pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        elif i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds a BOS / an EOS, read from what the tokenizer does rather than from its flags."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos


def write_tokenizer(writer: Any, tokenizer: Any, config: Any) -> str:
    """Add the tokenizer's keys to a GGUFWriter; returns the pre-tokenizer name."""
    import gguf

    spec = _backend_json(tokenizer)
    kind = tokenizer_kind(spec)
    pre = pre_tokenizer_name(tokenizer, spec) if kind == "gpt2" else "default"
    tokens, types = vocab_tokens(tokenizer, config.vocab_size, byte_fallback=kind == "llama")
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(spm_scores(spec, tokens))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    with tempfile.TemporaryDirectory(prefix="domainprune-gguf-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "config.json").write_text(config.to_json_string(use_diff=False))
        special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=config.vocab_size)
    if kind == "gpt2" and not special.merges:
        raise DomainpruneError("the tokenizer has no BPE merges; GGUF export needs a byte-level BPE tokenizer.json")
    # llama.cpp tokenises as the HF tokenizer does only if it adds the same BOS/EOS
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    return pre
