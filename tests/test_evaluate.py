import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from domainprune.errors import DomainpruneError
from domainprune.evaluate import checkpoint_bytes, nll, parameter_count, perplexity, throughput

VOCAB = 64


def tiny_llama(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return torch.randint(VOCAB, (5, 17), generator=torch.Generator().manual_seed(1))


def test_nll_matches_cross_entropy_by_hand(model, sequences):
    total, count = nll(model, sequences, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(sequences).logits
    expected = sum(
        F.cross_entropy(logits[i, :-1], sequences[i, 1:], reduction="sum").item() for i in range(len(sequences))
    )
    assert count == 5 * 16
    assert isinstance(total, float)
    assert total == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, sequences, progress=False) == pytest.approx(math.exp(expected / count), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(model, sequences):
    ppls = [perplexity(model, sequences, batch_size=b, progress=False) for b in (1, 3, 8)]
    assert ppls[1] == pytest.approx(ppls[0], rel=1e-5)
    assert ppls[2] == pytest.approx(ppls[0], rel=1e-5)


@pytest.mark.parametrize(
    "bad", [torch.zeros(4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 5)]
)
def test_nll_rejects_malformed_sequences(model, bad):
    with pytest.raises(DomainpruneError):
        nll(model, bad, progress=False)


def test_throughput_reports_positive_rates(model):
    result = throughput(model, prompt_len=8, new_tokens=6, prefill_len=16, repeats=2)
    assert result["decode_tokens_per_s"] > 0
    assert result["prefill_tokens_per_s"] > 0
    # decode speed is the median gap between new tokens: one of them, shorter than a whole generate call
    assert result["decode_tokens_per_s"] == pytest.approx(1 / result["decode_step_s"])
    assert 0 < result["decode_step_s"] < result["decode_s"]
    assert result["prefill_tokens_per_s"] == pytest.approx(16 / result["prefill_s"])
    with pytest.raises(DomainpruneError, match="new_tokens must be at least 2"):
        throughput(model, new_tokens=1)


def test_parameter_count_counts_tied_embeddings_once():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    embedding = VOCAB * 32
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert parameter_count(untied) == parameter_count(tied) + embedding
    # A storage shared by two distinct Parameter objects is still counted once.
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.data)
    assert parameter_count(untied) == parameter_count(tied)


def test_checkpoint_bytes_sums_safetensors(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_bytes(tmp_path) == 15
    with pytest.raises(DomainpruneError, match="not a folder"):
        checkpoint_bytes(tmp_path / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DomainpruneError, match="no \\*.safetensors"):
        checkpoint_bytes(tmp_path / "empty")
