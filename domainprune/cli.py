"""`domainprune` command line. Every command is a thin layer over the Python API in `domainprune.pipeline`."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from .errors import DomainpruneError
from .mbpp import CODE_TASKS
from .mbpp import MAX_NEW_TOKENS as MAX_CODE_TOKENS

app = typer.Typer(
    help="Turn a general LLM into a smaller, faster specialist for one domain by structured pruning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

# Options shared by several commands.
DataOpt = Annotated[str, typer.Option("--data", "-d", help="Domain corpus: preset (code, general), file or folder.")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per sequence.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per forward pass.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
TextFieldOpt = Annotated[str, typer.Option(help="Field holding the text in .jsonl/.parquet/datasets corpora.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
LmEvalOpt = Annotated[
    bool,
    typer.Option(
        "--lm-eval",
        help="Zero-shot through lm-evaluation-harness (its prompts and datasets) instead of the built-in scorer.",
    ),
]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:  # transformers' own bars ("Loading weights", "Writing model shards") ignore the log level
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _is_encoder(source) -> bool:
    from .encoders.model import is_encoder

    return is_encoder(source)


def parse_count(text: str | None) -> int | None:
    """'90M' -> 90_000_000, '1.5B' -> 1_500_000_000, '123456' -> 123456."""
    if text is None:
        return None
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}
    t = text.strip().upper()
    try:
        count = int(float(t[:-1]) * units[t[-1]]) if t[-1:] in units else int(t)
    except (ValueError, OverflowError):  # "abc", "infM", "nanM"
        count = 0
    if count <= 0:
        raise DomainpruneError(f"--target-params {text!r} is not a positive count; write e.g. 90M or 90000000")
    return count


def parse_train_options(*, opts: list[str] | None, **given) -> dict | None:
    """The training flags (--time-budget, --max-steps, ...) and --train-opt KEY=VALUE (JSON values, else strings) as
    one dict."""
    out = {k: v for k, v in given.items() if v is not None}
    for item in opts or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DomainpruneError(f"--train-opt {item!r} is not KEY=VALUE; write e.g. --train-opt lora_r=16")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out or None


def _recipe_parameters() -> list[inspect.Parameter]:
    """The recipe's options as command-line options, generated from the stages' declarations (domainprune.stages),
    help text included, plus --recipe."""
    from .stages import cli_options

    params = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter(
            "recipe_file",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                Optional[Path],
                typer.Option(
                    "--recipe",
                    help="Run this recipe.yaml (every run folder has one; docs/recipes.md); options given beside it "
                    "override its values.",
                ),
            ],
            default=None,
        ),
    ]
    for flat, _, info, section in cli_options():
        extra = info.json_schema_extra
        kind = {"count": Optional[str], "float": Optional[float]}.get(extra["cli"], info.annotation)
        args = typing.get_args(kind)
        if type(None) in args and len(args) == 2:  # X | None: typer's spelling
            kind = Optional[next(a for a in args if a is not type(None))]
        option = typer.Option(*extra["flags"], help=info.description, rich_help_panel=f"{section.title} options")
        params.append(
            inspect.Parameter(
                flat,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=Annotated[kind, option],
                default=None if info.is_required() else info.default,
            )
        )
    return params


def _parameters(fn) -> list[inspect.Parameter]:
    """fn's parameters with their annotations evaluated (this module uses `from __future__ import annotations`)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(fn).parameters.values()]


def with_options(shared: list[inspect.Parameter], into: str, after: int = 1, prepare=None):
    """Give a command the options `shared` (declared once) after its own first `after` parameters; it receives
    them as one dict under the name `into` (passed through `prepare` first)."""
    names = {p.name for p in shared}

    def wrap(fn):
        own = [p for p in _parameters(fn) if p.name != into]

        @functools.wraps(fn)
        def command(**kwargs):
            group = {k: kwargs.pop(k) for k in names}
            return fn(**{into: prepare(group) if prepare else group}, **kwargs)

        del command.__wrapped__  # typer must read the signature below, not fn's
        command.__signature__ = inspect.Signature(own[:after] + shared + own[after:])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return wrap


def _recipe_fields(options: dict) -> dict:
    """The flat recipe fields: --recipe's, overridden by the options given on the command line."""
    ctx, path = options.pop("ctx"), options.pop("recipe_file")
    options = {**options, "target_params": parse_count(options["target_params"])}
    if path is None:
        return options
    from .stages import load_recipe

    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
    staged = load_recipe(path)
    after = {RECOVER_KEY: staged.recover, EXPORT_KEY: staged.export}  # what prune runs after pruning
    return {**staged.fields(), **given, **{k: v for k, v in after.items() if v is not None}}


# not recipe fields: a recipe file's `recover:` and `export:` sections, for prune
RECOVER_KEY, EXPORT_KEY = "recover stage", "export stage"


recipe_command = with_options(_recipe_parameters(), "recipe", prepare=_recipe_fields)


def _declared_parameters(model, panel: str | None = None, declared_defaults: bool = True) -> list[inspect.Parameter]:
    """A pydantic model's command-line options as typer options, generated from its declarations (domainprune.options):
    type, flags, help text and (with `declared_defaults`, else None: left out, the recipe's value holds) default."""
    from .options import cli_options

    params = []
    for name, info in cli_options(model).items():
        kind = info.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Literal:  # checked by the model itself
            kind = str
        elif args and type(None) in typing.get_args(kind):
            kind = Optional[args[0]]
        if not declared_defaults and typing.get_origin(kind) is not typing.Union:
            kind = Optional[kind]
        option = typer.Option(*info.json_schema_extra["flags"], help=info.description, rich_help_panel=panel)
        default = info.default if declared_defaults else None
        kind_ = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(name, kind_, annotation=Annotated[kind, option], default=default))
    return params


def _train_parameters() -> list[inspect.Parameter]:
    """prune's training flags (domainprune.options.TrainOptions); left out, the recipe's (or the default) holds."""
    from .options import TrainOptions

    return _declared_parameters(TrainOptions, "Training options", declared_defaults=False)


train_flags = with_options(_train_parameters(), "train_flags", after=3)


@app.command()
@recipe_command
@train_flags
def prune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned checkpoint.")],
    recipe: dict,
    train_flags: dict,
    recover: Annotated[
        bool, typer.Option("--recover", help="Then run `domainprune recover` (defaults) on OUT in place.")
    ] = False,
    train_opt: Annotated[
        Optional[list[str]],
        typer.Option(
            "--train-opt",
            help="Further training option KEY=VALUE, repeatable (e.g. lora_r=16, pdg_lr=0.01; see "
            "docs/training-aware.md).",
        ),
    ] = None,
    export_to: Annotated[
        Optional[str],
        typer.Option(
            "--export",
            help="Then also export OUT beside it with a registered exporter, NAME[:VALUE]: gguf (OUT.f16.gguf for "
            "llama.cpp) or gguf:QUANT, e.g. gguf:q4_k_m (OUT.q4_k_m.gguf); vllm (OUT.vllm); hf (see `domainprune "
            "export`).",
        ),
    ] = None,
    offload: Annotated[
        str,
        typer.Option(
            help="Where the model lives while it is pruned: none (whole, on the device), cpu (in RAM, one layer at a "
            "time on the device), disk (one layer at a time read from the checkpoint's safetensors shards and "
            "written to OUT as it is finished: models larger than memory; docs/streaming.md), auto (from the free "
            "memory)."
        ),
    ] = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
):
    """Score, plan, slice and export: a smaller checkpoint in OUT with plan.json, recipe.yaml (replay it with
    --recipe), recipe.json and report.json."""
    from .run import prune as run

    _setup_logging(quiet)
    recovery, exporting = recipe.pop(RECOVER_KEY, None), recipe.pop(EXPORT_KEY, None)
    if export_to is not None:  # refused before any work; --export replaces a recipe file's export:
        from .exporters import parse_spec

        export_stage = parse_spec(export_to)
    elif exporting is not None:
        from .stages import export_stage as recipe_export

        export_stage = recipe_export(exporting)
        export_stage.exporter.check(export_stage.options)
    if export_to is not None or exporting is not None:
        export_stage.check(out, force=force)
    model = recipe.pop("model")
    if _is_encoder(model):  # sentence encoders: their own path (docs/embeddings.md)
        from .encoders import cli as encoder_cli

        return encoder_cli.prune(model, recipe, out=out, recover=recover, export_to=export_to, force=force, quiet=quiet)
    train = parse_train_options(opts=train_opt, **train_flags)
    if train is not None:  # else --recipe's, if any
        recipe["train"] = train
    result = run(model, out=out, force=force, progress=not quiet, offload=offload, **recipe)
    console.print(f"[bold green]pruned[/] {result.plan.summary()}")
    r = result.report
    if "vocab" in r:
        v = r["vocab"]
        console.print(
            f"vocabulary {v['original_vocab']:,} → {v['kept_vocab']:,} tokens ({100 * v['calibration_coverage']:.2f}% "
            "of the domain's calibration tokens)"
        )
    if "speedup" in r:
        s = r["speedup"]
        console.print(
            f"{s['phase']} speedup: target {s['target']:g}×, predicted {s['predicted']:.3f}×, measured "
            f"{s['measured']:.3f}× here (sparsity {s['sparsity']:.1%})"
        )
    console.print(
        f"wrote {result.out} in {r['prune_seconds']:.0f} s (peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB)"
    )
    if recover or recovery is not None:  # --recover: the defaults on the recipe's data; a recipe file's own options
        from .recover import recover as run_recovery

        del result  # the pruned model is reloaded from OUT
        if recovery is None:
            recovery = {k: recipe[k] for k in ("data", "text_field", "seed", "device")}
        rec = run_recovery(out, out=out, force=True, in_place=True, progress=not quiet, **recovery)
        console.print(
            f"[bold green]recovered[/] {rec.report['steps']} steps in {rec.report['train_seconds']:.0f} s; wrote {out}"
        )
    loader = "AutoModelForCausalLM.from_pretrained" if r["stock_loadable"] else "domainprune.load_pretrained"
    console.print(f"load it with {loader}({str(out)!r})")
    if export_to is not None or exporting is not None:
        e = export_stage.run(out, force=True)
        _record_export(out, export_stage)
        console.print(f"[bold green]exported[/] {e.summary}", soft_wrap=True)
        for note in e.notes:
            console.print(f"  {note}", soft_wrap=True)


def _record_export(out: Path, stage) -> None:
    """OUT's recipe.yaml gains `export:` (the exporter and its options), so that `prune --recipe` replays it too."""
    import yaml

    from .cache import atomic_write

    path = out / "recipe.yaml"
    if not path.is_file():  # sentence encoders' runs have none
        return
    text = path.read_text()
    head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text) or {}
    data["export"] = {"to": stage.exporter.name, **stage.options.model_dump()}
    body = head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda tmp: tmp.write_text(body))


@app.command()
@recipe_command
def plan(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plan JSON.")],
    recipe: dict,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
):
    """Write the pruning plan (what every layer keeps) without changing any model; edit it, then `apply` it."""
    from .models import check_prunable, load_model
    from .outputs import check_output, local_inputs
    from .pipeline import check_data, make_plan, make_recipe

    _setup_logging(quiet)
    recipe.pop(RECOVER_KEY, None), recipe.pop(EXPORT_KEY, None)  # they come after pruning: no part of a plan
    resolved = make_recipe(**recipe)
    inputs = local_inputs(resolved.model, resolved.data, resolved.general_data)
    check_output(out, force=force, kind="file", inputs=inputs)
    check_prunable(resolved.model)
    check_data(resolved)
    loaded = load_model(resolved.model, dtype=resolved.dtype, device=resolved.device)
    result, _, _ = make_plan(loaded, resolved, progress=not quiet)
    result.save(out)
    console.print(f"[bold green]plan[/] {result.summary()}\nwrote {out}")


@app.command()
def apply(
    plan_file: Annotated[
        Path, typer.Argument(metavar="PLAN", help="Plan JSON from `domainprune plan` (edited or not).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned checkpoint.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to prune (default: the plan's).")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
):
    """Execute a plan exactly: slice the model it names and export the result."""
    from .adapters import get_adapter
    from .evaluate import parameter_count
    from .models import check_prunable, load_model
    from .outputs import check_output, local_inputs
    from .pipeline import apply as run
    from .plan import Plan
    from .runfolder import save_pruned

    _setup_logging(quiet)
    p = Plan.load(plan_file)
    source = model or p.model.source
    run_folder = plan_file.parent if (plan_file.parent / "config.json").is_file() else None  # a plan inside a run
    data = (p.recipe or {}).get("data")
    check_output(out, force=force, inputs=local_inputs(plan_file, run_folder, source, data))
    check_prunable(source)
    loaded = load_model(source, dtype=dtype, device=device)
    p.params = p.count_params(get_adapter(loaded.model), parameter_count(loaded.model))
    run(loaded, p, progress=not quiet)
    files = {"plan.json": p.model_dump_json(indent=1) + "\n"}
    if p.recipe:
        files["recipe.json"] = json.dumps(p.recipe, indent=1) + "\n"
    save_pruned(loaded.model, loaded.tokenizer, out, extra_files=files, force=force)
    console.print(f"[bold green]applied[/] {p.summary()}\nwrote {out}")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="Model to evaluate (folder, preset, .gguf, hub id).")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="Corpus to measure perplexity on (repeatable).")] = [
        "code",
        "general",
    ],  # noqa: B006
    baseline: Annotated[
        Optional[str], typer.Option(help="Dense model to measure in the same process; prints ratios.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Test sequences per corpus.")] = 128,
    seq_len: SeqLenOpt = 256,
    tasks: TasksOpt = "",
    limit: LimitOpt = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure decode/prefill throughput.")] = True,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON here.")] = None,
    lm_eval: LmEvalOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --json file.")] = False,
    code_tokens: CodeTokensOpt = MAX_CODE_TOKENS,
    quiet: QuietOpt = False,
):
    """Perplexity per corpus, zero-shot accuracy, MBPP pass@1, parameters, checkpoint size and throughput (and
    ratios to --baseline)."""
    from .mbpp import standard_error
    from .measure import measure, ratios
    from .models import load_model
    from .outputs import check_output, local_inputs

    _setup_logging(quiet)
    if _is_encoder(model):
        from .encoders import cli as encoder_cli

        return encoder_cli.evaluate(
            model,
            data=data,
            baseline=baseline,
            batch_size=batch_size,
            device=device,
            json_out=json_out,
            force=force,
            quiet=quiet,
        )
    if json_out is not None:
        check_output(json_out, force=force, kind="file", inputs=local_inputs(model, baseline, *data), option="--json")
    task_list = tuple(t for t in tasks.split(",") if t)
    _check_lm_eval(lm_eval, task_list)
    results = []
    for name in ([baseline] if baseline else []) + [model]:
        loaded = load_model(name, dtype=dtype, device=device)
        results.append(
            measure(
                loaded,
                name,
                sources=data,
                samples=samples,
                seq_len=seq_len,
                tasks=task_list,
                limit=limit,
                speed=speed,
                batch_size=batch_size,
                text_field=text_field,
                progress=not quiet,
                lm_eval=lm_eval,
                code_tokens=code_tokens,
            )
        )
        del loaded
    table = Table(title="domainprune eval")
    table.add_column("figure")
    for m in results:
        table.add_column(m.name if len(m.name) < 40 else "…" + m.name[-39:], justify="right")
    if baseline:
        table.add_column("ratio", justify="right")
    dense = results[0] if baseline else None
    r = ratios(results[-1], dense) if dense else {}
    rows: list[tuple[str, list[str], str]] = []
    for s in data:
        rows.append(
            (
                f"perplexity {s} ({results[-1].test_sequences[s]}×{seq_len})",
                [f"{m.perplexity[s]:.3f}" for m in results],
                f"{r.get(f'ppl_{s}', 0):.3f}×",
            )
        )
    for t in (t for t in task_list if t in CODE_TASKS):
        n = results[-1].problems[t]
        values = [f"{m.pass_at_1[t]:.3f} ± {standard_error(m.pass_at_1[t], n):.3f}" for m in results]
        rows.append(
            (
                f"{t} pass@1 ({n} problems)",
                values,
                f"{results[-1].pass_at_1[t] - (dense.pass_at_1[t] if dense else 0):+.3f}",
            )
        )
    for t in (t for t in task_list if t not in CODE_TASKS):
        rows.append(
            (
                f"{t} acc_norm",
                [f"{m.zero_shot[t]:.3f}" for m in results],
                f"{results[-1].zero_shot[t] - (dense.zero_shot[t] if dense else 0):+.3f}",
            )
        )
    rows.append(("parameters", [f"{m.params:,}" for m in results], f"{r.get('param_ratio', 0):.3f}× fewer"))
    rows.append(
        ("checkpoint MB", [f"{m.checkpoint_bytes / 1e6:.1f}" if m.checkpoint_bytes else "-" for m in results], "")
    )
    if speed:
        rows.append(
            ("decode tokens/s", [f"{m.decode_tokens_per_s:.1f}" for m in results], f"{r.get('decode_speedup', 0):.3f}×")
        )
        rows.append(
            (
                "prefill tokens/s",
                [f"{m.prefill_tokens_per_s:.1f}" for m in results],
                f"{r.get('prefill_speedup', 0):.3f}×",
            )
        )
    for label, values, ratio in rows:
        table.add_row(label, *values, *([ratio] if baseline else []))
    Console().print(table)
    if json_out:
        from .cache import atomic_write_bytes

        figures = {"results": [m.to_dict() for m in results], "ratios": r}
        atomic_write_bytes(json_out, (json.dumps(figures, indent=1) + "\n").encode())


def _check_lm_eval(lm_eval: bool, tasks: tuple[str, ...]) -> None:
    if lm_eval:
        from .measure import require_lm_eval

        if not tasks:
            raise DomainpruneError("--lm-eval runs zero-shot tasks; give them with --tasks")
        require_lm_eval()


RunsArg = Annotated[
    list[Path],
    typer.Argument(metavar="RUN...", help="Pruned run folders (the --out of `domainprune prune`).", show_default=False),
]
CompareBaselineOpt = Annotated[
    Optional[str], typer.Option(help="Dense model (default: the model named in the runs' recipe.json).")
]
CompareDataOpt = Annotated[
    list[str],
    typer.Option(
        "--data",
        "-d",
        help="Corpus for perplexity (repeatable); the first is the domain, also used for the generation prompts.",
    ),
]
TasksOpt = Annotated[
    str,
    typer.Option(
        help="Comma-separated tasks: zero-shot (piqa,hellaswag,arc_easy, ...) and/or "
        "mbpp (pass@1 of generated code, run in a sandbox) ('' for none)."
    ),
]
LimitOpt = Annotated[Optional[int], typer.Option(help="Items per zero-shot task; the first N problems for mbpp.")]
CodeTokensOpt = Annotated[int, typer.Option(help="mbpp: greedy new tokens at most per answer.")]
TestSamplesOpt = Annotated[int, typer.Option(help="Test sequences per corpus.")]
PromptsOpt = Annotated[int, typer.Option(help="Held-out domain prompts for the generation samples (0: none).")]
NewTokensOpt = Annotated[int, typer.Option(help="Greedy new tokens per generation sample.")]
SpeedOpt = Annotated[bool, typer.Option("--speed/--no-speed", help="Measure decode/prefill throughput.")]


def _measure_options(
    baseline: CompareBaselineOpt = None,
    data: CompareDataOpt = ["code", "general"],  # noqa: B006
    samples: TestSamplesOpt = 128,
    seq_len: SeqLenOpt = 256,
    tasks: TasksOpt = "",
    limit: LimitOpt = None,
    speed: SpeedOpt = True,
    prompts: PromptsOpt = 3,
    new_tokens: NewTokensOpt = 48,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    lm_eval: LmEvalOpt = False,
    code_tokens: CodeTokensOpt = MAX_CODE_TOKENS,
):
    """What `compare` measures (and `report` without --figures), declared once."""


measure_command = with_options(_parameters(_measure_options), "measure")


def _measure_runs(
    runs,
    *,
    baseline,
    data,
    samples,
    seq_len,
    tasks,
    limit,
    speed,
    prompts,
    new_tokens,
    batch_size,
    dtype,
    device,
    text_field,
    lm_eval,
    code_tokens,
    quiet,
):
    from .compare import compare as run

    task_list = tuple(t for t in tasks.split(",") if t)
    _check_lm_eval(lm_eval, task_list)
    return run(
        [str(r) for r in runs],
        baseline,
        sources=data,
        samples=samples,
        seq_len=seq_len,
        tasks=task_list,
        limit=limit,
        speed=speed,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        text_field=text_field,
        prompts=prompts,
        new_tokens=new_tokens,
        lm_eval=lm_eval,
        code_tokens=code_tokens,
        progress=not quiet,
    )


@app.command()
@measure_command
def compare(
    runs: RunsArg,
    measure: dict,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for compare.json and compare.md.")] = Path("compare"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
    quiet: QuietOpt = False,
):
    """Several pruned models beside the dense one, measured in this process: perplexity, zero-shot, speed, size,
    samples."""
    from .outputs import check_output, local_inputs

    _setup_logging(quiet)
    if runs and all(_is_encoder(r) for r in runs):
        from .encoders import cli as encoder_cli

        return encoder_cli.compare(
            [str(r) for r in runs],
            baseline=measure["baseline"],
            data=measure["data"],
            batch_size=measure["batch_size"],
            device=measure["device"],
            out=out,
            force=force,
            quiet=quiet,
        )
    check_output(out, force=force, inputs=local_inputs(*runs, measure["baseline"], *measure["data"]))
    c = _measure_runs(runs, quiet=quiet, **measure)
    header, rows = c.table()
    table = Table(title="domainprune compare")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 240).print(table)  # a pipe gets every column, not 80 characters
    files = c.save(out, force=force)
    console.print("wrote " + ", ".join(str(f) for f in files), soft_wrap=True)


@app.command()
@with_options(_parameters(_measure_options), "measure", after=2)
def report(
    runs: Annotated[
        Optional[list[Path]],
        typer.Argument(
            metavar="[RUN_DIR]...", help="Pruned run folders (default: every run in --figures).", show_default=False
        ),
    ] = None,
    figures: Annotated[
        Optional[Path],
        typer.Option(
            "--figures",
            "--compare",
            help="Take the figures from a compare.json or bench/results/quality.jsonl instead of measuring.",
        ),
    ] = None,
    measure: dict = None,
    measure_speed: Annotated[
        bool,
        typer.Option(
            "--measure-speed",
            help="With --figures that hold no throughput: measure it here, every model in this process.",
        ),
    ] = False,
    title: Annotated[str, typer.Option(help="Page title.")] = "domainprune report",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.html, report.md and the plots.")] = Path(
        "report"
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
    quiet: QuietOpt = False,
):
    """A self-contained HTML page (and Markdown) with the figures, ratios, plots, recipes and generation samples.

    Without --figures the runs are measured here, as `compare` does; measurement options then apply.
    """
    from .compare import add_samples, add_speed, check_runs, load_figures, select
    from .encoders.report import encoder_figures
    from .outputs import check_output, local_inputs
    from .report import write_report

    _setup_logging(quiet)
    runs = runs or []
    m = measure
    if (runs and all(_is_encoder(r) for r in runs)) or (not runs and figures and encoder_figures(figures)):
        from .encoders import cli as encoder_cli

        return encoder_cli.report(
            [str(r) for r in runs],
            figures=figures,
            baseline=m["baseline"],
            data=m["data"],
            batch_size=m["batch_size"],
            device=m["device"],
            title=title,
            out=out,
            force=force,
            quiet=quiet,
        )
    check_output(out, force=force, inputs=local_inputs(*runs, figures, m["baseline"], *m["data"]))
    if figures is None:
        c = _measure_runs(runs, quiet=quiet, **m)
    else:
        c = load_figures(figures)
        if runs:
            check_runs([str(r) for r in runs])
            c = select(c, runs)
        if m["baseline"]:
            c.dense.source, c.dense.path = m["baseline"], None
        if not c.runs:
            raise DomainpruneError(f"{figures} holds no pruned runs; give run folders or a fuller figures file")
        if c.samples is None and m["prompts"]:
            add_samples(
                c, m["prompts"], m["new_tokens"], dtype=m["dtype"], device=m["device"], text_field=m["text_field"]
            )
        if measure_speed and not any(e.measurement.decode_tokens_per_s for e in c.entries):
            add_speed(c, dtype=m["dtype"], device=m["device"])
    files = write_report(c, out, title=title, force=force)
    console.print(
        f"[bold green]report[/] {len(c.runs)} run(s) beside the dense model; wrote {files['report.html']} and "
        f"{files['report.md']}",
        soft_wrap=True,
    )


@app.command()
def vocab(
    model: Annotated[
        str, typer.Argument(help="Model to trim: preset, HF folder (pruned ones too), .gguf file or hub id.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the trimmed checkpoint.")],
    data: DataOpt = "code",
    coverage: Annotated[
        Optional[float],
        typer.Option(help="Fraction of the domain's calibration tokens to keep, in (0, 1] (default 0.999)."),
    ] = None,
    size: Annotated[Optional[int], typer.Option(help="Keep exactly this many tokens (--strategy size).")] = None,
    strategy: Annotated[
        Optional[str], typer.Option(help="coverage, size or optuna (default: size with --size, else coverage).")
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="optuna: weight α of coverage against LM-head FLOPs saved, in [0, 1].")
    ] = 0.5,
    min_coverage: Annotated[
        float, typer.Option(help="optuna: least calibration coverage a size may have, in [0, 1].")
    ] = 0.0,
    trials: Annotated[int, typer.Option(help="optuna: TPE trials (seed 42).")] = 30,
    general: Annotated[
        str, typer.Option(help="General corpus for the report's coverage and bits/byte ('' to skip).")
    ] = "general",
    eval_chars: Annotated[
        int, typer.Option(help="Test characters per corpus for tokens/char and bits/byte (0 to skip).")
    ] = 50_000,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 4,
    speed: Annotated[
        bool, typer.Option("--speed/--no-speed", help="Measure LM-head and decode speed against the input model.")
    ] = True,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
):
    """Keep only the tokens the domain uses: a smaller embedding and LM head, a consistent tokenizer,
    vocab_report.json."""
    from .data import load_corpus
    from .models import load_model
    from .outputs import check_output, local_inputs
    from .vocab import evaluate_trim, report_rows, save, trim_vocabulary

    _setup_logging(quiet)
    check_output(out, force=force, inputs=local_inputs(model, data, general))
    loaded = load_model(model, dtype=dtype, device=device)
    corpus = load_corpus(data, text_field=text_field)
    trimmed, tokenizer, report = trim_vocabulary(
        loaded,
        corpus,
        coverage=coverage,
        size=size,
        strategy=strategy,
        alpha=alpha,
        min_coverage=min_coverage,
        trials=trials,
        text_field=text_field,
    )
    evaluate_trim(
        loaded,
        trimmed,
        tokenizer,
        report,
        domain=corpus,
        general=general or None,
        chars=eval_chars,
        seq_len=seq_len,
        batch_size=batch_size,
        speed=speed,
        text_field=text_field,
    )
    save(trimmed, tokenizer, report, out, force=force)
    table = Table(title=f"domainprune vocab ({report.strategy})")
    for name, justify in (("figure", "left"), ("original", "right"), ("trimmed", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    for row in report_rows(report):
        table.add_row(*row)
    Console().print(table)
    console.print(
        f"[bold green]trimmed[/] {report.original_vocab:,} → {report.kept_vocab:,} tokens; wrote {out} "
        "(vocab_report.json)"
    )


def _recovery_parameters() -> list[inspect.Parameter]:
    from .options import RecoveryConfig

    return _declared_parameters(RecoveryConfig)


@app.command()
@with_options(_recovery_parameters(), "config", after=3)
def recover(
    ctx: typer.Context,
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Pruned run folder (the --out of `domainprune prune`).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder for the recovered checkpoint (not RUN_DIR or inside it: inputs are never modified; "
            "`prune --recover` recovers its own output).",
        ),
    ],
    config: dict,
    keep_checkpoints: Annotated[
        bool, typer.Option("--keep-checkpoints", help="Keep the staging folder with Trainer checkpoints.")
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
):
    """Repair a pruned model on domain data: LoRA (or --full) with optional distillation from the dense model, merged
    back into a plain checkpoint in OUT."""
    from .recover import recover as run

    _setup_logging(quiet)
    if _is_encoder(run_dir):  # contrastive recovery; --batch-size means pairs per batch (default 32 there)
        from click.core import ParameterSource

        from .encoders import cli as encoder_cli

        explicit = ctx.get_parameter_source("batch_size") == ParameterSource.COMMANDLINE
        return encoder_cli.recover(
            run_dir,
            out=out,
            data=config["data"],
            steps=config["max_steps"] or 60,
            batch_size=config["batch_size"] if explicit else 32,
            lr=config["lr"] or 2e-5,
            seed=config["seed"],
            device=config["device"],
            force=force,
            quiet=quiet,
        )
    config |= {"max_steps": config["max_steps"] or None, "time_budget": config["time_budget"] or None}  # 0: none
    result = run(run_dir, out=out, force=force, keep_checkpoints=keep_checkpoints, progress=not quiet, **config)
    r = result.report
    first, last = r.get("first_loss"), r.get("last_loss")
    curve = f"loss {first:.3f} → {last:.3f}, " if first is not None and last is not None else ""
    console.print(
        f"[bold green]recovered[/] {r['steps']} steps, {curve}{r['train_seconds']:.0f} s training"
        + (" (time budget reached)" if r["stopped_by_time_budget"] else "")
    )
    if "trained_params" in r:
        t = r["trained_params"]
        console.print(
            f"trained {t['total']:,} of {t['model']:,} parameters ({100 * t['total'] / t['model']:.3f}%): "
            f"norms {t['norms']:,}, biases {t['biases']:,}, lora {t['lora']:,}"
        )
    console.print(f"wrote {result.out} (recovery.json, recovery_log.json)")


def parse_key_values(items: list[str] | None, option: str, example: str) -> dict:
    """Repeated `option KEY=VALUE` as a dict (JSON values, else strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DomainpruneError(f"{option} {item!r} is not KEY=VALUE; write e.g. {option} {example}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@app.command()
def export(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN", help="Pruned run folder (any domainprune output) or HF model folder.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="What to write: the .gguf file (--to gguf), a folder (hf, vllm).")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="Exporter: gguf (llama.cpp, Ollama, LM Studio), vllm (a DeciLM checkpoint for per-layer widths), hf "
            "(a transformers checkpoint, e.g. in another --option dtype=bfloat16), or any registered one.",
        ),
    ] = "gguf",
    quant: Annotated[
        Optional[str],
        typer.Option(
            help="--to gguf: f32 (default), f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (quantised by llama.cpp's "
            "own quantiser; needs the serve extra). The same as --option quant=QUANT."
        ),
    ] = None,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="An exporter option KEY=VALUE, repeatable (docs/export.md lists them)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    quiet: QuietOpt = False,
):
    """Write a run for a serving engine with a registered exporter: one GGUF file for llama.cpp (its own architecture
    when every layer is alike, else `deci`), a DeciLM checkpoint folder that vLLM runs with per-layer widths, or a
    transformers checkpoint."""
    from .exporters import export as run_export

    _setup_logging(quiet)
    options = parse_key_values(option, "--option", "quant=q4_k_m")
    if quant is not None:
        options["quant"] = quant
    r = run_export(run_dir, out, to.lower(), force=force, **options)
    console.print(f"[bold green]exported[/] {r.summary}", soft_wrap=True)
    for note in r.notes:
        console.print(f"  {note}", soft_wrap=True)


# Operating-system failures that are the machine's state, not a bug: one line naming the fix, no traceback.
OS_FIXES = {
    errno.ENOSPC: "free some space, or point --out (or $DOMAINPRUNE_CACHE for the cache) at a larger disk",
    errno.EDQUOT: "free some space, or point --out (or $DOMAINPRUNE_CACHE for the cache) at a larger disk",
    errno.EROFS: "choose a writable --out (or $DOMAINPRUNE_CACHE for the cache)",
    errno.EACCES: "choose a location you may write to (--out, or $DOMAINPRUNE_CACHE for the cache)",
    errno.ENOMEM: "lower --batch-size or --calib-samples, or use a machine with more memory",
}


def _os_errno(e: BaseException) -> int | None:
    """The errno behind `e`: an OSError's own, or the "(os error N)" that safetensors' Rust writer reports."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    match = re.search(r"os error (\d+)", str(e))
    return int(match.group(1)) if match else None


def _fail(message: str) -> None:
    # soft_wrap: one line whatever the width (rich would wrap at 80 columns when stderr is not a terminal)
    # escape: the message may hold brackets (paths, lists) that rich would take for markup
    console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def main() -> None:
    try:
        app()
    except DomainpruneError as e:
        _fail(str(e))
    except MemoryError:
        _fail(f"out of memory; {OS_FIXES[errno.ENOMEM]}")
    except Exception as e:
        code = _os_errno(e)
        if code not in OS_FIXES:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"{os.strerror(code)}{where}; {OS_FIXES[code]}. Nothing was written to --out.")


if __name__ == "__main__":
    main()
