"""The encoder side of `domainprune prune / eval / recover / compare`: cli.py hands over here when --model (or the
run) is a sentence encoder, so a user learns one tool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import DomainpruneError
from ..outputs import check_output, local_inputs

console = Console(stderr=True)
# Decoder-only recipe options, with the value meaning "not given".
DECODER_ONLY = {
    "depth": None,
    "depth_sparsity": None,
    "hidden_sparsity": None,
    "experts_keep": None,
    "target_params": None,
    "target_speedup": None,
    "vocab_coverage": None,
    "vocab_size": None,
    "round_to": None,
    "micro_batch": None,
    "taylor_mode": None,
    "calib_candidates": 1,
}


# --reconstruct -> encoder compensation (encoders/compensate.py); --bias-compensation -> "bias"
RECONSTRUCT = {"none": "none", "obs": "refit", "obs-dense": "refit-dense"}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def prune(
    model: str, recipe: dict, *, out: Path, recover: bool, export_to: str | None, force: bool, quiet: bool
) -> None:
    from .pipeline import prune_encoder, recover_encoder

    for name, unset in DECODER_ONLY.items():
        if recipe.get(name) != unset:
            raise DomainpruneError(f"{_option(name)} applies to decoders only; drop it for the encoder {model!r}")
    from .allocate import ALLOCATIONS

    allocation = recipe.get("allocation") or "uniform"
    ALLOCATIONS.lookup(allocation)
    reconstruct = recipe.get("reconstruct") or "none"
    if reconstruct not in RECONSTRUCT:
        raise DomainpruneError(f"encoders take --reconstruct {', '.join(RECONSTRUCT)}, not {reconstruct!r}")
    if reconstruct != "none" and recipe.get("bias_compensation"):
        raise DomainpruneError("--reconstruct refits the biases itself; drop --bias-compensation")
    compensation = "bias" if recipe.get("bias_compensation") else RECONSTRUCT[reconstruct]
    if recipe.get("deploy") == "transformers" and allocation != "uniform":
        raise DomainpruneError("--deploy transformers needs every layer alike: drop --allocation or the --deploy")
    units = recipe.get("encoder_units") or "all"
    if recipe.get("deploy") == "transformers":  # a stock config has one head count: every head stays
        units = "ffn"
    if recipe.get("deploy") not in (None, "transformers"):
        raise DomainpruneError(
            "encoders deploy with sentence-transformers: use --deploy transformers (a stock "
            "config: FFN channels only) or leave --deploy out"
        )
    if export_to is not None:
        raise DomainpruneError(
            "encoders are exported after pruning: prune with --deploy transformers, then "
            "`domainprune export RUN --to gguf --out FILE.gguf`"
        )
    fields: dict[str, Any] = {
        "data": recipe["data"],
        "general_data": recipe.get("general_data") or "general",
        "sparsity": 0.35 if recipe.get("sparsity") is None else recipe["sparsity"],
        "units": units,
        "allocation": allocation,
        "compensation": compensation,
        "general_ratio": recipe.get("general_ratio") or 0.0,
        "calib_samples": recipe["calib_samples"],
        "batch_size": recipe["batch_size"],
        "seed": recipe["seed"],
        "seq_len": recipe["seq_len"],
        "device": recipe["device"],
    }
    if recipe.get("method"):
        fields["method"] = recipe["method"]
    result = prune_encoder(model, out=out, force=force, progress=not quiet, **fields)
    r = result.report
    console.print(
        f"[bold green]pruned[/] {model} with {result.recipe.method}: attention+FFN parameters "
        f"{r['attention_mlp_params'][0]:,} → {r['attention_mlp_params'][1]:,} "
        f"({r['sparsity_achieved']:.1%}); wrote {out} in {r['prune_seconds']:.0f} s"
    )
    if recover:
        rec = recover_encoder(
            out,
            out=out,
            in_place=True,
            force=True,
            data=recipe["data"],
            seed=recipe["seed"],
            device=recipe["device"],
            progress=not quiet,
        )
        console.print(
            f"[bold green]recovered[/] {rec.report['steps']} contrastive steps in "
            f"{rec.report['train_seconds']:.0f} s; wrote {out}"
        )
    loader = "SentenceTransformer" if r["stock_loadable"] else "domainprune.load_pretrained"
    console.print(f"load it with {loader}({str(out)!r})")


def _table(title: str, names: list[str], figures: list[dict[str, dict[str, float]]], params: list[int]) -> Table:
    table = Table(title=title)
    table.add_column("figure")
    for name in names:
        table.add_column(name if len(name) < 40 else "…" + name[-39:], justify="right")
    for task in figures[0]:
        first = figures[0][task]
        for key in ("ndcg@10", "mrr@10", "sentences_per_s"):
            label = (
                f"{task} {key} ({first['queries']} queries, {first['passages']} passages)"
                if key != "sentences_per_s"
                else f"{task} sentences/s"
            )
            table.add_row(
                label, *(f"{f[task][key]:.4f}" if key != "sentences_per_s" else f"{f[task][key]:.1f}" for f in figures)
            )
    table.add_row("parameters", *(f"{p:,}" for p in params))
    return table


def _measure(names: list[str], data: list[str], batch_size: int, device: str, quiet: bool) -> list[dict]:
    from ..models import resolve_device
    from .model import encoder_units, load_encoder
    from .pipeline import evaluate_encoder

    results = []
    for name in names:
        model = load_encoder(name, device=resolve_device(device))
        figures = evaluate_encoder(model, data=data, batch_size=batch_size, progress=not quiet)
        units = encoder_units(model)
        results.append(
            {
                "name": name,
                "params": sum(p.numel() for p in model.parameters()),
                "attention_mlp_params": units.attention_mlp_params(),
                "per_layer": units.per_layer(),
                "tasks": figures,
            }
        )
    return results


def _baseline(runs: list[str], baseline: str | None) -> str:
    """The dense model: --baseline, or the one model every run's recipe.json names."""
    if baseline is not None:
        return baseline
    recipes = [Path(r) / "recipe.json" for r in runs]
    models = {json.loads(f.read_text()).get("model") for f in recipes if f.is_file()}
    if len(models) != 1:
        raise DomainpruneError("give --baseline: the runs' recipe.json files do not name one dense model")
    return models.pop()


def evaluate(
    model: str,
    *,
    data: list[str],
    baseline: str | None,
    batch_size: int,
    device: str,
    json_out: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    if json_out is not None:
        check_output(json_out, force=force, kind="file", inputs=local_inputs(model, baseline, *data), option="--json")
    names = ([baseline] if baseline else []) + [model]
    results = _measure(names, data, batch_size, device, quiet)
    Console().print(
        _table(
            "domainprune eval (encoder retrieval, test split)",
            names,
            [r["tasks"] for r in results],
            [r["params"] for r in results],
        )
    )
    if json_out is not None:
        from ..cache import atomic_write_bytes

        atomic_write_bytes(json_out, (json.dumps({"results": results}, indent=1) + "\n").encode())


def compare(
    runs: list[str],
    *,
    baseline: str | None,
    data: list[str],
    batch_size: int,
    device: str,
    out: Path,
    force: bool,
    quiet: bool,
) -> None:
    from .. import cache

    check_output(out, force=force, inputs=local_inputs(*runs, baseline))
    names = [_baseline(runs, baseline), *runs]
    results = _measure(names, data, batch_size, device, quiet)
    table = _table(
        "domainprune compare (encoders)", names, [r["tasks"] for r in results], [r["params"] for r in results]
    )
    Console(width=240).print(table)
    lines = [
        "| model | params | " + " | ".join(f"{t} nDCG@10 | {t} MRR@10 | {t} sent/s" for t in data) + " |",
        "|---|---:|" + "---:|" * (3 * len(data)),
    ]
    for r in results:
        cells = [
            f"{r['tasks'][t]['ndcg@10']:.4f} | {r['tasks'][t]['mrr@10']:.4f} | {r['tasks'][t]['sentences_per_s']:.1f}"
            for t in data
        ]
        lines.append(f"| {r['name']} | {r['params']:,} | " + " | ".join(cells) + " |")
    with cache.atomic_dir(out, overwrite=force) as tmp:
        (tmp / "compare.json").write_text(json.dumps({"results": results}, indent=1) + "\n")
        (tmp / "compare.md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}")


def report(
    runs: list[str],
    *,
    figures: Path | None,
    baseline: str | None,
    data: list[str],
    batch_size: int,
    device: str,
    title: str,
    out: Path,
    force: bool,
    quiet: bool,
) -> None:
    """Measure the runs beside the dense model (or read a compare.json) and write report.html / report.md."""
    from .report import load_results, write_report

    check_output(out, force=force, inputs=local_inputs(*runs, figures, baseline))
    if figures is not None:
        results = load_results(figures)
        if runs:  # the dense model and the named runs, in the order given
            by_name = {r["name"]: r for r in results[1:]}
            missing = [r for r in runs if r not in by_name]
            if missing:
                raise DomainpruneError(
                    f"{figures} holds no figures for {', '.join(missing)}; measure them with compare"
                )
            results = [results[0], *(by_name[r] for r in runs)]
        if baseline is not None:
            results[0] = {**results[0], "name": baseline}
    else:
        if not runs:
            raise DomainpruneError("give encoder run folders, or --figures with a compare.json")
        results = _measure([_baseline(runs, baseline), *runs], data, batch_size, device, quiet)
    files = write_report(results, out, title, force=force)
    console.print(
        f"[bold green]report[/] {len(results) - 1} encoder run(s) beside the dense model; wrote "
        f"{files['report.html']} and {files['report.md']}",
        soft_wrap=True,
    )


def recover(
    run_dir: Path,
    *,
    out: Path,
    data: str | None,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    force: bool,
    quiet: bool,
) -> None:
    from .pipeline import recover_encoder

    result = recover_encoder(
        run_dir,
        out=out,
        force=force,
        data=data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        progress=not quiet,
    )
    r = result.report
    console.print(
        f"[bold green]recovered[/] {r['steps']} contrastive steps, loss {r['loss_first']:.3f} → "
        f"{r['loss_last']:.3f}, {r['train_seconds']:.0f} s; wrote {result.out}"
    )
