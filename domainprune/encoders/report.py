"""`domainprune report` for sentence encoders: one self-contained page (report.html, plots embedded as base64 PNG)
and report.md (plots beside it) with dense vs pruned retrieval (nDCG@10, MRR@10 per task, % of dense), parameters,
encoding speed, what every layer keeps, and each run's recipe, pruning cost and recovery.

The figures are the `results` of `domainprune compare` / `eval --json` for encoders (first entry: the dense model):
measured here, or read back from a compare.json.
"""

from __future__ import annotations

import html
import json
import platform
from pathlib import Path
from typing import Any

from ..errors import DomainpruneError
from ..report import CSS, _embedded_figure, _figure, _html_table, _png

PLOTS = (("retrieval.png", "Retrieval quality against parameters"), ("layers.png", "What every layer keeps"))
RUN_FILES = ("recipe.json", "report.json", "recover.json")


def encoder_figures(path: Path) -> bool:
    """True for a compare.json written by the encoder `compare` (its results carry retrieval `tasks`)."""
    try:
        results = json.loads(Path(path).read_text()).get("results")
        return isinstance(results, list) and bool(results) and all("tasks" in r for r in results)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def load_results(path: Path) -> list[dict[str, Any]]:
    """The `results` of an encoder compare.json (or eval --json), checked enough to report on."""
    try:
        results = json.loads(Path(path).read_text())["results"]
        assert isinstance(results, list) and results and all("tasks" in r and "name" in r for r in results)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DomainpruneError(
            f"{path} is not an encoder compare.json; write one with `domainprune compare RUN... --out DIR`"
        ) from None
    if len(results) < 2:
        raise DomainpruneError(f"{path} holds one model; a report needs the dense model and at least one run")
    return results


def _run_files(name: str) -> dict[str, dict]:
    folder = Path(name)
    out = {}
    for file in RUN_FILES:
        try:
            out[file] = json.loads((folder / file).read_text())
        except (OSError, ValueError):
            continue
    return out


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: parameters and every task's figures, with ratios to the dense model (the first entry)."""
    dense = results[0]
    tasks = list(dense["tasks"])
    header = ["model", "params", "(×fewer)", "attention+FFN"]
    for t in tasks:
        header += [f"{t} nDCG@10", "(% dense)", f"{t} MRR@10", "(% dense)", f"{t} sent/s", "(×dense)"]
    rows = []
    for r in results:
        row = [r["name"], f"{r['params']:,}", f"{dense['params'] / r['params']:.3f}"]
        row.append(f"{r['attention_mlp_params']:,}" if "attention_mlp_params" in r else "-")
        for t in tasks:
            mine, base = r["tasks"].get(t), dense["tasks"][t]
            if mine is None:
                row += ["-"] * 6
                continue
            for key in ("ndcg@10", "mrr@10"):
                row += [f"{mine[key]:.4f}", f"{100 * mine[key] / base[key]:.1f}" if base[key] else "-"]
            row += [f"{mine['sentences_per_s']:.1f}", f"{mine['sentences_per_s'] / base['sentences_per_s']:.2f}"]
        rows.append(row)
    return header, rows


def recipe_rows(name: str) -> list[tuple[str, str]]:
    files = _run_files(name)
    rows = []
    recipe = files.get("recipe.json", {})
    for key in ("model", "data", "method", "sparsity", "allocation", "compensation", "general_ratio", "units"):
        if key in recipe:
            rows.append((key, str(recipe[key])))
    report = files.get("report.json", {})
    if "sparsity_achieved" in report:
        rows.append(("attention+FFN removed", f"{report['sparsity_achieved']:.1%}"))
    if "prune_seconds" in report:
        rows.append(("pruning time", f"{report['prune_seconds']:.0f} s on {report.get('device', '?')}"))
    if "stock_loadable" in report:
        loader = "SentenceTransformer (stock)" if report["stock_loadable"] else "domainprune.load_pretrained"
        rows.append(("load with", loader))
    rec = files.get("recover.json")
    if rec:
        rows.append(
            (
                "recovery",
                f"{rec['steps']} InfoNCE steps of {rec['batch_size']} pairs on {rec.get('data', '?')}, lr {rec['lr']}, "
                f"loss {rec['loss_first']:.3f} → {rec['loss_last']:.3f}, {rec['train_seconds']:.0f} s",
            )
        )
    return rows


def retrieval_png(results: list[dict[str, Any]]) -> bytes:
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    for t in results[0]["tasks"]:
        points = [(r["params"] / 1e6, r["tasks"][t]["ndcg@10"]) for r in results if t in r["tasks"]]
        line = ax.plot(*zip(*points[1:]), "o", label=f"{t} (pruned)")[0]
        ax.plot(*points[0], "*", markersize=14, color=line.get_color(), label=f"{t} (dense)")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def layers_png(results: list[dict[str, Any]]) -> bytes:
    dense = results[0].get("per_layer")
    fig = _figure(7, 0.6 + 1.6 * max(1, len(results) - 1))
    axes = fig.subplots(max(1, len(results) - 1), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, results[1:]):
        layers = r.get("per_layer")
        ax.set_title(r["name"] if len(r["name"]) < 60 else "…" + r["name"][-59:], fontsize=9)
        if not layers or not dense:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no per-layer widths recorded", ha="center", va="center")
            continue
        x = range(len(layers))
        width = 0.4
        ax.bar([i - width / 2 for i in x], [s["heads"] / dense[0]["heads"] for s in layers], width, label="heads")
        ax.bar(
            [i + width / 2 for i in x],
            [s["intermediate"] / dense[0]["intermediate"] for s in layers],
            width,
            label="FFN channels",
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept")
        ax.set_xticks(list(x))
        ax.legend(fontsize=7, loc="lower right")
    axes[-1].set_xlabel("layer (after any removed whole layers)")
    return _png(fig)


def describe(results: list[dict[str, Any]]) -> str:
    first = results[0]["tasks"]
    tasks = ", ".join(f"`{t}` ({f['queries']} queries over {f['passages']} passages)" for t, f in first.items())
    return (
        f"Dense model: `{results[0]['name']}`. Test splits: {tasks}; nDCG@10 and MRR@10 rank every query against "
        f"its split's whole corpus. Speed: encoding throughput of queries + passages, on {platform.machine()} "
        f"({platform.processor() or 'CPU'}); one measurement each, so compare it only on an idle machine."
    )


def render_markdown(results: list[dict[str, Any]], title: str) -> str:
    header, rows = table(results)
    lines = [f"# {title}", "", describe(results), "", "## Figures and ratios to dense", ""]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Plots", ""] + [f"![{caption}]({name})" for name, caption in PLOTS]
    lines += ["", "## Recipes", ""]
    for r in results[1:]:
        lines += [f"### {r['name']}", ""]
        lines += [f"- {k}: {v}" for k, v in recipe_rows(r["name"])] or ["- recipe not recorded"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_html(results: list[dict[str, Any]], images: list[bytes], title: str) -> str:
    header, rows = table(results)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(describe(results))}</p>',
        "<h2>Figures and ratios to dense</h2>",
        _html_table(header, rows),
        "<h2>Plots</h2>",
    ]
    parts += [_embedded_figure(name, caption, png) for (name, caption), png in zip(PLOTS, images)]
    parts.append('<h2>Recipes</h2><div class="recipes">')
    for r in results[1:]:
        body = "".join(
            f'<tr><td class="l">{html.escape(k)}</td><td class="l">{html.escape(v)}</td></tr>'
            for k, v in recipe_rows(r["name"]) or [("recipe", "not recorded")]
        )
        parts.append(f'<table><tr><th colspan="2">{html.escape(r["name"])}</th></tr>{body}</table>')
    parts += ["</div>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(results: list[dict[str, Any]], out: str | Path, title: str, *, force: bool = False) -> dict:
    """report.html (self-contained), report.md and the PNGs in `out`, written whole or not at all."""
    from ..cache import atomic_dir
    from ..outputs import check_output

    out = check_output(out, force=force)
    images = [retrieval_png(results), layers_png(results)]
    pages = {"report.html": render_html(results, images, title), "report.md": render_markdown(results, title)}
    with atomic_dir(out, overwrite=force) as tmp:
        for (name, _), png in zip(PLOTS, images):
            (tmp / name).write_bytes(png)
        for name, text in pages.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return {name: out / name for name in [*(n for n, _ in PLOTS), *pages]}
