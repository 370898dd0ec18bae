"""Several pruned models beside their dense model, measured in one process: the figures behind `domainprune compare`
and `domainprune report`, and the one format (compare.json) both commands and `bench/quality.py` share.

A `Comparison` holds one `Entry` per model (the dense one first) with its `Measurement`, where it lives, the recipe
that made it and what pruning cost, plus the generation samples. It comes from `compare()` (measuring now), from a
saved compare.json, or from the benchmark's bench/results/quality.jsonl (`load_figures` reads either).
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import jsonl_records
from .errors import DomainpruneError
from .generation import NEW_TOKENS, PROMPTS, Samples, domain_prompts
from .mbpp import CODE_TASKS, MAX_NEW_TOKENS
from .measure import Measurement, measure, ratios

log = logging.getLogger(__name__)
FORMAT = "domainprune.compare/1"


@dataclass
class Entry:
    name: str
    measurement: Measurement
    role: str = "pruned"  # "dense" or "pruned"
    path: str | None = None  # the model folder, when there is one
    source: str | None = None  # what to give load_model (a preset for the dense model), when not the folder
    recipe: dict[str, Any] | None = None
    prune: dict[str, Any] = field(default_factory=dict)  # sparsity_achieved, prune_seconds, peak_memory_bytes

    @property
    def loadable(self) -> str | None:
        return self.path or self.source

    def label(self) -> str:
        """'flap/global' from the recipe, '' without one."""
        r = self.recipe or {}
        return "/".join(str(r[k]) for k in ("method", "allocation") if r.get(k))

    def sparsity(self) -> float | None:
        if self.role == "dense":
            return 0.0
        if self.prune.get("sparsity_achieved") is not None:
            return float(self.prune["sparsity_achieved"])
        return (self.recipe or {}).get("sparsity")

    def to_dict(self, dense: Measurement | None = None) -> dict[str, Any]:
        d = {
            "name": self.name,
            "role": self.role,
            "path": self.path,
            "source": self.source,
            "recipe": self.recipe,
            "prune": self.prune,
            "measurement": self.measurement.to_dict(),
        }
        if dense is not None and self.role != "dense":
            d["ratios"] = ratios(self.measurement, dense)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Entry":
        return cls(
            d["name"],
            Measurement.from_dict(d["measurement"]),
            d.get("role", "pruned"),
            d.get("path"),
            d.get("source"),
            d.get("recipe"),
            dict(d.get("prune") or {}),
        )


@dataclass
class Comparison:
    domain: str  # the corpus whose perplexity is the domain figure (the first --data)
    entries: list[Entry]  # the dense model first
    settings: dict[str, Any] = field(default_factory=dict)
    samples: Samples | None = None
    origin: str = "measured"  # or the file the figures were read from

    def __post_init__(self) -> None:
        if not self.entries or self.entries[0].role != "dense":
            raise DomainpruneError("a comparison needs the dense model's figures first")

    @property
    def dense(self) -> Entry:
        return self.entries[0]

    @property
    def runs(self) -> list[Entry]:
        return self.entries[1:]

    def ratios(self, entry: Entry) -> dict[str, float]:
        return ratios(entry.measurement, self.dense.measurement)

    def sources(self) -> list[str]:
        """Perplexity sources, the domain first."""
        seen = [self.domain] if self.domain in self.dense.measurement.perplexity else []
        for e in self.entries:
            seen += [s for s in e.measurement.perplexity if s not in seen]
        return seen

    def _measured(self, figure: str) -> list[str]:
        """The tasks any model has `figure` (a Measurement dict) for, in first-seen order."""
        seen: list[str] = []
        for e in self.entries:
            seen += [t for t in getattr(e.measurement, figure) if t not in seen]
        return seen

    def tasks(self) -> list[str]:
        return self._measured("zero_shot")

    def code_tasks(self) -> list[str]:
        return self._measured("pass_at_1")

    # ----- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        dense = self.dense.measurement
        return {
            "format": FORMAT,
            "domain": self.domain,
            "origin": self.origin,
            "settings": self.settings,
            "models": [e.to_dict(dense) for e in self.entries],
            "generation": self.samples.to_dict() if self.samples else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "measured") -> "Comparison":
        gen = d.get("generation")
        return cls(
            d["domain"],
            [Entry.from_dict(e) for e in d["models"]],
            dict(d.get("settings") or {}),
            Samples.from_dict(gen) if gen else None,
            d.get("origin") or origin,
        )

    def save(self, out: str | Path, *, force: bool = False) -> list[Path]:
        """compare.json and compare.md (the table, then the generation samples) in the folder `out`, written whole
        or not at all; an existing `out` is replaced only with `force`."""
        from .cache import atomic_dir
        from .outputs import check_output

        out = check_output(out, force=force)
        parts = ["# domainprune compare", "", self.describe(), "", markdown_table(*self.table()), ""]
        if self.samples:
            parts += ["## Generation samples", "", self.samples.markdown()]
        with atomic_dir(out, overwrite=force) as tmp:
            (tmp / "compare.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            (tmp / "compare.md").write_text("\n".join(parts).rstrip() + "\n")
        return [out / "compare.json", out / "compare.md"]

    def describe(self) -> str:
        d = self.dense.measurement
        seqs = ", ".join(f"{n}×{self.settings.get('seq_len', 256)} `{s}`" for s, n in d.test_sequences.items())
        text = (
            f"Dense model `{self.dense.loadable or self.dense.name}`; domain `{self.domain}`; test perplexity on "
            f"{seqs or '-'} test sequences"
        )
        if d.zero_shot:
            limit = self.settings.get("limit")
            text += f"; zero-shot acc_norm on {', '.join(d.zero_shot)}" + (
                f" (first {limit} items each)" if limit else ""
            )
        for t in self.code_tasks():
            n = d.problems.get(t)
            text += f"; {t} pass@1 (greedy, run in a sandbox) on the first {n} test problems" if n else f"; {t} pass@1"
        origin = "measured in one process" if self.origin == "measured" else f"figures from {self.origin}"
        if self.settings.get("speed_measured_separately"):
            origin += "; throughput measured afterwards, all models in one process"
        speed = (
            "; speed is batch 1 on this machine" if any(e.measurement.decode_tokens_per_s for e in self.entries) else ""
        )
        return text + f"; {origin}. Ratios are to the dense model{speed}."

    # ----- the table -----------------------------------------------------------------------------------------
    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the figures table, one row per model, each figure with its ratio to dense."""
        sources, tasks, code = self.sources(), self.tasks(), self.code_tasks()
        speed = any(e.measurement.decode_tokens_per_s for e in self.entries)
        header = ["model", "method", "sparsity", "params", "MB"]
        header += [f"{s} ppl (×dense)" for s in sources]
        header += [f"{t} acc_norm" for t in tasks]
        if tasks:
            header.append("zero-shot mean (Δ)")
        header += [f"{t} pass@1 (Δ)" for t in code]
        if speed:
            header += ["decode tok/s (×)", "prefill tok/s (×)"]
        header.append("bytes dense/pruned")
        rows = []
        for e in self.entries:
            m, r, is_dense = e.measurement, self.ratios(e), e.role == "dense"
            sp = e.sparsity()
            row = [
                e.name,
                "dense" if is_dense else e.label() or "-",
                "-" if sp is None else f"{sp:.1%}",
                f"{m.params / 1e6:.1f}M",
                f"{m.checkpoint_bytes / 1e6:.1f}" if m.checkpoint_bytes else "-",
            ]
            for s in sources:
                ppl = m.perplexity.get(s)
                row.append(
                    "-"
                    if ppl is None
                    else f"{ppl:.3f}"
                    if is_dense or f"ppl_{s}" not in r
                    else f"{ppl:.3f} ({r[f'ppl_{s}']:.2f}×)"
                )
            row += [f"{m.zero_shot[t]:.3f}" if t in m.zero_shot else "-" for t in tasks]
            if tasks:
                zs = m.zero_shot_mean
                row.append(
                    "-"
                    if zs is None
                    else f"{zs:.4f}"
                    if is_dense or "zero_shot_drop" not in r
                    else f"{zs:.4f} ({-r['zero_shot_drop']:+.4f})"
                )
            for t in code:
                p, drop = m.pass_at_1.get(t), r.get(f"pass_at_1_drop_{t}")
                row.append("-" if p is None else f"{p:.3f}" if is_dense or drop is None else f"{p:.3f} ({-drop:+.3f})")
            if speed:
                for key, ratio in (
                    ("decode_tokens_per_s", "decode_speedup"),
                    ("prefill_tokens_per_s", "prefill_speedup"),
                ):
                    v = getattr(m, key)
                    row.append(
                        "-" if not v else f"{v:.1f}" if is_dense or ratio not in r else f"{v:.1f} ({r[ratio]:.2f}×)"
                    )
            row.append("1.00" if is_dense else f"{r['param_ratio']:.2f}")
            rows.append(row)
        return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ run folders


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DomainpruneError(f"{path} is not readable JSON ({e}); re-create the run folder") from None


def run_entry(path: str | Path, measurement: Measurement, name: str) -> Entry:
    """An entry for a run folder: its recipe.json and report.json, when present."""
    folder = Path(path)
    report = _read_json(folder / "report.json") or {}
    prune = {k: report[k] for k in ("sparsity_achieved", "prune_seconds", "peak_memory_bytes") if k in report}
    return Entry(name, measurement, "pruned", str(folder), None, _read_json(folder / "recipe.json"), prune)


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [Path(r).name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def default_baseline(runs: Sequence[str | Path]) -> str:
    """The model the runs' recipes name, when they all name the same one."""
    models = set()
    for run in runs:
        recipe = _read_json(Path(run) / "recipe.json") or {}
        models.add(recipe.get("model"))
    if len(models) != 1 or None in models:
        raise DomainpruneError("cannot tell the dense model from the runs' recipe.json files; give --baseline DENSE")
    return models.pop()


def check_runs(runs: Sequence[str | Path]) -> None:
    if not runs:
        raise DomainpruneError("give at least one run folder (the --out of `domainprune prune`)")
    for run in runs:
        if not (Path(run) / "config.json").is_file():
            raise DomainpruneError(
                f"{run} is not a model folder (no config.json); give the --out folder of `domainprune prune`"
            )


# ----------------------------------------------------------------------------------------------- measuring


def compare(
    runs: Sequence[str | Path],
    baseline: str | None = None,
    *,
    sources: Sequence[str] = ("code", "general"),
    samples: int = 128,
    seq_len: int = 256,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    speed: bool = True,
    speed_repeats: int = 3,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    text_field: str = "text",
    prompts: int = PROMPTS,
    new_tokens: int = NEW_TOKENS,
    lm_eval: bool = False,
    code_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
) -> Comparison:
    """Measure the dense model and every run folder in this process, one model in memory at a time, and (with
    `prompts` > 0) let each continue the same held-out domain prompts."""
    from .models import load_model

    check_runs(runs)
    sources = list(sources)
    if not sources:
        raise DomainpruneError("give at least one --data corpus (the first is the domain)")
    if lm_eval:
        from .measure import require_lm_eval

        if not tasks:
            raise DomainpruneError("--lm-eval runs zero-shot tasks; give them with --tasks")
        require_lm_eval()
    baseline = baseline or default_baseline(runs)
    gen = (
        Samples(sources[0], new_tokens, domain_prompts(sources[0], prompts, text_field=text_field)) if prompts else None
    )
    settings = dict(
        samples=samples,
        seq_len=seq_len,
        tasks=list(tasks),
        limit=limit,
        speed=speed,
        speed_repeats=speed_repeats,
        batch_size=batch_size,
        dtype=dtype,
        zero_shot="lm-eval" if lm_eval else "domainprune",
    )
    if any(t in CODE_TASKS for t in tasks):
        settings["code_tokens"] = code_tokens
    entries = []
    for i, (target, name) in enumerate([(baseline, "dense"), *zip(runs, run_names(runs))]):
        log.info("measuring %s", name)
        loaded = load_model(target, dtype=dtype, device=device)
        m = measure(
            loaded,
            name,
            sources=sources,
            samples=samples,
            seq_len=seq_len,
            tasks=tuple(tasks),
            limit=limit,
            speed=speed,
            speed_repeats=speed_repeats,
            batch_size=batch_size,
            text_field=text_field,
            progress=progress,
            lm_eval=lm_eval,
            code_tokens=code_tokens,
        )
        if i == 0:
            path = str(loaded.path) if loaded.path is not None else None
            entries.append(Entry("dense", m, "dense", path, str(baseline)))
        else:
            entries.append(run_entry(target, m, name))
        if gen:
            gen.add(name, loaded)
        del loaded
        gc.collect()
    return Comparison(sources[0], entries, settings, gen)


def add_samples(
    c: Comparison,
    prompts: int = PROMPTS,
    new_tokens: int = NEW_TOKENS,
    *,
    dtype: str = "auto",
    device: str = "auto",
    text_field: str = "text",
) -> None:
    """Generation samples for a comparison read from a file, from every model in it that can be loaded."""
    from .models import load_model

    c.samples = Samples(c.domain, new_tokens, domain_prompts(c.domain, prompts, text_field=text_field))
    for e in c.entries:
        if not e.loadable or (e.path and not Path(e.path).is_dir()):
            log.warning("no samples for %s: its checkpoint is not on this machine", e.name)
            continue
        loaded = load_model(e.loadable, dtype=dtype, device=device)
        c.samples.add(e.name, loaded)
        del loaded
        gc.collect()


def add_speed(c: Comparison, repeats: int = 3, *, dtype: str = "auto", device: str = "auto") -> None:
    """Decode/prefill throughput, measured now, for a comparison read from a file whose figures have none."""
    from .evaluate import throughput
    from .models import load_model

    for e in c.entries:
        if not e.loadable or (e.path and not Path(e.path).is_dir()):
            log.warning("no throughput for %s: its checkpoint is not on this machine", e.name)
            continue
        loaded = load_model(e.loadable, dtype=dtype, device=device)
        t = throughput(loaded.model, repeats=repeats)
        e.measurement.decode_tokens_per_s, e.measurement.prefill_tokens_per_s = (
            t["decode_tokens_per_s"],
            t["prefill_tokens_per_s"],
        )
        del loaded
        gc.collect()
    c.settings["speed_measured_separately"] = True


# ------------------------------------------------------------------------------------------- saved figures


def _locate(path: str | None, relative_to: Path) -> str | None:
    """A checkpoint path as recorded (relative to where the writer ran): as is, else beside an ancestor of the file."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    for parent in relative_to.resolve().parents:
        if (parent / p).exists():
            return str(parent / p)
    return str(p)


def from_bench_rows(
    rows: Sequence[dict[str, Any]], origin: str = "bench", relative_to: Path | None = None
) -> Comparison:
    """bench/quality.py's rows ({key, method, allocation, level, achieved, prune_seconds, peak_rss_bytes, recipe,
    checkpoint, measurement}; the dense one keyed "dense") as a comparison, the benchmark's row order kept."""
    if not all(isinstance(r, dict) and "key" in r and "measurement" in r for r in rows):
        raise DomainpruneError(
            f'{origin} is not a benchmark JSONL (every row needs "key" and "measurement"); give '
            "bench/results/quality.jsonl or a compare.json"
        )
    dense = next((r for r in rows if r.get("key") == "dense"), None)
    if dense is None:
        raise DomainpruneError(f"{origin} has no dense row; run bench/quality.py to measure the dense model first")
    others = [r for r in rows if r.get("key") != "dense"]
    model = next((r["recipe"].get("model") for r in others if r.get("recipe")), None)
    entries = [Entry("dense", Measurement.from_dict(dense["measurement"]), "dense", None, dense.get("source") or model)]
    for r in others:
        prune = {
            "sparsity_achieved": r.get("achieved"),
            "prune_seconds": r.get("prune_seconds"),
            "peak_memory_bytes": r.get("peak_rss_bytes"),
        }
        path = _locate(r.get("checkpoint"), relative_to) if relative_to else r.get("checkpoint")
        entries.append(
            Entry(
                r["key"],
                Measurement.from_dict(r["measurement"]),
                "pruned",
                path,
                None,
                r.get("recipe"),
                {k: v for k, v in prune.items() if v is not None},
            )
        )
    m = entries[0].measurement
    domain = "code" if "code" in m.perplexity else next(iter(m.perplexity), "code")
    seq_len = next((r["recipe"].get("seq_len") for r in others if r.get("recipe")), 256)
    return Comparison(domain, entries, {"seq_len": seq_len, "tasks": list(m.zero_shot)}, None, origin)


def load_figures(path: str | Path) -> Comparison:
    """A compare.json, or the benchmark's quality.jsonl."""
    path = Path(path)
    if not path.is_file():
        raise DomainpruneError(
            f"figures file {path} does not exist; give a compare.json or bench/results/quality.jsonl"
        )
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            rows = [row for _, row in jsonl_records(path, "give the benchmark's JSONL as it was written", text)]
            return from_bench_rows(rows, str(path), relative_to=path)
        data = json.loads(text)
    except (ValueError, KeyError, TypeError) as e:
        raise DomainpruneError(f"{path} is not a compare.json or benchmark JSONL ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DomainpruneError(f"{path} is not a compare.json ({FORMAT}); write one with `domainprune compare`")
    c = Comparison.from_dict(data, str(path))
    for e in c.entries:
        e.path = _locate(e.path, path)
    return c


def select(c: Comparison, runs: Sequence[str | Path]) -> Comparison:
    """The dense entry and the entries of the given run folders (matched by resolved path), in the order given."""
    by_path = {Path(e.path).resolve(): e for e in c.runs if e.path}
    chosen = []
    for run in runs:
        entry = by_path.get(Path(run).resolve())
        if entry is None:
            raise DomainpruneError(
                f"{run} has no figures in {c.origin}; measure it with `domainprune compare` or leave out the figures "
                "file"
            )
        chosen.append(entry)
    return Comparison(c.domain, [c.dense, *chosen], c.settings, c.samples, c.origin)
