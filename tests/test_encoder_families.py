"""Encoder families beyond BERT: XLM-RoBERTa (BERT's layout, positions offset by padding_idx) and ModernBERT
(fused Wqkv, GLU MLP, alternating global / sliding-window attention, no biases).

Tiny random-initialised real transformers models (XLMRobertaModel, ModernBertModel) with the bundled MiniLM's real
tokenizer and pooling modules: removal of zero-contribution units, export -> reload (stock SentenceTransformer when
uniform, domainprune.load_pretrained otherwise), every criterion end to end."""

import json

import pytest
import torch
from tiny_encoders import sentence_folder

from domainprune import load_pretrained
from domainprune.encoders.criteria import CRITERIA, Calibration, get_criterion
from domainprune.encoders.export import probe_embeddings, save_encoder
from domainprune.encoders.model import BertUnits, ModernBertUnits, encoder_units, load_encoder
from domainprune.encoders.pipeline import EncoderRecipe, apply_plan, plan_units
from domainprune.errors import DomainpruneError

FAMILIES = ("xlm-roberta", "modernbert")
HIDDEN, HEADS, FFN, LAYERS = 32, 4, 48, 3


def _config(family: str):
    from transformers import ModernBertConfig, XLMRobertaConfig

    common = dict(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    common.update(intermediate_size=FFN, pad_token_id=0)  # MiniLM's tokenizer pads with 0
    if family == "xlm-roberta":  # positions start at padding_idx + 1, so 64 tokens need 66 positions
        return XLMRobertaConfig(**common, max_position_embeddings=66, type_vocab_size=1)
    # layers 0 and 2 global, layer 1 sliding (window of 8 < the probes' length: the layer types matter)
    return ModernBertConfig(
        **common,
        max_position_embeddings=64,
        global_attn_every_n_layers=2,
        local_attention=8,
        bos_token_id=101,
        eos_token_id=102,
        cls_token_id=101,
        sep_token_id=102,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory):
    from transformers import AutoModel

    family = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    torch.manual_seed(0)
    return family, sentence_folder(AutoModel.from_config(_config(family)), folder, HIDDEN)


@pytest.fixture
def tiny(family_folder):
    return family_folder[0], load_encoder(family_folder[1])


def _silence_head(units: BertUnits, i: int, head: int) -> None:
    """Zero the head's value rows: its output, hence its contribution, is zero."""
    hd = units.head_dim
    rows = slice(head * hd, (head + 1) * hd)
    with torch.no_grad():
        if isinstance(units, ModernBertUnits):
            n = units.heads(i) * hd
            units.layers[i].attn.Wqkv.weight[2 * n :][rows] = 0
        else:
            units.layers[i].attention.self.value.weight[rows] = 0
            units.layers[i].attention.self.value.bias[rows] = 0


def _silence_layer(units: BertUnits, i: int) -> None:
    """Make layer i the identity: zero output projections (and, post-norm BERT layout, plain LayerNorms)."""
    with torch.no_grad():
        for linear in (units.attn_out(i), units.ffn_out(i)):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
        if not isinstance(units, ModernBertUnits):  # post-norm: the norms around the layer must be identities
            for ln in (
                units.layers[i - 1].output.LayerNorm,
                units.layers[i].attention.output.LayerNorm,
                units.layers[i].output.LayerNorm,
            ):
                ln.weight.fill_(1)
                ln.bias.zero_()


def test_registry_picks_the_family(tiny):
    family, model = tiny
    units = encoder_units(model)
    assert isinstance(units, ModernBertUnits) == (family == "modernbert")
    assert (units.num_layers(), units.heads(0), units.channels(0), units.head_dim) == (LAYERS, HEADS, FFN, 8)
    # the parameter bookkeeping matches the real modules
    for i in range(units.num_layers()):
        counted = sum(p.numel() for n, p in units.layers[i].named_parameters() if "norm" not in n.lower())
        assert units.layer_params(i) == counted


def test_zero_contribution_heads_and_channels(tiny):
    _, model = tiny
    units = encoder_units(model)
    _silence_head(units, 1, 2)
    with torch.no_grad():
        units.ffn_out(0).weight[:, [5, 7]] = 0
    before = probe_embeddings(model)
    units.keep_heads(1, [0, 1, 3])
    units.keep_channels(0, [c for c in range(FFN) if c not in (5, 7)])
    assert units.heads(1) == 3 and units.channels(0) == FFN - 2
    assert torch.allclose(probe_embeddings(model), before, atol=1e-6)
    units.keep_heads(2, [0])  # a real head removal does change the embeddings
    assert not torch.allclose(probe_embeddings(model), before, atol=1e-3)


def test_zero_contribution_layer(tiny):
    family, model = tiny
    units = encoder_units(model)
    _silence_layer(units, 1)
    before = probe_embeddings(model)
    units.keep_layers([0, 2])
    assert units.num_layers() == 2 and model[0].auto_model.config.num_hidden_layers == 2
    if family == "modernbert":  # the kept layers keep their own attention types
        assert model[0].auto_model.config.layer_types == ["full_attention", "full_attention"]
        with pytest.raises(DomainpruneError, match="first layer"):
            units.keep_layers([1])
    assert torch.allclose(probe_embeddings(model), before, atol=1e-5)


def test_export_reload_stock_and_per_layer(tiny, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    family, model = tiny
    units = encoder_units(model)
    for i in range(units.num_layers()):  # the same FFN width everywhere, every head kept: a stock config
        units.keep_channels(i, list(range(0, FFN, 2)))
    units.keep_layers([0, 1])
    assert units.stock_loadable()
    expected = probe_embeddings(model)
    save_encoder(model, tmp_path / "uniform")
    stock = SentenceTransformer(str(tmp_path / "uniform"), device="cpu")
    assert torch.equal(probe_embeddings(stock), expected)
    auto = AutoModel.from_pretrained(tmp_path / "uniform")
    assert auto.config.model_type == family
    assert auto.config.intermediate_size == FFN // 2 and auto.config.num_hidden_layers == 2

    units.keep_heads(0, [1, 3])  # fewer heads: no stock config can say so
    units.keep_channels(1, list(range(10)))
    assert not units.stock_loadable()
    expected = probe_embeddings(model)
    save_encoder(model, tmp_path / "heads")
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["domainprune"]["encoder_layers"] == [
        {"heads": 2, "intermediate": FFN // 2},
        {"heads": HEADS, "intermediate": 10},
    ]
    with pytest.raises(Exception):  # stock loaders refuse rather than misload
        SentenceTransformer(str(tmp_path / "heads"), device="cpu")
    reloaded = load_pretrained(tmp_path / "heads")  # one call
    assert torch.equal(probe_embeddings(reloaded), expected)


@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_every_criterion_prunes_the_family(tiny, method):
    family, model = tiny
    pairs = [(f"return item {i} of the list", f"def item_{i}(xs): return xs[{i}]") for i in range(6)]
    general = [(f"who founded city {i}", f"City {i} was founded by person {i}.") for i in range(6)]
    calib = Calibration([t for p in pairs for t in p], pairs, general, batch_size=3)
    scores = get_criterion(method).score(model, calib)
    units = encoder_units(model)
    before = units.attention_mlp_params()
    recipe = EncoderRecipe(model="tiny", sparsity=0.35, method=method)
    apply_plan(units, plan_units(units, scores, recipe))
    after = units.attention_mlp_params()
    if method == "shortgpt":
        assert units.num_layers() == LAYERS - 1 and after == before * (LAYERS - 1) // LAYERS
    else:
        assert all(units.heads(i) == 3 for i in range(LAYERS))  # round(4 · 0.65)
        assert abs(1 - after / before - 0.35) < 0.02
    assert torch.isfinite(probe_embeddings(model)).all()


def test_compensation_needs_biases(family_folder):
    family, folder = family_folder
    model = load_encoder(folder)
    units = encoder_units(model)
    plan = {"layers": [{"heads": [0, 1, 2], "channels": list(range(40))} for _ in range(LAYERS)]}
    if family == "modernbert":  # no biases by default: refused before any work
        with pytest.raises(DomainpruneError, match="biases"):
            apply_plan(units, plan, "bias", ["a text"], 2)
    else:  # BERT's layout: compensation works as for BERT
        apply_plan(units, plan, "bias", ["def f(): pass", "a sentence about Paris"], 2)
        assert units.heads(0) == 3 and units.channels(0) == 40


def test_cli_prune_eval_recover(family_folder, tmp_path):
    from typer.testing import CliRunner

    from domainprune.cli import app

    family, folder = family_folder
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"query": f"how do I compute item {i}", "positive": f"def item_{i}(): return {i} * {i}", "group": f"f{i}"}
        for i in range(80)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["prune", "--model", str(folder), "--data", str(data), "--method", "wanda-sp", "--sparsity", "0.4"]
    r = runner.invoke(app, [*args, "--allocation", "global", "--calib-samples", "16", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity_achieved"] - 0.4) < 0.02
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    r = runner.invoke(app, ["eval", str(out), "--data", str(data), "--json", str(tmp_path / "e.json"), "-q"])
    assert r.exit_code == 0, r.output
    figures = json.loads((tmp_path / "e.json").read_text())["results"][0]["tasks"][str(data)]
    assert figures["queries"] > 0 and 0 <= figures["ndcg@10"] <= 1
    rec = ["recover", str(out), "--out", str(tmp_path / "rec"), "--data", str(data), "--max-steps", "2"]
    r = runner.invoke(app, [*rec, "--batch-size", "4", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rec" / "recover.json").read_text())["steps"] == 2
    assert encoder_units(load_pretrained(tmp_path / "rec")).per_layer() == report["per_layer"]


def test_gguf_export_is_bert_only(family_folder, tmp_path):
    from domainprune.encoders.gguf import export_encoder_gguf

    family, folder = family_folder
    with pytest.raises(DomainpruneError, match=f"{family} is not bert"):
        export_encoder_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
