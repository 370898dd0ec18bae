"""The one registry: a new criterion and a new allocation, each defined and registered in this file, run end to end
through `prune`; a name registered twice is refused; an unknown one fails in one line naming the available ones."""

import pytest
import torch
from tiny_pipeline import CALIB, loaded, smol_tokenizer, tiny_lm

from domainprune.allocation import ALLOCATIONS, allocate_uniform
from domainprune.allocation import register as register_allocation
from domainprune.criteria.base import CRITERIA, Criterion, LayerScores, per_group
from domainprune.criteria.base import register as register_criterion
from domainprune.errors import DomainpruneError
from domainprune.pipeline import prune
from domainprune.registry import Registry

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
