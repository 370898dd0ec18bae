"""Sentence encoders: physical removal of heads, FFN channels and layers, export/reload, retrieval metrics, errors.

A tiny random-initialised BertModel (real transformers class, the bundled MiniLM's real tokenizer and pooling
modules) for structure; the real all-MiniLM-L6-v2 where noted."""

import json
import math
from dataclasses import replace

import pytest
import torch
from tiny_encoders import sentence_folder
from typer.testing import CliRunner

from domainprune.cli import app
from domainprune.encoders import retrieval
from domainprune.encoders.allocate import ALLOCATIONS, uniform_widths
from domainprune.encoders.compensate import correction, first_layer_inputs, input_gram
from domainprune.encoders.criteria import CRITERIA, Calibration, LayerScores, get_criterion
from domainprune.encoders.export import probe_embeddings, save_encoder
from domainprune.encoders.model import BertUnits, load_encoder
from domainprune.encoders.pipeline import EncoderRecipe, apply_plan, plan_units, prune_encoder
from domainprune.errors import DomainpruneError

TEXTS = [
    "def add(a, b): return a + b",
    "Return the sum of two numbers.",
    "Paris is the capital of France.",
    "class Stack: pass",
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A sentence-transformers folder: tiny random BertModel + the MiniLM tokenizer, mean pooling, normalize."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return sentence_folder(BertModel(config, add_pooling_layer=False), folder, 32)


@pytest.fixture
def tiny(tiny_folder):
    return load_encoder(tiny_folder)


def test_zero_contribution_removal_tiny(tiny):
    units = BertUnits(tiny)
    layer = units.layers[1]
    hd = units.head_dim
    with torch.no_grad():  # head 2 of layer 1 and FFN channels 5, 7 of layer 0 contribute nothing
        layer.attention.self.value.weight[2 * hd : 3 * hd] = 0
        layer.attention.self.value.bias[2 * hd : 3 * hd] = 0
        units.layers[0].output.dense.weight[:, [5, 7]] = 0
    before = probe_embeddings(tiny)
    units.keep_heads(1, [0, 1, 3])
    units.keep_channels(0, [c for c in range(48) if c not in (5, 7)])
    assert units.heads(1) == 3 and units.channels(0) == 46
    after = probe_embeddings(tiny)
    assert torch.allclose(after, before, atol=1e-6)
    units.keep_heads(2, [0])  # a real head removal does change the embeddings
    assert not torch.allclose(probe_embeddings(tiny), before, atol=1e-3)


def test_zero_contribution_layer_removal_tiny(tiny):
    units = BertUnits(tiny)
    with torch.no_grad():  # layer 2 adds nothing and the LayerNorms around it are plain normalisations
        for ln in (
            units.layers[1].output.LayerNorm,
            units.layers[2].attention.output.LayerNorm,
            units.layers[2].output.LayerNorm,
        ):
            ln.weight.fill_(1)
            ln.bias.zero_()
        for dense in (units.layers[2].attention.output.dense, units.layers[2].output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
    before = probe_embeddings(tiny)
    units.keep_layers([0, 1])
    assert units.num_layers() == 2 and tiny[0].auto_model.config.num_hidden_layers == 2
    assert torch.allclose(probe_embeddings(tiny), before, atol=1e-5)


def test_zero_contribution_removal_real_minilm():
    model = load_encoder("all-minilm-l6-v2")
    units = BertUnits(model)
    assert (units.num_layers(), units.heads(0), units.channels(0), units.head_dim) == (6, 12, 1536, 32)
    with torch.no_grad():
        units.layers[3].attention.self.value.weight[5 * 32 : 6 * 32] = 0
        units.layers[3].attention.self.value.bias[5 * 32 : 6 * 32] = 0
        units.layers[4].output.dense.weight[:, :100] = 0
    before = probe_embeddings(model)
    units.keep_heads(3, [h for h in range(12) if h != 5])
    units.keep_channels(4, list(range(100, 1536)))
    assert torch.allclose(probe_embeddings(model), before, atol=1e-6)


def test_export_reload_stock_and_per_layer(tiny, tiny_folder, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from domainprune import load_pretrained

    units = BertUnits(tiny)
    for i in range(units.num_layers()):  # the same FFN width everywhere, every head kept: a stock config
        units.keep_channels(i, list(range(0, 48, 2)))
    units.keep_layers([0, 2])
    assert units.stock_loadable()
    expected = probe_embeddings(tiny)
    save_encoder(tiny, tmp_path / "uniform")
    stock = SentenceTransformer(str(tmp_path / "uniform"), device="cpu")
    assert torch.equal(probe_embeddings(stock), expected)
    auto = AutoModel.from_pretrained(tmp_path / "uniform")
    assert auto.config.intermediate_size == 24 and auto.config.num_hidden_layers == 2

    units.keep_heads(0, [1, 3])  # fewer heads: no stock BertConfig can say so
    assert not units.stock_loadable()
    expected = probe_embeddings(tiny)
    save_encoder(tiny, tmp_path / "heads")
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["domainprune"]["encoder_layers"] == [
        {"heads": 2, "intermediate": 24},
        {"heads": 4, "intermediate": 24},
    ]
    with pytest.raises(Exception):  # stock loaders refuse rather than misload
        SentenceTransformer(str(tmp_path / "heads"), device="cpu")
    reloaded = load_pretrained(tmp_path / "heads")
    assert torch.equal(probe_embeddings(reloaded), expected)
    with pytest.raises(DomainpruneError, match="exists"):
        save_encoder(tiny, tmp_path / "heads")


def test_rank_metrics_by_hand():
    # 3 queries over 4 passages; query 0's relevant passage ranks 2nd, query 1 has two relevant (1st and 3rd),
    # query 2's relevant passage is outside the top 2 (k=2).
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.7, 0.1, 0.5, 0.0], [0.9, 0.8, 0.7, 0.1]])
    relevant = [{1}, {0, 2}, {3}]
    got = retrieval.rank_metrics(scores, relevant, k=2)
    ndcg = [(1 / math.log2(3)) / 1, (1 + 1 / math.log2(3)) / (1 + 1 / math.log2(3)), 0.0]
    assert got["ndcg@2"] == pytest.approx(sum(ndcg) / 3)
    assert got["mrr@2"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def _write_pairs(path, n=60, groups=30):
    rows = [
        {
            "query": f"how do I compute item {i} of the sequence",
            "positive": f"def item_{i}(): return {i} * {i}",
            "negatives": [f"unrelated text number {i}"],
            "group": f"file{i % groups}.py",
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl_split_and_toy_evaluation(tiny, tmp_path):
    pairs = retrieval.load_pairs(str(_write_pairs(tmp_path / "pairs.jsonl")))
    assert len(pairs) == 60 and pairs[0].negatives == ("unrelated text number 0",)
    splits = {s: retrieval.build_split("toy", pairs, s) for s in ("calibration", "validation")}
    assert sum(len(s.queries) for s in splits.values()) == 60  # split by group (file), as the code preset does
    assert {p.group for p in splits["validation"].pairs}.isdisjoint({p.group for p in splits["calibration"].pairs})
    with pytest.raises(DomainpruneError, match="no pair in its test split"):
        retrieval.build_split("toy", pairs, "test")
    for s in splits.values():  # every passage, negatives included, is in the split's corpus; positives relevant
        assert len(s.passages) == 2 * len(s.queries)
        assert all(s.passages[next(iter(r))].startswith("def item_") for r in s.relevant)
    result = retrieval.evaluate(tiny, splits["calibration"])
    assert 0 <= result["ndcg@10"] <= 1 and 0 <= result["mrr@10"] <= 1 and result["sentences_per_s"] > 0


@pytest.mark.parametrize(
    "line, fix",
    [
        ('{"query": "q"}', "needs string fields"),
        ('{"query": "q", "positive": "p", "negatives": "n"}', "must be a list of strings"),
        ("not json", "is not JSON"),
    ],
)
def test_bad_jsonl_one_line(tmp_path, line, fix):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DomainpruneError, match=fix) as e:
        retrieval.load_pairs(str(path))
    assert "\n" not in str(e.value) and "line 1" in str(e.value)


def test_every_criterion_scores_every_unit(tiny):
    calib = Calibration(TEXTS, [(t, t.upper()) for t in TEXTS], [(t[::-1], t) for t in TEXTS], batch_size=4)
    for name in sorted(CRITERIA):
        scores = get_criterion(name).score(tiny, calib)
        if CRITERIA[name].scores_layers:
            assert scores.shape == (3,) and torch.isfinite(scores).all()
            continue
        assert len(scores) == 3, name
        for s in scores:
            assert s.heads.shape == (4,) and s.channels.shape == (48,), name
            assert torch.isfinite(s.heads).all() and torch.isfinite(s.channels).all(), name
            assert s.channels.std() > 0, name  # a criterion that cannot tell channels apart is broken


def test_uniform_widths_meet_the_budget(tiny):
    units = BertUnits(tiny)
    heads, channels = uniform_widths(units, 0.5, "all")
    assert heads == 2
    kept = heads * units.head_params() + channels * units.channel_params() + 2 * 32
    assert abs(kept / units.layer_params(0) - 0.5) < units.channel_params() / units.layer_params(0)
    assert uniform_widths(units, 0.3, "ffn")[0] == 4
    with pytest.raises(DomainpruneError, match="FFN channels alone"):
        uniform_widths(units, 0.9, "ffn")


CALIB = [
    "def add(a, b): return a + b",
    "Return the sum of two numbers.",
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()",
    "Split a configuration line into its key and value.",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)",
    "Push an item on top of the stack.",
    "for i in range(10): print(i * i)",
    "Print the first ten squares.",
]


@pytest.mark.parametrize("how", ["bias", "refit", "refit-dense"])
def test_compensation_exact_for_zero_contribution(tiny, how):
    """Units that contribute nothing are removed exactly under every compensation (its correction is zero)."""
    units = BertUnits(tiny)
    hd = units.head_dim
    with torch.no_grad():  # head 1 of layer 0 writes nothing; FFN channels 3, 9 of layer 2 never fire
        units.layers[0].attention.output.dense.weight[:, hd : 2 * hd] = 0
        units.layers[2].intermediate.dense.weight[[3, 9]] = 0
        units.layers[2].intermediate.dense.bias[[3, 9]] = 0  # GELU(0) = 0: a zero input to output.dense
    before = probe_embeddings(tiny)
    plan = {"layers": [{"heads": [h for h in range(4) if h != 1], "channels": list(range(48))}]}
    plan["layers"] += [{"heads": list(range(4)), "channels": list(range(48))}]
    plan["layers"] += [{"heads": list(range(4)), "channels": [c for c in range(48) if c not in (3, 9)]}]
    apply_plan(units, plan, how, CALIB, batch_size=4)
    assert (units.heads(0), units.channels(2)) == (3, 46)
    assert torch.allclose(probe_embeddings(tiny), before, atol=1e-5)


def test_compensation_reduces_output_error(tiny_folder):
    """On the calibration tokens, the output projection's error after removal: refit < bias < none; and the
    sentence embeddings move less from the dense model's with refit (either target) than without compensation."""
    dense = load_encoder(tiny_folder)
    layers = BertUnits(dense).layers
    inputs = first_layer_inputs(dense, CALIB, batch_size=4)
    hidden = [layers[0](*x.args, **x.kwargs) for x in inputs]  # layer 1's inputs
    out = layers[1].output.dense
    gram, _, n = input_gram(layers[1], out, [replace(x, args=(h, *x.args[1:])) for x, h in zip(inputs, hidden)])
    assert n == sum(len(dense.tokenizer(t)["input_ids"]) for t in CALIB)  # every real token, no padding
    keep = list(range(0, 48, 2))
    w, b = out.weight.detach().double(), out.bias.detach().double()
    g = gram / n

    def error(how: str) -> float:  # E‖(W x + b) − (W_K' x_K + b')‖² from the Gram matrix, exactly
        new_w, new_b = correction(out.weight, out.bias, gram, keep, how)
        full = torch.zeros_like(w)
        full[:, keep] = new_w
        diff = torch.cat([w - full, (b - new_b)[:, None]], 1)
        return float((diff @ g @ diff.T).trace())

    errors = {how: error(how) for how in ("none", "bias", "refit")}
    assert errors["refit"] < errors["bias"] < errors["none"], errors
    embed = {}
    for how in ("none", "refit", "refit-dense"):
        model = load_encoder(tiny_folder)
        units = BertUnits(model)
        scores = get_criterion("wanda-sp").score(model, Calibration(CALIB, [], [], batch_size=4))
        apply_plan(units, plan_units(units, scores, EncoderRecipe(model="tiny", sparsity=0.5)), how, CALIB, 4)
        embed[how] = model.encode(CALIB, convert_to_tensor=True)
    reference = dense.encode(CALIB, convert_to_tensor=True)
    distance = {how: float((e - reference).square().sum(1).mean()) for how, e in embed.items()}
    assert distance["refit"] < distance["none"] and distance["refit-dense"] < distance["none"], distance


def test_global_allocation_prunes_a_model_already_pruned_to_per_layer_widths(tiny):
    """A second global round, on scores re-computed on the pruned model, meets its own budget; uniform refuses."""
    units = BertUnits(tiny)
    calib = Calibration(CALIB, [], [], batch_size=4)
    torch.manual_seed(1)
    first = [LayerScores(torch.rand(4) * (i + 1), torch.rand(48) * (3 - i)) for i in range(3)]  # layers differ
    apply_plan(units, plan_units(units, first, EncoderRecipe(model="tiny", sparsity=0.3, allocation="global")))
    assert len({(units.heads(i), units.channels(i)) for i in range(units.num_layers())}) > 1
    before = units.attention_mlp_params()
    second = get_criterion("wanda-sp").score(tiny, calib)
    apply_plan(units, plan_units(units, second, EncoderRecipe(model="tiny", sparsity=0.25, allocation="global")))
    assert abs(1 - units.attention_mlp_params() / before - 0.25) <= units.head_params() / before
    assert tiny.encode(CALIB, convert_to_tensor=True).isfinite().all()
    with pytest.raises(DomainpruneError, match="one width"):
        plan_units(units, second, EncoderRecipe(model="tiny", sparsity=0.25))


def test_global_allocation_meets_the_budget_with_per_layer_widths(tiny):
    units = BertUnits(tiny)
    torch.manual_seed(1)
    scores = [LayerScores(torch.rand(4) * (i + 1), torch.rand(48) * (3 - i)) for i in range(3)]  # layers differ
    layers = ALLOCATIONS.lookup("global")(units, scores, 0.5, "all")
    kept = sum(len(x["heads"]) * units.head_params() + len(x["channels"]) * units.channel_params() for x in layers)
    kept += 3 * 2 * 32
    assert abs(1 - kept / units.attention_mlp_params() - 0.5) <= units.head_params() / units.attention_mlp_params()
    assert len({len(x["channels"]) for x in layers}) > 1  # widths follow the scores, not one width
    assert all(x["heads"] and x["channels"] for x in layers)
    assert all(x["channels"] == sorted(x["channels"]) for x in layers)
    # at a sparsity near 1 every layer still keeps one head and one channel (whole layers are shortgpt's unit)
    extreme = ALLOCATIONS.lookup("global")(units, scores, 0.99, "all")
    assert [(len(x["heads"]), len(x["channels"])) for x in extreme] == [(1, 1)] * 3
    ffn_only = ALLOCATIONS.lookup("global")(units, scores, 0.3, "ffn")
    assert all(x["heads"] == list(range(4)) for x in ffn_only)
    with pytest.raises(DomainpruneError, match="unknown encoder allocation 'nope'"):
        ALLOCATIONS.lookup("nope")


def test_general_ratio_mixes_calibration_texts(tmp_path):
    from domainprune.encoders.pipeline import calibration

    domain = _write_pairs(tmp_path / "d.jsonl", n=200, groups=200)
    general = tmp_path / "g.jsonl"
    general.write_text(
        "".join(json.dumps({"query": f"general question {i}", "positive": f"answer {i}"}) + "\n" for i in range(200))
    )
    recipe = EncoderRecipe(model="x", data=str(domain), general_data=str(general), calib_samples=20, general_ratio=0.25)
    calib = calibration(recipe, progress=False)
    assert len(calib.texts) == 40 and sum(t.startswith("general question") for t in calib.texts) == 5
    assert calib.general_pairs == [] and len(calib.pairs) == 20  # pairs (gradient criteria) stay the domain's
    with pytest.raises(DomainpruneError, match="--general-ratio"):
        EncoderRecipe(model="x", general_ratio=1.0).check()


def test_prune_bad_input_before_work(tiny_folder, tmp_path):
    with pytest.raises(DomainpruneError, match="unknown encoder method 'nope'"):
        prune_encoder(str(tiny_folder), method="nope")
    with pytest.raises(DomainpruneError, match=r"outside \[0, 1\)"):
        prune_encoder(str(tiny_folder), sparsity=1.5)
    with pytest.raises(DomainpruneError, match="not found"):
        prune_encoder(str(tiny_folder), data=str(tmp_path / "missing.jsonl"))


def test_cli_encoder_units_ffn_keeps_every_head(tiny_folder, tmp_path):
    """--encoder-units ffn --allocation global: every head stays, the FFNs take the whole budget."""
    data = str(_write_pairs(tmp_path / "pairs.jsonl", n=120, groups=120))
    out = tmp_path / "run"
    args = ["prune", "--model", str(tiny_folder), "--data", data, "--method", "wanda-sp", "--sparsity", "0.3"]
    args += ["--encoder-units", "ffn", "--allocation", "global", "--calib-samples", "16", "--batch-size", "8"]
    r = CliRunner().invoke(app, [*args, "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    units = BertUnits(load_encoder(tiny_folder))
    assert [x["heads"] for x in report["per_layer"]] == [units.heads(i) for i in range(units.num_layers())]
    assert abs(report["sparsity_achieved"] - 0.3) <= units.channel_params() / report["attention_mlp_params"][0]
    assert json.loads((out / "recipe.json").read_text())["units"] == "ffn"


def test_cli_prune_eval_recover_tiny(tiny_folder, tmp_path):
    data = str(_write_pairs(tmp_path / "pairs.jsonl", n=120, groups=120))
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_folder),
            "--data",
            data,
            "--general-data",
            data,
            "--method",
            "gaprune",
            "--sparsity",
            "0.5",
            "--calib-samples",
            "16",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity_achieved"] - 0.5) < 0.02 and not report["stock_loadable"]
    assert report["per_layer"][0]["heads"] == 2
    r = runner.invoke(app, ["eval", str(out), "--data", data, "--json", str(tmp_path / "e.json"), "-q"])
    assert r.exit_code == 0, r.output
    figures = json.loads((tmp_path / "e.json").read_text())["results"][0]["tasks"][data]
    assert figures["queries"] > 0 and 0 <= figures["ndcg@10"] <= 1
    r = runner.invoke(app, ["compare", str(out), "--data", data, "--out", str(tmp_path / "cmp"), "-q"])
    assert r.exit_code == 0, r.output  # the dense baseline comes from the run's recipe.json
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"]
    assert [c["name"] for c in compared] == [str(tiny_folder), str(out)]
    assert compared[1]["tasks"][data] == figures | {"sentences_per_s": compared[1]["tasks"][data]["sentences_per_s"]}
    r = runner.invoke(
        app, ["report", "--figures", str(tmp_path / "cmp" / "compare.json"), "--out", str(tmp_path / "rep")]
    )
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    dense_ndcg = compared[0]["tasks"][data]["ndcg@10"]
    row = next(line for line in md.splitlines() if line.startswith(f"| {out} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == f"{figures['ndcg@10']:.4f}" and cells[5] == f"{100 * figures['ndcg@10'] / dense_ndcg:.1f}"
    assert cells[1] == f"{compared[1]['params']:,}" and cells[3] == f"{compared[1]['attention_mlp_params']:,}"
    assert "- method: gaprune" in md and "- attention+FFN removed: " in md
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "http" not in page.replace("http-equiv", "")
    assert (tmp_path / "rep" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["report", "--figures", str(tmp_path / "e.json"), "--out", str(tmp_path / "rep2")])
    assert isinstance(r.exception, DomainpruneError) and "holds one model" in str(r.exception)
    out2 = tmp_path / "run-global"
    r = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_folder),
            "--data",
            data,
            "--method",
            "wanda-sp",
            "--allocation",
            "global",
            "--reconstruct",
            "obs",
            "--sparsity",
            "0.4",
            "--calib-samples",
            "16",
            "--batch-size",
            "8",
            "--out",
            str(out2),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    recipe = json.loads((out2 / "recipe.json").read_text())
    assert (recipe["allocation"], recipe["compensation"]) == ("global", "refit")
    assert abs(json.loads((out2 / "report.json").read_text())["sparsity_achieved"] - 0.4) < 0.02
    r = runner.invoke(app, ["report", str(out2), "--data", data, "--out", str(tmp_path / "rep3"), "-q"])
    assert r.exit_code == 0, r.output
    assert "- allocation: global" in (tmp_path / "rep3" / "report.md").read_text()
    r = runner.invoke(
        app,
        [
            "recover",
            str(out),
            "--out",
            str(tmp_path / "rec"),
            "--data",
            data,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rec" / "recover.json").read_text())["steps"] == 2
    r = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_folder),
            "--data",
            data,
            "--depth",
            "shortgpt",
            "--out",
            str(tmp_path / "x"),
            "-q",
        ],
    )
    assert isinstance(r.exception, DomainpruneError) and "--depth applies to decoders only" in str(r.exception)
    assert not (tmp_path / "x").exists()


def test_gguf_export_matches_sentence_transformers(tmp_path):
    """A pruned MiniLM (uniform FFN widths: a stock config) exported to GGUF embeds like sentence-transformers in
    llama.cpp itself; encoders with per-layer shapes are refused before any work."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = load_encoder("all-minilm-l6-v2")
    units = BertUnits(model)
    for i in range(units.num_layers()):
        units.keep_channels(i, list(range(0, 1536, 3)) + list(range(1, 1536, 6)))
    run = save_encoder(model, tmp_path / "run")
    out = tmp_path / "minilm.gguf"
    r = CliRunner().invoke(app, ["export", str(run), "--to", "gguf", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    texts = [*TEXTS, "Split a configuration line into its key and value, stripping whitespace around both."]
    llm = llama_cpp.Llama(str(out), embedding=True, verbose=False, n_ctx=512)
    try:
        got = np.array(llm.embed(texts, normalize=True))
        assert llm.tokenize(texts[1].encode()) == model.tokenizer(texts[1])["input_ids"]
    finally:
        llm.close()
    reference = SentenceTransformer(str(run), device="cpu").encode(texts, normalize_embeddings=True)
    assert got.shape == (5, 384) and np.abs(got - reference).max() < 1e-3
    assert np.abs(got - model.encode(texts[:1] * 5, normalize_embeddings=True)).max() > 0.1  # texts do differ
    units.keep_heads(0, list(range(11)))
    per_layer = save_encoder(model, tmp_path / "heads")
    r = CliRunner().invoke(app, ["export", str(per_layer), "--to", "gguf", "--out", str(tmp_path / "h.gguf"), "-q"])
    assert isinstance(r.exception, DomainpruneError) and "--deploy transformers" in str(r.exception)
    assert not (tmp_path / "h.gguf").exists()
