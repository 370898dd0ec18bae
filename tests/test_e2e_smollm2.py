"""End to end on the real SmolLM2-135M (GGUF preset, converted once into the test cache), with small settings."""

import json
import math

import pytest
import torch

from domainprune import load_pretrained
from domainprune.measure import heldout_sequences, measure
from domainprune.models import LoadedModel, load_model
from domainprune.run import prune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32", device="cpu")


def test_preset_loads_the_real_model(smollm2):
    c = smollm2.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008


def test_flap_prune_export_reload_and_eval(smollm2, tmp_path):
    import copy

    model = copy.deepcopy(smollm2.model)
    loaded = LoadedModel(model, smollm2.tokenizer, None, "smollm2-135m")
    result = prune(
        loaded,
        data="code",
        method="flap",
        sparsity=0.35,
        calib_samples=8,
        seq_len=64,
        batch_size=4,
        out=tmp_path / "code35",
        progress=False,
    )
    p = result.plan.params
    kept = p.attention_mlp_after / p.attention_mlp_before
    assert abs(kept - 0.65) <= 0.01
    out = tmp_path / "code35"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "plan.json", "recipe.json", "report.json"):
        assert (out / name).is_file(), name
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "flap" and recipe["allocation"] == "global" and recipe["bias_compensation"] is True
    reloaded = load_pretrained(out)
    ids = torch.tensor([[1604, 33662, 24, 104, 727, 472, 1003]])
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # The pruned model is smaller and still a usable code model on held-out code.
    pruned = measure(
        LoadedModel(reloaded, smollm2.tokenizer, out, str(out)),
        "pruned",
        sources=["code"],
        samples=4,
        speed=False,
        progress=False,
    )
    dense = measure(smollm2, "dense", sources=["code"], samples=4, speed=False, progress=False)
    assert pruned.params < 0.75 * dense.params
    assert pruned.checkpoint_bytes < 0.75 * 538_090_408
    assert (
        math.isfinite(pruned.perplexity["code"])
        and dense.perplexity["code"] < pruned.perplexity["code"] < 20 * dense.perplexity["code"]
    )


def test_general_test_split_is_evaluated_whole(smollm2):
    seqs = heldout_sequences("general", smollm2.tokenizer, 128, 256)
    assert seqs.shape == (64, 256)  # the bundled Wikipedia test split holds 64 sequences of 256 tokens
