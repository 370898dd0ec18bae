"""The one registry: a new criterion, a new allocation, a new architecture and a new exporter, each defined and
registered in this file, run end to end (through `prune` and `domainprune export`); a name registered twice is
refused; an unknown one fails in one line naming the available ones; lazy entries import their module only when looked
up."""

import subprocess
import sys
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from tiny_models import COMMON
from tiny_pipeline import CALIB, VOCAB, cli, loaded, save_folder, smol_tokenizer, tiny_lm

from domainprune.adapters import ADAPTERS, DecoderAdapter, get_adapter
from domainprune.adapters import register as register_architecture
from domainprune.allocation import ALLOCATIONS, allocate_uniform
from domainprune.allocation import register as register_allocation
from domainprune.cache import atomic_write
from domainprune.criteria.base import CRITERIA, Criterion, LayerScores, per_group
from domainprune.criteria.base import register as register_criterion
from domainprune.errors import DomainpruneError
from domainprune.export import load_pretrained
from domainprune.exporters import EXPORTERS, Exported, Exporter
from domainprune.registry import Registry
from domainprune.run import prune
from domainprune.runfolder import save_pruned

CALLS = []


@pytest.fixture
def registered():
    @register_criterion("test-down-norm")
    class DownNorm(Criterion):  # heads by o_proj column norms, channels by down_proj column norms
        needs_statistics = False

        def score_layer(self, adapter, i, stats):
            hd, s = adapter.head_dim, adapter.shape(i)
            heads = adapter.o_proj(i).weight.detach().double().pow(2).sum(0).reshape(-1, hd).sum(1)
            return LayerScores(
                heads=heads.sqrt(),
                groups=per_group(heads, s.num_kv_heads).sqrt(),
                channels=adapter.down_proj(i).weight.detach().double().norm(dim=0),
            )

    @register_allocation("test-uniform-logged")
    def logged(dense, adapter, scores, sparsity, mode, standardized, frozen=frozenset()):
        CALLS.append(sparsity)
        return allocate_uniform(dense, adapter, scores, sparsity, mode, standardized, frozen)

    yield
    CRITERIA.pop("test-down-norm")
    ALLOCATIONS.pop("test-uniform-logged")


def test_a_criterion_and_an_allocation_from_one_file_run_end_to_end(registered):
    model = tiny_lm("llama")
    down = [model.model.layers[i].mlp.down_proj.weight.detach().norm(dim=0) for i in range(4)]
    result = prune(
        loaded(model, smol_tokenizer()),
        method="test-down-norm",
        allocation="test-uniform-logged",
        sparsity=0.3,
        progress=False,
        **CALIB,
    )
    assert CALLS and abs(CALLS[-1] - result.plan.params.sparsity) < 0.05
    for lp, norms in zip(result.plan.layers, down):  # the kept channels are this criterion's strongest
        strongest = torch.topk(norms, len(lp.mlp_channels)).indices.sort().values.tolist()
        assert lp.mlp_channels == strongest
    assert result.recipe.method == "test-down-norm" and result.recipe.allocation == "test-uniform-logged"


@pytest.fixture
def smollm3():
    @register_architecture("smollm3")
    class SmolLM3Adapter(DecoderAdapter):  # Llama's layout; the flags add q/k/v/o and gate/up/down biases
        attention_bias_flag = "attention_bias"
        mlp_bias_flag = "mlp_bias"
        heads_divide_hidden = True

    yield SmolLM3Adapter
    ADAPTERS.pop("smollm3")


def test_an_architecture_from_one_file_prunes_and_reloads(smollm3, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("smollm3", **{**COMMON, "vocab_size": VOCAB, "pad_token_id": 0})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the default init, so that pruning visibly changes the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    ids = torch.arange(24)[None] * 7 % VOCAB
    dense = model(input_ids=ids).logits.detach()
    result = prune(
        loaded(model, smol_tokenizer()), method="flap", sparsity=0.3, out=tmp_path / "run", progress=False, **CALIB
    )
    assert not result.report["uniform"]  # FLAP's global allocation: per-layer widths, compensation biases
    reloaded = load_pretrained(tmp_path / "run")  # through the registered adapter (per_layer_config, extra biases)
    assert type(reloaded).__name__ == "SmolLM3ForCausalLM"
    widths = [layer.mlp.down_proj.weight.shape[1] for layer in reloaded.model.layers]
    assert widths == [len(lp.mlp_channels) for lp in result.plan.layers] and len(set(widths)) > 1
    with torch.no_grad():
        got, want = reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, dense, atol=1e-2)


def test_duplicate_names_are_refused_and_unknown_ones_name_the_available():
    reg = Registry("exporter")

    @reg.register("gguf")
    def first():
        pass

    with pytest.raises(ValueError, match="exporter 'gguf' is registered twice"):
        reg.register("gguf")(lambda: None)
    assert first.name == "gguf" and reg.lookup("gguf") is first
    with pytest.raises(DomainpruneError, match=r"^unknown exporter 'onnx'; available: gguf$"):
        reg.lookup("onnx")
    with pytest.raises(ValueError, match="method 'flap' is registered twice"):
        register_criterion("flap")(type("Flap2", (Criterion,), {}))


class NpzOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float16"] = "float32"


@pytest.fixture
def npz_exporter():
    @EXPORTERS.register("test-npz")
    class Npz(Exporter):  # every weight as an array of one NumPy .npz archive, in the dtype asked for
        Options = NpzOptions
        output = "file"
        suffix = ".npz"
        spec_option = "dtype"

        def tag(self, options):
            return options.dtype

        def export(self, run, out, options, *, force):
            state = load_pretrained(run).state_dict()
            arrays = {k: v.to(getattr(torch, options.dtype)).numpy() for k, v in state.items()}

            def write(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

            atomic_write(out, write)
            return Exported(out, f"{len(arrays)} arrays ({options.dtype}): wrote {out}")

    yield Npz
    EXPORTERS.pop("test-npz")


def test_an_exporter_from_one_file_runs_end_to_end_through_domainprune_export(npz_exporter, capsys, tmp_path):
    model = tiny_lm("llama")
    get_adapter(model).slice_mlp(1, list(range(0, 40, 3)))  # per-layer widths: only domainprune's loader reads it
    run = save_pruned(model, smol_tokenizer(), tmp_path / "run", verify=False)
    out = tmp_path / "weights.npz"
    code, _, err = cli(capsys, "export", run, "--to", "test-npz", "-O", "dtype=float16", "--out", out)
    assert code == 0, err
    assert "arrays (float16): wrote" in err  # the console reports on stderr
    with np.load(out, allow_pickle=False) as archive:
        got = {k: archive[k] for k in archive.files}
    want = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == np.float16 and got[k].shape == tuple(v.shape), k
        assert np.array_equal(got[k], v.detach().half().numpy()), k
    assert got["model.layers.1.mlp.down_proj.weight"].shape[1] == len(range(0, 40, 3))

    def one_line_error(*args) -> str:
        code, _, err = cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    err = one_line_error("export", run, "--to", "onnx", "--out", tmp_path / "x.onnx")
    assert "unknown exporter 'onnx'; available: gguf, hf, test-npz, vllm" in err
    assert "dtype" in one_line_error("export", run, "--to", "test-npz", "-O", "bits=4", "--out", tmp_path / "y.npz")
    assert "float16" in one_line_error(
        "export", run, "--to", "test-npz", "-O", "dtype=int8", "--out", tmp_path / "y.npz"
    )
    assert ".npz" in one_line_error("export", run, "--to", "test-npz", "--out", tmp_path / "y.bin")
    assert "--force" in one_line_error("export", run, "--to", "test-npz", "--out", out)
    assert not (tmp_path / "y.npz").exists() and not (tmp_path / "y.bin").exists()


def test_the_hf_exporter_writes_a_checkpoint_in_another_dtype(capsys, tmp_path):
    model = tiny_lm("qwen2")
    get_adapter(model).slice_mlp(2, list(range(0, 40, 2)))
    run = save_pruned(model, smol_tokenizer(), tmp_path / "run", extra_files={"plan.json": "{}\n"}, verify=False)
    out = tmp_path / "bf16"
    code, _, err = cli(capsys, "export", run, "--to", "hf", "--option", "dtype=bfloat16", "--out", out, "--quiet")
    assert code == 0, err
    assert "load it with domainprune.load_pretrained" in err  # per-layer widths: not a stock checkpoint
    reloaded = load_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16 and (out / "plan.json").read_text() == "{}\n"
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v.to(torch.bfloat16)), k
    code, _, err = cli(capsys, "export", run, "--to", "hf", "--quant", "q4_k_m", "--out", tmp_path / "x")
    assert code == 2 and "--to hf: quant is not one of its options (dtype)" in err


def test_prunes_export_stage_looks_the_exporter_up(npz_exporter, capsys, tmp_path):
    dense = save_folder(tiny_lm("llama"), smol_tokenizer(), tmp_path / "dense")
    out = tmp_path / "pruned"
    args = ["prune", "--model", dense, "--data", "code", "--method", "magnitude", "--sparsity", "0.3", "--out", out]
    args += ["--calib-samples", "4", "--seq-len", "32", "--batch-size", "2", "--offload", "none", "--quiet"]
    code, _, err = cli(capsys, *args, "--export", "test-npz:int8")
    assert code == 2 and "float16" in err and not out.exists()  # the stage's options are checked before any work
    code, _, err = cli(capsys, *args, "--export", "test-npz:float16")
    assert code == 0, err
    with np.load(tmp_path / "pruned.float16.npz", allow_pickle=False) as archive:
        for k, v in load_pretrained(out).state_dict().items():
            assert np.array_equal(archive[k], v.half().numpy()), k


def test_lazy_entries_import_their_module_on_lookup_only():
    script = (
        "import sys\n"
        "from domainprune.exporters import EXPORTERS\n"
        "assert {'gguf', 'hf', 'vllm'} <= set(EXPORTERS), sorted(EXPORTERS)\n"
        "assert 'domainprune.exporters.gguf' not in sys.modules and 'gguf' not in sys.modules\n"
        "gguf = EXPORTERS.lookup('gguf')\n"
        "assert gguf.__module__ == 'domainprune.exporters.gguf' and gguf.name == 'gguf'\n"
        "assert 'domainprune.exporters.gguf' in sys.modules and 'domainprune.exporters.vllm' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reg = Registry("exporter")
    reg.lazy("json-lines", "json")  # a module that does not register the name it was declared for
    assert "json-lines" in reg and list(reg) == ["json-lines"]
    with pytest.raises(RuntimeError, match="importing json did not register it"):
        reg.lookup("json-lines")
    with pytest.raises(ValueError, match="exporter 'gguf' is registered twice"):
        EXPORTERS.register("gguf")(type("Other", (Exporter,), {}))
    with pytest.raises(ValueError, match="exporter 'json-lines' is registered twice"):
        reg.lazy("json-lines", "csv")
