"""`domainprune report`: one self-contained page (report.html, images embedded as base64 PNG, no network needed)
and the same content as report.md (images written beside it), from a `Comparison`.

Content: the figures table with ratios to dense, three plots (domain perplexity against parameters with the Pareto
front; what every layer keeps, from each run's plan.json or, lacking one, its config.json; throughput), each
run's recipe and pruning cost, and the generation samples side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from .compare import Comparison, Entry, markdown_table
from .errors import DomainpruneError
from .generation import fence

log = logging.getLogger(__name__)
PARTS = ("query heads", "KV heads", "MLP channels")
PLOTS = (
    ("pareto.png", "Domain perplexity against parameters"),
    ("layers.png", "What every layer keeps"),
    ("throughput.png", "Throughput"),
)


# ------------------------------------------------------------------------------------------- layer shapes


def shapes_from_config(config: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) per layer of a config.json, `per_layer_config` overrides applied."""
    n = int(config["num_hidden_layers"])
    q = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or q)
    mlp = int(config.get("intermediate_size") or 0)
    per_layer = config.get("per_layer_config") or {}
    shapes = []
    for i in range(n):
        o = per_layer.get(str(i), {})
        skip = set(o.get("skip", []))
        shapes.append(
            (
                0 if "self_attn" in skip else int(o.get("num_attention_heads", q)),
                0 if "self_attn" in skip else int(o.get("num_key_value_heads", kv)),
                0 if "mlp" in skip else int(o.get("intermediate_size", mlp)),
            )
        )
    return shapes


def _config(folder: str | Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _plan(entry: Entry) -> dict[str, Any] | None:
    if not entry.path:
        return None
    path = Path(entry.path) / "plan.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        log.warning("%s is not readable; the layer plot uses %s's config.json instead", path, entry.name)
        return None


def dense_shapes(c: Comparison) -> list[tuple[int, int, int]] | None:
    """Widths before pruning: from any run's plan.json, else from the dense model's config.json."""
    for e in c.runs:
        plan = _plan(e)
        if plan:
            return [tuple(s[:3]) for s in plan["model"]["layers"]]
    config = _config(c.dense.path)
    if config is None and c.dense.source:
        try:
            from .models import resolve_source

            resolved = resolve_source(c.dense.source)
            config = _config(resolved) if isinstance(resolved, Path) else None
        except DomainpruneError as e:
            log.warning("layer plot: cannot read the dense model's config (%s)", e)
    return shapes_from_config(config) if config else None


def kept_fractions(entry: Entry, dense: list[tuple[int, int, int]] | None) -> list[tuple[float, float, float]] | None:
    """Fraction of query heads, KV heads and MLP channels every layer keeps (0 for a dropped layer), indexed by
    the layers of the dense model; None when neither plan.json nor a comparable config.json is there."""
    plan = _plan(entry)
    if plan:
        before = plan["model"]["layers"]
        out = [(0.0, 0.0, 0.0)] * len(before)
        for lp in plan["layers"]:
            if lp.get("drop"):
                continue
            i = lp["index"]
            channels = lp["mlp_channels"]
            n_ch = len(parse_ranges(channels)) if isinstance(channels, str) else len(channels)
            out[i] = tuple(
                k / b if b else 0.0 for k, b in zip((len(lp["query_heads"]), len(lp["kv_heads"]), n_ch), before[i][:3])
            )
        return out
    config = _config(entry.path)
    if config is None or dense is None:
        return None
    shapes = shapes_from_config(config)
    if len(shapes) != len(dense):  # layers were removed, and only plan.json says which
        return None
    return [tuple(k / b if b else 0.0 for k, b in zip(s, d)) for s, d in zip(shapes, dense)]


def parse_ranges(text: str) -> list[int]:
    from .plan import parse_ranges as parse

    return parse(text)


# ------------------------------------------------------------------------------------------------ plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _embedded_figure(name: str, caption: str, png: bytes) -> str:
    """One plot as an HTML <figure> with the PNG inlined (the page needs no other file)."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" data-plot="{name}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _placeholder(title: str, text: str) -> bytes:
    fig = _figure(7, 1.6)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="#555")
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (fewer or equal parameters, lower or equal perplexity)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2, y2) != (x, y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_png(c: Comparison) -> bytes:
    domain = c.domain
    entries = [e for e in c.entries if domain in e.measurement.perplexity]
    if len(entries) < 2:
        return _placeholder("Domain perplexity vs parameters", f"no {domain} perplexity to plot")
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    points = [(e.measurement.params / 1e6, e.measurement.perplexity[domain]) for e in entries]
    front = pareto_front(points)
    ax.step(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        where="post",
        color="#999",
        lw=1,
        ls="--",
        label="Pareto front",
        zorder=1,
    )
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault("dense" if e.role == "dense" else e.label() or e.name, []).append(i)
    markers = "osD^v<>ph*"
    for g, (label, idx) in enumerate(groups.items()):
        style = (
            dict(marker="*", s=220, color="black") if label == "dense" else dict(marker=markers[g % len(markers)], s=60)
        )
        ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], label=label, zorder=3, **style)
    # Names beside every point while they stay legible; beyond that the legend and the x position tell them apart.
    annotate = range(len(entries)) if len(entries) <= 8 else [i for i, e in enumerate(entries) if e.role == "dense"]
    for i in annotate:
        ax.annotate(entries[i].name, points[i], xytext=(5, 5), textcoords="offset points", fontsize=8)
    ys = [p[1] for p in points]
    if max(ys) / min(ys) > 4:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")  # 20, 50, 1,000 rather than 2×10¹
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(
            plain if max(ys) / min(ys) < 30 else NullFormatter()
        )  # label 2..9 over few decades only
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("total parameters (millions)")
    ax.set_ylabel(f"{domain} test perplexity (lower is better)")
    ax.set_title(f"{domain} perplexity vs parameters (dense and {len(entries) - 1} pruned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def layers_png(c: Comparison) -> bytes:
    dense = dense_shapes(c)
    rows = [(e, kept_fractions(e, dense)) for e in c.runs]
    rows = [(e, f) for e, f in rows if f]
    if not rows:
        return _placeholder("Kept per layer", "no plan.json or comparable config.json in the run folders")
    import numpy as np

    fig = _figure(9, 0.45 + 0.95 * len(rows))
    axes = fig.subplots(len(rows), 1, squeeze=False, sharex=True)[:, 0]
    image = None
    for ax, (e, fractions) in zip(axes, rows):
        grid = np.array(fractions, dtype=float).T  # 3 × layers
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(3), PARTS, fontsize=7)
        sp = e.sparsity()
        ax.set_title(f"{e.name}" + (f" ({sp:.0%} removed)" if sp is not None else ""), fontsize=8, loc="left")
    axes[-1].set_xlabel("layer")
    n_layers = len(rows[0][1])
    step = 1 if n_layers <= 32 else max(1, n_layers // 16)
    axes[-1].set_xticks(range(0, n_layers, step))
    axes[-1].tick_params(axis="x", labelsize=7)
    fig.colorbar(image, ax=list(axes), label="fraction kept", shrink=min(1.0, 0.4 + 0.2 * len(rows)))
    return _png(fig)


def throughput_png(c: Comparison) -> bytes:
    entries = [e for e in c.entries if e.measurement.decode_tokens_per_s]
    if not entries:
        # No speed figures: show what bounds decode speed-up when it is memory-bound, and say so.
        fig = _figure(7.5, 3.4)
        ax = fig.subplots()
        names = [e.name for e in c.entries]
        values = [1.0] + [c.ratios(e)["param_ratio"] for e in c.runs]
        ax.bar(names, values, color=["#444"] + ["#4c72b0"] * len(c.runs))
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("parameter bytes dense/pruned")
        ax.set_title(
            "Throughput not measured in these figures: parameter-bytes ratio\n(the memory-bound limit of decode "
            "speed-up)",
            fontsize=9,
        )
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        return _png(fig)
    dense = c.dense.measurement
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    names = [e.name for e in entries]
    for ax, key, title in (
        (axes[0], "decode_tokens_per_s", "decode (batch 1, 128 new tokens)"),
        (axes[1], "prefill_tokens_per_s", "prefill (batch 1, 256 tokens)"),
    ):
        values = [getattr(e.measurement, key) or 0.0 for e in entries]
        ax.bar(names, values, color=["#444" if e.role == "dense" else "#4c72b0" for e in entries])
        base = getattr(dense, key)
        for i, v in enumerate(values):
            ax.text(
                i,
                v,
                f"{v:.0f}" + (f"\n{v / base:.2f}×" if base and entries[i].role != "dense" else ""),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("tokens/s")
        ax.margins(y=0.2)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return _png(fig)


def plots(c: Comparison) -> list[bytes]:
    return [pareto_png(c), layers_png(c), throughput_png(c)]


# ------------------------------------------------------------------------------------------------- pages


def recipe_rows(e: Entry) -> list[tuple[str, str]]:
    rows = [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in (e.recipe or {}).items()]
    p = e.prune
    if p.get("sparsity_achieved") is not None:
        rows.append(("sparsity achieved", f"{p['sparsity_achieved']:.2%}"))
    if p.get("prune_seconds") is not None:
        rows.append(("pruning wall time", f"{p['prune_seconds']:.0f} s"))
    if p.get("peak_memory_bytes") is not None:
        rows.append(("peak memory", f"{p['peak_memory_bytes'] / 2**30:.2f} GiB"))
    if (s := p.get("speedup")) and s.get("measured") is not None:  # --target-speedup: prune()'s own confirmation
        predicted = f", predicted {s['predicted']:.3f}×" if s.get("predicted") is not None else ""
        rows.append(
            ("speedup measured at pruning", f"{s['measured']:.3f}× {s['phase']} (target {s['target']:g}×{predicted})")
        )
    return rows


def _samples(c: Comparison):
    """(prompts, [(model, texts)]) restricted to the models in the comparison, or None."""
    if not c.samples:
        return None
    names = [e.name for e in c.entries]
    models = [(n, c.samples.continuations[n]) for n in names if n in c.samples.continuations]
    return (c.samples.prompts, models) if models else None


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1240px;\
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
p.note{color:#555}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12px;margin:.6em 0}
th,td{border:1px solid #ccc;padding:3px 5px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;white-space:normal;vertical-align:bottom} td:first-child,th:first-child,td.l{text-align:left}
code{background:#f3f3f3;padding:0 3px;border-radius:3px;font-size:.95em}
tr.dense td{background:#fafafa;font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
.recipes{display:flex;flex-wrap:wrap;gap:16px} .recipes table{margin:0}
.samples{display:grid;gap:8px;margin-bottom:1.2em}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;margin:0;\
font-size:12px}
pre.prompt{background:#eef3fb}
.model{font-weight:600;font-size:13px;margin-bottom:2px}
"""


def _inline(text: str) -> str:
    """Escaped text with Markdown `code` spans as <code>."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def _html_table(header: list[str], rows: list[list[str]], dense_first: bool = True) -> str:
    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="dense"' if dense_first and i == 0 else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return "\n".join(out + ["</table></div>"])


def render_html(c: Comparison, images: list[bytes], title: str) -> str:
    header, rows = c.table()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{_inline(c.describe())}</p>',
        "<h2>Figures and ratios to dense</h2>",
        _html_table(header, rows),
        '<p class="note">(×dense) is pruned/dense: below 1 is better for perplexity, above 1 for speed; Δ is the '
        "change in mean zero-shot accuracy; bytes dense/pruned is the memory-bound limit of decode speed-up.</p>",
        "<h2>Plots</h2>",
    ]
    parts += [_embedded_figure(name, caption, png) for (name, caption), png in zip(PLOTS, images)]
    parts.append("<h2>Recipes</h2>")
    if c.runs:
        parts.append('<div class="recipes">')
        for e in c.runs:
            rows_r = recipe_rows(e) or [("recipe", "not recorded")]
            body = "".join(
                f'<tr><td class="l">{html.escape(k)}</td><td class="l">{html.escape(v)}</td></tr>' for k, v in rows_r
            )
            parts.append(f'<table><tr><th colspan="2">{html.escape(e.name)}</th></tr>{body}</table>')
        parts.append("</div>")
    samples = _samples(c)
    parts.append("<h2>Generation samples</h2>")
    if samples:
        prompts, models = samples
        parts.append(f'<p class="note">{_inline(c.samples.markdown().splitlines()[0])}</p>')
        cols = f"grid-template-columns:repeat({min(len(models), 4)},minmax(0,1fr))"
        for i, prompt in enumerate(prompts):
            parts.append(f'<h3>Prompt {i + 1}</h3><pre class="prompt">{html.escape(prompt)}</pre>')
            parts.append(f'<div class="samples" style="{cols}">')
            for name, texts in models:
                parts.append(
                    f'<div><div class="model">{html.escape(name)}</div><pre>{html.escape(texts[i])}</pre></div>'
                )
            parts.append("</div>")
    else:
        parts.append('<p class="note">No generation samples (run with --prompts above 0).</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(c: Comparison, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        c.describe(),
        "",
        "## Figures and ratios to dense",
        "",
        markdown_table(*c.table()),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{caption}]({name})\n" for name, caption in PLOTS]
    lines += ["## Recipes", ""]
    for e in c.runs:
        lines += [
            f"### {e.name}",
            "",
            markdown_table(["field", "value"], [list(r) for r in recipe_rows(e)] or [["recipe", "not recorded"]]),
            "",
        ]
    lines += ["## Generation samples", ""]
    samples = _samples(c)
    if samples:
        prompts, models = samples
        lines.append(c.samples.markdown().splitlines()[0] + "\n")
        for i, prompt in enumerate(prompts):
            lines += [f"### Prompt {i + 1}", "", fence(prompt), ""]
            for name, texts in models:
                lines += [f"**{name}**", "", fence(texts[i]), ""]
    else:
        lines.append("No generation samples (run with --prompts above 0).")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    c: Comparison, out: str | Path, title: str = "domainprune report", *, force: bool = False
) -> dict[str, Path]:
    """report.html (self-contained), report.md and the three PNGs in the folder `out`, written whole or not at all
    (an existing `out` is replaced only with `force`); returns their paths."""
    from .cache import atomic_dir
    from .outputs import check_output

    out = check_output(out, force=force)
    images = plots(c)
    pages = {"report.html": render_html(c, images, title), "report.md": render_markdown(c, title)}
    with atomic_dir(out, overwrite=force) as tmp:
        for (name, _), png in zip(PLOTS, images):
            (tmp / name).write_bytes(png)
        for name, text in pages.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return {**{name: out / name for name, _ in PLOTS}, **{name: out / name for name in pages}}
