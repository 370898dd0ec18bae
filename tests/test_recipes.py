"""Recipes as stages (domainprune.stages): every run folder's recipe.yaml replays the run exactly through
`domainprune prune --recipe`, a recipe file with an unknown stage, an unknown option or a bad combination is refused
in one line naming it, options given beside --recipe override it, and the CLI's recipe options are the stages'
declarations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from test_golden import CALIB as GOLDEN_CALIB
from test_golden import dense_recipes, moe_recipes
from tiny_pipeline import cli, save_folder, smol_tokenizer, tiny_lm

from domainprune.errors import DomainpruneError
from domainprune.pipeline import make_recipe
from domainprune.plan import Plan
from domainprune.stages import StagedRecipe, cli_options, load_recipe, options_markdown, parse_recipe

GOLDEN = Path(__file__).with_name("golden")
SMALL = [
    "--data",
    GOLDEN / "code.jsonl",
    "--general-data",
    GOLDEN / "general.jsonl",
    "--calib-samples",
    "4",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--quiet",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_folder(tiny_lm(), smol_tokenizer(), tmp_path_factory.mktemp("tiny") / "model")


def ok(capsys, *args) -> str:
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    return err


def refused(capsys, *args) -> str:
    """The command exits with 2 and one `error:` line; returns the message."""
    code, out, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize(
    "name, fields",
    [(k, v) for k, v in dense_recipes().items()] + [(f"moe-{k}", v) for k, v in moe_recipes().items()],
)
def test_every_golden_recipe_survives_the_stages_and_yaml(name, fields):
    """flat recipe -> stages -> recipe.yaml text -> stages -> flat recipe gives the same resolved recipe."""
    recipe = make_recipe(**GOLDEN_CALIB, **fields)
    text = StagedRecipe.of(recipe).to_yaml()
    again = make_recipe(**parse_recipe(yaml.safe_load(text)).fields())
    exclude = {"default_recipe"}  # informational (report.json): the replay names the method the default chose
    assert again.model_dump(exclude=exclude) == recipe.model_dump(exclude=exclude)


def test_the_stages_of_a_recipe_are_ordered_and_carry_their_own_options():
    recipe = make_recipe(
        **GOLDEN_CALIB, method="taylor", sparsity=0.4, depth="shortgpt", depth_sparsity=0.1, vocab_size=300
    )
    dumped = StagedRecipe.of(recipe).dump()
    assert [next(iter(s)) for s in dumped["stages"]] == ["depth", "width", "vocab"]
    depth, width, vocab = (next(iter(s.values())) for s in dumped["stages"])
    assert depth == {"method": "shortgpt", "sparsity": 0.1} and vocab == {"size": 300}
    assert width["method"] == "taylor" and width["gradient"] == {
        "micro_batch": 1,
        "gradient_checkpointing": False,
        "taylor_mode": "vector",
    }
    assert "search" not in width and "training" not in width  # method options only where the method has them
    assert dumped["budget"] == {"sparsity": 0.4} and dumped["calibration"]["samples"] == 4


def test_planning_results_are_not_in_the_recipe():
    recipe = make_recipe(**GOLDEN_CALIB, method="flap", target_speedup=1.5).model_copy(
        update={"sparsity": 0.31, "predicted_speedup": 1.52, "calib_kl": [0.1, 0.2]}
    )
    dumped = StagedRecipe.of(recipe).dump()
    assert dumped["budget"] == {"sparsity": 0.31}  # a solved --target-speedup replays its sparsity
    assert "predicted_speedup" not in json.dumps(dumped) and "calib_kl" not in json.dumps(dumped)


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "flap", "--allocation", "uniform", "--reconstruct", "obs", "--sparsity", "0.3"],
        ["--method", "flap", "--depth", "shortgpt", "--depth-sparsity", "0.2", "--sparsity", "0.4"],
        ["--method", "wanda-sp", "--hidden-sparsity", "0.2", "--sparsity", "0.4"],
    ],
    ids=["width-obs", "depth", "hidden"],
)
def test_prune_recipe_of_a_run_rebuilds_identical_weights(capsys, folder, tmp_path, monkeypatch, args):
    first, second = tmp_path / "first", tmp_path / "second"
    ok(capsys, "prune", "--model", folder, *args, "--out", first, *SMALL)
    assert (first / "recipe.yaml").is_file()
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path / "fresh-cache"))  # nothing reused from the first run
    ok(capsys, "prune", "--recipe", first / "recipe.yaml", "--out", second, "--quiet")
    assert sha256(second / "model.safetensors") == sha256(first / "model.safetensors")
    assert (second / "recipe.yaml").read_text() == (first / "recipe.yaml").read_text()
    assert (second / "plan.json").read_text() == (first / "plan.json").read_text()


def test_a_recovered_runs_recipe_replays_pruning_and_recovery(capsys, folder, tmp_path, monkeypatch):
    """`recover RUN` records its options in the run's recipe.yaml (`recover:`); `prune --recipe` of that file prunes,
    then recovers into the one output folder: the same weights."""
    pruned, recovered, again = tmp_path / "pruned", tmp_path / "recovered", tmp_path / "again"
    ok(capsys, "prune", "--model", folder, "--method", "wanda-sp", "--sparsity", "0.3", "--out", pruned, *SMALL)
    train = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--max-steps", "3", "--lr", "0.01"]
    ok(capsys, "recover", pruned, "--out", recovered, "--data", GOLDEN / "code.jsonl", *train, "--quiet")
    text = (recovered / "recipe.yaml").read_text()
    recorded = yaml.safe_load(text)
    assert recorded["recover"] == {
        "data": str(GOLDEN / "code.jsonl"),
        "samples": 4,
        "seq_len": 16,
        "batch_size": 2,
        "lr": 0.01,
        "max_steps": 3,
    }
    assert {k: v for k, v in recorded.items() if k != "recover"} == yaml.safe_load((pruned / "recipe.yaml").read_text())
    assert sha256(recovered / "model.safetensors") != sha256(pruned / "model.safetensors")
    monkeypatch.setenv("DOMAINPRUNE_CACHE", str(tmp_path / "fresh-cache"))
    ok(capsys, "prune", "--recipe", recovered / "recipe.yaml", "--out", again, "--quiet")
    assert sha256(again / "model.safetensors") == sha256(recovered / "model.safetensors")
    assert (again / "recipe.yaml").read_text() == text
    assert json.loads((again / "recovery.json").read_text())["report"]["steps"] == 3


def test_an_exported_runs_recipe_replays_the_export(capsys, folder, tmp_path):
    """prune --export records `export:` in recipe.yaml; prune --recipe runs the export again, beside its output."""
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--method", "flap", "--sparsity", "0.3", "--export", "hf"]
    ok(capsys, "prune", "--model", folder, *args, "--out", first, *SMALL)
    text = (first / "recipe.yaml").read_text()
    assert yaml.safe_load(text)["export"] == {"to": "hf", "dtype": "auto"}
    ok(capsys, "prune", "--recipe", first / "recipe.yaml", "--out", second, "--quiet")
    assert (second / "recipe.yaml").read_text() == text
    exported = [tmp_path / "first.hf" / "model.safetensors", tmp_path / "second.hf" / "model.safetensors"]
    assert sha256(exported[0]) == sha256(exported[1]) == sha256(first / "model.safetensors")


def test_options_beside_recipe_override_it(capsys, folder, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    ok(capsys, "prune", "--model", folder, "--method", "wanda-sp", "--sparsity", "0.3", "--out", first, *SMALL)
    ok(capsys, "prune", "--recipe", first / "recipe.yaml", "--sparsity", "0.5", "--out", second, "--quiet")
    a, b = load_recipe(first / "recipe.yaml").fields(), load_recipe(second / "recipe.yaml").fields()
    assert b["sparsity"] == 0.5 and a["sparsity"] == 0.3
    assert {k: v for k, v in b.items() if k != "sparsity"} == {k: v for k, v in a.items() if k != "sparsity"}
    report = json.loads((second / "report.json").read_text())
    assert abs(report["sparsity_achieved"] - 0.5) < 0.05
    ok(capsys, "plan", "--recipe", first / "recipe.yaml", "--out", tmp_path / "plan.json", "--quiet")
    assert Plan.load(tmp_path / "plan.json").layers == Plan.load(first / "plan.json").layers


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


BASE = {"input": {"model": "smollm2-135m"}, "budget": {"sparsity": 0.3}, "stages": [{"width": {"method": "flap"}}]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"widht": {"method": "flap"}}]}, "unknown stage 'widht'; stages: hidden, depth, width"),
        ({"stages": [{"width": {"methd": "flap"}}]}, "stage width: unknown option 'methd'; options: method"),
        ({"stages": [{"width": {"search": {"round": 2}}}]}, "stage width.search: unknown option 'round'"),
        ({"budget": {"sparsity": 0.3, "speedup": 2}}, "budget: unknown option 'speedup'"),
        ({"pruning": {}}, "unknown section 'pruning'"),
        ({"stages": [{"vocab": {"coverage": 0.9, "size": 100}}]}, "give at most one of --vocab-coverage and --vocab"),
        ({"stages": [{"width": {"allocation": "global", "search": {"rounds": 2}}}]}, "need --allocation search"),
        ({"stages": [{"depth": {"method": "shortgpt", "sparsity": 0.5}}, {"width": {}}]}, "part of --sparsity 0.3"),
        ({"stages": [{"width": {}}, {"depth": {"method": "shortgpt", "sparsity": 0.1}}]}, "stages run in the order"),
        ({"stages": [{"width": {}}, {"experts": {"method": "easy-ep", "keep": 4}}]}, "run prune twice"),
        ({"budget": {"sparsity": 0.3, "target_params": 100}}, "got sparsity and target_params"),
        ({"stages": [{"width": {"reconstruct": "lsq"}}]}, "--reconstruct must be obs or none"),
        ({"stages": [{"hidden": {"sparsity": 1.5}}]}, "stage hidden: sparsity: Input should be less than 1"),
        ({"recover": {"max_step": 3}}, "recover: unknown option 'max_step'; options: data"),
        ({"recover": {"kd_top_k": 4}}, "recover: --kd-top-k needs --kd-weight > 0"),
        ({"export": {"to": "onnx"}}, "export: unknown exporter 'onnx'; available:"),
        ({"export": {"to": "hf", "dtype": "int3"}}, "export: --to hf: dtype Input should be"),
        ({"export": {"quant": "q4_0"}}, "export: expected `to: NAME`"),
        # depth (formerly depth.check_depth_recipe)
        ({"stages": [{"depth": {"method": "flap", "sparsity": 0.1}}, {"width": {}}]}, "--depth must be a depth method"),
        ({"stages": [{"width": {"method": "shortgpt", "allocation": "global"}}]}, "--allocation applies to width"),
        ({"stages": [{"width": {"method": "finercut", "reconstruct": "obs"}}]}, "removes layers without reconstruct"),
        (
            {"stages": [{"depth": {"method": "shortgpt", "sparsity": 0.1}}, {"width": {"method": "finercut"}}]},
            "method 'finercut' already prunes depth",
        ),
        (
            {
                "stages": [
                    {"depth": {"method": "shortgpt", "sparsity": 0.1}},
                    {"width": {"method": "flap", "reconstruct": "obs"}},
                ]
            },
            "--depth cannot be combined with --reconstruct obs yet",
        ),
        (
            {"stages": [{"depth": {"method": "shortgpt", "sparsity": 0.1}}, {"width": {"method": "nirvana"}}]},
            "--depth needs --allocation global or uniform for the width part, not 'nirvana-ratio'",
        ),
        # the latency budget (formerly latency.check_speedup_recipe)
        (
            {"budget": {"target_speedup": 1.5}, "stages": [{"width": {"allocation": "search"}}]},
            "--target-speedup cannot be combined with --allocation search",
        ),
        (
            {"budget": {"target_speedup": 1.5}, "stages": [{"hidden": {"sparsity": 0.1}}, {"width": {}}]},
            "--target-speedup times blocks at the full hidden size",
        ),
        ({"budget": {"target_speedup": 1.5}, "stages": [{"depth": {"method": "shortgpt"}}]}, "needs a width method"),
        (
            {"budget": {"target_speedup": 1.5}, "stages": [{"experts": {"method": "easy-ep", "keep": 4}}]},
            "method 'easy-ep' removes whole experts",
        ),
        # training-aware pruning (formerly training_aware.check_recipe)
        ({"stages": [{"width": {"method": "atp", "allocation": "global"}}]}, "--method atp decides its own units"),
        (
            {"stages": [{"width": {"method": "loraprune", "training": {"train": {"lora_rank": 4}}}}]},
            "lora_rank is not an option of --method loraprune",
        ),
        (
            {"stages": [{"width": {"method": "atp", "training": {"iterative": 2}}}]},
            "--iterative runs a width criterion in stages; --method atp decides while it trains",
        ),
        (
            {"stages": [{"depth": {"method": "shortgpt", "sparsity": 0.1}}, {"width": {"method": "atp"}}]},
            "--method atp does not combine with --depth; give --sparsity alone",
        ),
        (
            {"calibration": {"candidates": 2}, "stages": [{"width": {"training": {"iterative": 2}}}]},
            "--iterative 2 does not combine with --calib-candidates",
        ),
        (
            {"budget": {"target_params": 100}, "stages": [{"width": {"method": "loraprune"}}]},
            "--method loraprune does not combine with --target-params",
        ),
        ({"stages": [{"width": {"training": {"train": {"max_steps": 3}}}}]}, "training options (--time-budget"),
        (
            {"stages": [{"width": {"allocation": "global", "search": {"task_weight": 0.5}}}]},
            "need --allocation search",
        ),
        (
            {"stages": [{"width": {"method": "flap", "allocation": "search", "search": {"task_weight": 0.5}}}]},
            "--search-task-weight needs --allocation search --reconstruct obs",
        ),
    ],
)
def test_a_bad_recipe_file_fails_in_one_line_naming_it(capsys, tmp_path, change, message):
    path = write(tmp_path, {**BASE, **change})
    with pytest.raises(DomainpruneError) as e:
        load_recipe(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert message in refused(capsys, "prune", "--recipe", path, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_recipe_file_that_is_not_yaml_or_missing_fails_in_one_line(capsys, tmp_path):
    assert "not valid YAML at line 2" in refused(
        capsys, "prune", "--recipe", write(tmp_path, "a: 1\n b: [\n"), "-o", "x"
    )
    assert "no such file" in refused(capsys, "prune", "--recipe", tmp_path / "none.yaml", "--out", tmp_path / "x")


def test_the_cli_options_are_the_stages_declarations():
    import typer.main

    from domainprune.cli import app

    command = typer.main.get_command(app).commands["prune"]
    params = {p.name: p for p in command.params}
    declared = cli_options()
    assert len(declared) == len({flat for flat, *_ in declared}) > 30  # one flag per option, none declared twice
    for flat, _, info, section in declared:
        assert params[flat].help == info.description, flat
        assert params[flat].rich_help_panel == f"{section.title} options"
    plan = {p.name for p in typer.main.get_command(app).commands["plan"].params}
    assert {flat for flat, *_ in declared} | {"recipe_file"} <= plan


def test_the_training_flags_are_the_training_declarations(capsys, folder, tmp_path):
    """prune's training flags are generated from domainprune.options.TrainOptions (help text included), and a flag
    reaches the method's options."""
    import typer.main

    from domainprune.cli import app
    from domainprune.options import RecoveryConfig, TrainOptions, cli_options

    params = {p.name: p for p in typer.main.get_command(app).commands["prune"].params}
    declared = cli_options(TrainOptions)
    assert {"time_budget", "max_steps", "save_steps", "lr", "lora_r"} <= set(declared)
    assert "seq_len" not in declared and params["seq_len"].help != TrainOptions.model_fields["seq_len"].description
    for name, info in declared.items():
        assert params[name].help == info.description and params[name].default is None, name
        assert params[name].rich_help_panel == "Training options"
    recover = {p.name: p for p in typer.main.get_command(app).commands["recover"].params}
    assert set(RecoveryConfig.model_fields) <= set(recover) and len(RecoveryConfig.model_fields) > 25
    for name, info in RecoveryConfig.model_fields.items():
        assert recover[name].help == info.description and recover[name].default == info.default, name
    assert recover["full"].opts == ["--full"] and recover["data"].opts == ["--data", "-d"]
    out = tmp_path / "it"
    args = ["--method", "wanda-sp", "--iterative", "2", "--sparsity", "0.2", "--max-steps", "2", "--lr", "0.001"]
    small = ["--train-opt", "samples=4", "--train-opt", "seq_len=16", "--train-opt", "batch_size=2"]
    ok(capsys, "prune", "--model", folder, *args, "--lora-r", "4", *small, "--out", out, *SMALL)
    train = json.loads((out / "recipe.json").read_text())["train"]
    assert (train["max_steps"], train["lr"], train["lora_r"], train["save_steps"]) == (2, 0.001, 4, 20)


def test_docs_option_tables_are_the_declarations():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    generated = doc.split("<!-- options: generated -->\n")[1].split("<!-- options: end -->")[0]
    assert generated == options_markdown()


def test_the_flat_recipe_fields_are_the_stage_declarations():
    from domainprune.pipeline import Recipe
    from domainprune.stages import SECTIONS, STAGES

    declared = {flat: info for kind in (*SECTIONS, *STAGES) for _, flat, info in kind.options()}
    recorded = {"default_recipe", "predicted_speedup", "calib_kl", "search_kl"}  # set by resolution and planning
    assert set(Recipe.model_fields) == set(declared) | recorded
    for flat, info in declared.items():
        assert Recipe.model_fields[flat].default == (None if info.is_required() else info.default), flat
    with pytest.raises(DomainpruneError, match="seq_len: Input should be greater than or equal to 2"):
        make_recipe(sparsity=0.3, seq_len=1)  # the declared constraint, on the flat record too
