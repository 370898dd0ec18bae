"""BENCHMARK.md's protocol: every criterion × allocation × sparsity level on SmolLM2-135M and the code domain,
all measured in one process beside the dense model, written to bench/results/quality.md.

    python bench/quality.py                      # the full grid (resumable: finished rows are kept)
    python bench/quality.py --methods flap --levels 0.35 --limit 100

Phase 1 prunes every row and measures perplexity (checkpoints kept in --models-dir); phase 2 adds zero-shot
accuracy from those checkpoints; phase 3 measures decode/prefill throughput of the dense model and every checkpoint
together (run it on an otherwise idle machine: `--remeasure-speed` redoes it). Raw rows go to
bench/results/quality.jsonl as they finish, so an interrupted run continues where it stopped; `--fresh` starts over.
Speed figures are ratios to the dense model measured in this same run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rows import load_rows, save_rows

from domainprune.evaluate import checkpoint_bytes
from domainprune.measure import BENCH_TASKS, Measurement, measure, ratios
from domainprune.models import LoadedModel, load_model
from domainprune.run import prune
from domainprune.runfolder import save_pruned

RESULTS = Path(__file__).parent / "results"


class PeakRSS:
    """Samples the process's resident memory in a thread; `peak` is the maximum seen while active."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# recipe additions of issue 4 (`--variants`): a row's allocation column reads "<allocation>+<variant>"
VARIANTS = {
    "": {},
    "obs": dict(reconstruct="obs"),
    "hidden10": dict(hidden_sparsity=0.10),
    "hidden20": dict(hidden_sparsity=0.20),
    "finercut10": dict(depth="finercut", depth_sparsity=0.10),
    "shortgpt10": dict(depth="shortgpt", depth_sparsity=0.10),
}
ISSUE4_METHODS = {"obs", "shortgpt", "finercut"}
ISSUE4_ALLOCATIONS = {"owl", "adapt", "cfsp", "search"}


def row_key(method: str, allocation: str, level: float, variant: str = "") -> str:
    return f"{method}|{allocation}{'+' + variant if variant else ''}|{level:.2f}"


def is_issue4(row: dict) -> bool:
    """Rows made with what issue 4 adds (reconstruction, allocations, depth, hidden) rather than a baseline."""
    return (
        row.get("method") in ISSUE4_METHODS
        or row.get("allocation", "").split("+")[0] in ISSUE4_ALLOCATIONS
        or "+" in row.get("allocation", "")
    )


def run(args) -> None:
    raw = RESULTS / "quality.jsonl"
    done = load_rows(raw, args.fresh)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    dense = load_model(args.model, dtype="float32", device=args.device)
    settings = dict(
        samples=args.samples, seq_len=256, tasks=tasks, limit=args.limit, batch_size=8, speed_repeats=args.speed_repeats
    )
    if "dense" not in done:
        m = measure(dense, "dense", **{**settings, "speed": False})
        with tempfile.TemporaryDirectory() as tmp:
            dense.model.save_pretrained(tmp)
            m.checkpoint_bytes = checkpoint_bytes(tmp)
        done["dense"] = {"key": "dense", "measurement": m.to_dict()}
        save_rows(raw, done)
    models_dir = Path(args.models_dir)
    # Phase 1: prune, export, perplexity and speed for every row (checkpoints kept for phase 2).
    combos = [
        (m, a, v)
        for m in args.methods.split(",")
        for a in args.allocations.split(",")
        for v in args.variants.split(",")
    ]
    for method, allocation, variant in combos:
        for level in (float(x) for x in args.levels.split(",")):
            key = row_key(method, allocation, level, variant)
            if key in done:
                continue
            print(f"== {key}", file=sys.stderr, flush=True)
            model = copy.deepcopy(dense.model)
            loaded = LoadedModel(model, dense.tokenizer, None, args.model)
            started = time.perf_counter()
            with PeakRSS() as mem:
                result = prune(
                    loaded,
                    data="code",
                    method=method,
                    allocation=None if allocation == "-" else allocation,
                    sparsity=level,
                    calib_samples=args.calib_samples,
                    seq_len=args.calib_seq_len,
                    seed=0,
                    progress=False,
                    **VARIANTS[variant],
                )
            seconds = time.perf_counter() - started
            m = measure(loaded, key, **{**settings, "tasks": (), "speed": False})
            folder = models_dir / key.replace("|", "_")
            plan_files = {
                "plan.json": result.plan.model_dump_json(indent=1) + "\n",
                "recipe.json": result.recipe.model_dump_json(indent=1) + "\n",
            }
            save_pruned(
                model, dense.tokenizer, folder, force=True, verify=True, extra_files=plan_files
            )  # plan.json: report's layer plot
            m.checkpoint_bytes = checkpoint_bytes(folder)
            done[key] = {
                "key": key,
                "method": method,
                "allocation": allocation + ("+" + variant if variant else ""),
                "level": level,
                "achieved": result.plan.params.sparsity,
                "prune_seconds": seconds,
                "peak_rss_bytes": mem.peak,
                "recipe": result.recipe.model_dump(),
                "uniform": result.report["uniform"],
                "checkpoint": str(folder),
                "measurement": m.to_dict(),
            }
            save_rows(raw, done)
            del model, loaded, result
            gc.collect()
    # Phase 2: zero-shot accuracy for the rows that lack it, from the saved checkpoints.
    if tasks:
        from domainprune.tasks import evaluate_task

        order = {m: i for i, m in enumerate(args.zero_shot_order.split(","))}
        for key, row in sorted(
            done.items(), key=lambda kv: (order.get(kv[1].get("method"), len(order)), kv[1].get("level", 0))
        ):
            zero_shot = row["measurement"].get("zero_shot") or {}
            if key == "dense" or all(t in zero_shot for t in tasks):
                continue
            if args.zero_shot_rows and not any(w in key for w in args.zero_shot_rows.split(",")):
                continue
            if not Path(row.get("checkpoint", "")).is_dir():
                if not args.reprune:
                    continue
                reprune(dense, row, args)
            print(f"== zero-shot {key}", file=sys.stderr, flush=True)
            loaded = load_model(row["checkpoint"], dtype="float32", device=args.device)
            for t in tasks:
                zero_shot[t] = evaluate_task(loaded.model, loaded.tokenizer, t, limit=args.limit)["acc_norm"]
            row["measurement"]["zero_shot"] = zero_shot
            row["measurement"]["zero_shot_mean"] = sum(zero_shot.values()) / len(zero_shot)
            save_rows(raw, done)
            del loaded
            gc.collect()
    # Phase 3: throughput of the dense model and every checkpoint, measured together (run on a quiet machine).
    if args.speed:
        from domainprune.evaluate import throughput

        rows = [k for k in done if k == "dense" or Path(done[k].get("checkpoint", "")).is_dir()]
        if args.speed_rows:
            wanted = args.speed_rows.split(",")
            rows = [k for k in rows if k == "dense" or any(w in k for w in wanted)]
        for key in rows:
            m = done[key]["measurement"]
            if m.get("decode_tokens_per_s") and not args.remeasure_speed:
                continue
            print(f"== speed {key}", file=sys.stderr, flush=True)
            model = (
                dense.model
                if key == "dense"
                else load_model(done[key]["checkpoint"], dtype="float32", device=args.device).model
            )
            t = throughput(model, repeats=args.speed_repeats)
            m["decode_tokens_per_s"], m["prefill_tokens_per_s"] = t["decode_tokens_per_s"], t["prefill_tokens_per_s"]
            save_rows(raw, done)
    write_markdown(done, args, tasks)
    if args.report:  # the same page `domainprune report --figures bench/results/quality.jsonl` writes
        from domainprune.compare import add_samples, from_bench_rows
        from domainprune.report import write_report

        figures = from_bench_rows(list(done.values()), str(raw), relative_to=raw)
        if args.report_prompts:
            add_samples(figures, args.report_prompts, dtype="float32", device=args.device)
        written = write_report(figures, RESULTS / "report", title="domainprune benchmark", force=True)
        print(f"report: {written['report.html']}", file=sys.stderr)


def reprune(dense: LoadedModel, row: dict, args) -> None:
    """Rebuild a row's checkpoint (not kept in git) exactly as phase 1 made it, and check that it is the same model:
    pruning is deterministic by seed, so its code perplexity must match the row's."""
    method, allocation, level = row["key"].split("|")
    allocation, _, variant = allocation.partition("+")
    print(f"== re-prune {row['key']}", file=sys.stderr, flush=True)
    loaded = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, None, args.model)
    prune(
        loaded,
        data="code",
        method=method,
        allocation=None if allocation == "-" else allocation,
        sparsity=float(level),
        calib_samples=args.calib_samples,
        seq_len=args.calib_seq_len,
        seed=0,
        progress=False,
        **VARIANTS[variant],
    )
    samples = row["measurement"]["test_sequences"]["code"]  # the row's own test set, whatever --samples says now
    m = measure(
        loaded,
        row["key"],
        sources=("code",),
        samples=samples,
        seq_len=256,
        tasks=(),
        speed=False,
        batch_size=8,
        progress=False,
    )
    want, got = row["measurement"]["perplexity"]["code"], m.perplexity["code"]
    if abs(got / want - 1) > 1e-5:
        raise SystemExit(f"re-pruned {row['key']} has code ppl {got:.4f}, the row says {want:.4f}: not the same model")
    save_pruned(loaded.model, dense.tokenizer, row["checkpoint"], force=True, verify=True)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _measurement(d: dict) -> Measurement:
    d = {k: v for k, v in d.items() if k != "zero_shot_mean"}
    return Measurement(**d)


def write_markdown(done: dict, args, tasks: tuple[str, ...]) -> None:
    dense = _measurement(done["dense"]["measurement"])
    tasks = tasks or tuple(dense.zero_shot)  # a speed-only pass reports the tasks measured earlier
    lines = [
        "# Quality and speed: criteria × allocation × sparsity",
        "",
        f"Model SmolLM2-135M-Instruct (de-quantised from Q4_1, float32), domain `code`, calibration "
        f"{args.calib_samples}×{args.calib_seq_len} tokens from the calibration pool (FLAP's and Wanda-sp's own "
        f"sequence length; magnitude uses none); test perplexity on {dense.test_sequences.get('code')}×256 code and "
        f"{dense.test_sequences.get('general')}×256 general (Wikipedia) test sequences (the general test split holds "
        "only that many); zero-shot acc_norm on "
        f"{', '.join(tasks) or 'no tasks'}{f' (first {args.limit} items each)' if args.limit else ''}. Every row "
        "pruned and measured in one process beside the dense model; speed ratios are to the dense model in that same "
        "run (batch 1; decode: 128 tokens after a 64-token prompt, the rows here timed as the wall time of the whole "
        "`generate` call, from before `evaluate.throughput` switched to the median gap between new tokens "
        f"(bench/results/speedup.md); prefill 256 tokens; median of {args.speed_repeats} timed runs after a warm-up). "
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}.",
        "",
        f"Dense: code ppl {dense.perplexity['code']:.3f}, general ppl {dense.perplexity['general']:.3f}, "
        + (
            f"zero-shot mean {dense.zero_shot_mean:.4f} "
            f"({', '.join(f'{t} {v:.3f}' for t, v in dense.zero_shot.items())}), "
            if dense.zero_shot
            else ""
        )
        + f"{dense.params:,} parameters, {dense.checkpoint_bytes / 1e6:.1f} MB, decode "
        f"{_fmt(dense.decode_tokens_per_s, 1)} tok/s, prefill {_fmt(dense.prefill_tokens_per_s, 1)} tok/s.",
        "",
        "| method | allocation | target | achieved | params | MB | code ppl (×dense) | general ppl (×dense) | "
        "zero-shot (Δ) | decode × | prefill × | bytes dense/pruned | prune s | peak RSS GiB | export |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for k, r in done.items() if k != "dense"]
    rows.sort(key=lambda r: (r["level"], r["method"], r["allocation"]))
    for r in rows:
        m = _measurement(r["measurement"])
        q = ratios(m, dense)
        zs = (
            f"{m.zero_shot_mean:.4f} ({-q['zero_shot_drop']:+.4f})"
            if tasks and all(t in m.zero_shot for t in tasks)
            else "-"
        )
        lines.append(
            f"| {r['method']} | {r['allocation']} | {r['level']:.0%} | {r['achieved']:.2%} | {m.params / 1e6:.1f}M | "
            f"{m.checkpoint_bytes / 1e6:.1f} | {m.perplexity['code']:.3f} ({q['ppl_code']:.2f}×) | "
            f"{m.perplexity['general']:.3f} ({q['ppl_general']:.2f}×) | {zs} | {_fmt(q.get('decode_speedup'))} | "
            f"{_fmt(q.get('prefill_speedup'))} | {q['param_ratio']:.2f} | {r['prune_seconds']:.0f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {'stock' if r['uniform'] else 'per_layer_config'} |"
        )
    best = {}
    for r in rows:
        m = _measurement(r["measurement"])
        if r["level"] not in best or m.perplexity["code"] < best[r["level"]][1]:
            best[r["level"]] = (r["key"], m.perplexity["code"])
    lines += [
        "",
        "Reading the table: `prune s` is the wall time of `prune()` in this process; the calibration statistics are "
        "cached by model and data, so rows after the first data-driven non-sequential row reuse them (FLAP and global "
        "Wanda-sp show seconds), while sequential Wanda-sp (uniform) recomputes per row, and its times vary with the "
        "load other jobs put on the shared 2-core machine. `-` in the zero-shot column: not measured in this run "
        "(magnitude at 35/50 % is already far beyond chance-level perplexity); `-` in the speed columns: not measured "
        "(phase 3 was run for the dense model, every FLAP row and every 35 % row). `export`: `stock` loads with "
        "`AutoModelForCausalLM`, `per_layer_config` with `domainprune.load_pretrained`.",
    ]
    lines += [
        "",
        "Lowest code perplexity per level: "
        + "; ".join(f"{lvl:.0%}: {k} ({p:.3f})" for lvl, (k, p) in sorted(best.items())),
        "",
    ]
    lines += domain_claim(done, dense, tasks)
    lines += issue4_targets(done, dense)
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def issue4_targets(done: dict, dense: Measurement) -> list[str]:
    """Issue 4: per level, the best of its recipes against the best baseline, and the retraining-free targets."""
    rows = [r for k, r in done.items() if k != "dense"]
    mine = [r for r in rows if is_issue4(r)]
    if not mine:
        return []
    limits = {0.35: 1.4, 0.5: 2.0}
    lines = [
        "",
        "## Reconstruction, allocation, depth and hidden pruning against the baselines (issue 4)",
        "",
        "Per level, the lowest code perplexity among issue 4's recipes (OBS reconstruction, owl/cfsp/search "
        "allocation, depth, hidden channels) and among the baselines (every other row); target without training: "
        "within 1.4× dense at 35 % and 2.0× at 50 %.",
        "",
        "| level | best issue-4 recipe | code ppl (×dense) | best baseline | code ppl (×dense) | beats baselines | "
        "target |",
        "|---|---|---|---|---|---|---|",
    ]
    ppl = lambda r: r["measurement"]["perplexity"]["code"]  # noqa: E731
    for level in sorted({r["level"] for r in mine}):
        best = min((r for r in mine if r["level"] == level), key=ppl)
        base = [r for r in rows if r["level"] == level and not is_issue4(r)]
        ref = min(base, key=ppl) if base else None
        ratio = ppl(best) / dense.perplexity["code"]
        target = f"{'met' if ratio <= limits[level] else 'missed'} (≤{limits[level]}×)" if level in limits else "-"
        base_ppl = f"{ppl(ref):.3f} ({ppl(ref) / dense.perplexity['code']:.2f}×)" if ref else "-"
        beats = ("yes" if ppl(best) < ppl(ref) else "no") if ref else "-"
        lines.append(
            f"| {level:.0%} | {best['key']} | {ppl(best):.3f} ({ratio:.2f}×) | {ref['key'] if ref else '-'} | "
            f"{base_ppl} | {beats} | {target} |"
        )
    return lines


def domain_claim(done: dict, dense: Measurement, tasks: tuple[str, ...], tolerance: float = 0.05) -> list[str]:
    """Issue 3's claim, checked row by row: at equal sparsity and allocation, dpruner/gaprune keep general perplexity
    and zero-shot accuracy closer to dense than domain-only taylor, with code perplexity within `tolerance` of it."""
    taylor = {(r["allocation"], r["level"]): r for r in done.values() if r.get("method") == "taylor"}
    out = []
    for r in sorted(done.values(), key=lambda r: (r.get("method", ""), r.get("allocation", ""), r.get("level", 0))):
        base = taylor.get((r.get("allocation"), r.get("level")))
        if r.get("method") not in ("dpruner", "gaprune") or base is None:
            continue
        m, t = _measurement(r["measurement"]), _measurement(base["measurement"])
        code = m.perplexity["code"] / t.perplexity["code"]
        general = m.perplexity["general"] / t.perplexity["general"]
        zs_known = tasks and all(k in m.zero_shot for k in tasks) and all(k in t.zero_shot for k in tasks)
        zs = m.zero_shot_mean - t.zero_shot_mean if zs_known else None
        holds = code <= 1 + tolerance and general < 1 and (zs is None or zs >= 0)
        out.append(
            f"| {r['method']} | {r['allocation']} | {r['level']:.0%} | {code:.3f} | {general:.3f} | "
            f"{'-' if zs is None else f'{zs:+.4f}'} | "
            f"{'holds' if holds else 'fails'}{'' if zs_known else ' (no zero-shot)'} |"
        )
    if not out:
        return []
    return [
        "## Domain-aware criteria against domain-only Taylor (issue 3's claim)",
        "",
        "Ratios to `taylor` at the same allocation and level (below 1 is better); the claim holds when code "
        f"perplexity is within {tolerance:.0%} of taylor's while general perplexity is lower and zero-shot accuracy no "
        "lower.",
        "",
        "| method | allocation | level | code ppl / taylor's | general ppl / taylor's | zero-shot − taylor's | claim |",
        "|---|---|---|---|---|---|---|",
        *out,
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    # Gradient criteria (issue 3) are opt-in, not in the default grid: e.g.
    #   --methods taylor,fisher,dpruner,gaprune,nirvana --allocations uniform,global
    # (nirvana's own allocation: --methods nirvana --allocations nirvana-ratio). dpruner/gaprune read the bundled
    # `general` corpus as their second stream; all of them run forward+backward (micro-batch 1) on calibration data.
    p.add_argument("--methods", default="magnitude,wanda-sp,flap")
    p.add_argument(
        "--allocations",
        default="uniform,global",
        help="comma-separated; '-' for none (depth methods alone: shortgpt, finercut)",
    )
    p.add_argument("--levels", default="0.2,0.35,0.5")
    p.add_argument(
        "--variants",
        default="",
        help=f"comma-separated recipe additions per row ('' = none): {', '.join(v for v in VARIANTS if v)}",
    )
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument(
        "--calib-seq-len", type=int, default=128, help="FLAP and Wanda-sp both calibrate on 128-token sequences"
    )
    p.add_argument("--samples", type=int, default=128, help="test sequences per source")
    p.add_argument("--tasks", default=",".join(BENCH_TASKS))
    p.add_argument("--limit", type=int, default=500, help="items per zero-shot task")
    p.add_argument("--speed-repeats", type=int, default=3, help="timed throughput runs (median) after a warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--zero-shot-order", default="flap,wanda-sp,magnitude", help="phase 2 runs methods in this order")
    p.add_argument(
        "--zero-shot-rows", default="", help="phase 2 only for rows whose key contains one of these (comma-separated)"
    )
    p.add_argument(
        "--reprune", action="store_true", help="phase 2: rebuild missing checkpoints (checked against the row)"
    )
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip phase 3 (throughput)")
    p.add_argument(
        "--speed-rows", default="", help="phase 3 only for rows whose key contains one of these (comma-separated)"
    )
    p.add_argument("--remeasure-speed", action="store_true", help="measure phase 3 again for every row")
    p.add_argument("--models-dir", default="runs/bench", help="where the pruned checkpoints are kept for phase 2")
    p.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    p.add_argument(
        "--no-report", dest="report", action="store_false", help="skip bench/results/report/ (report.html, report.md)"
    )
    p.add_argument("--report-prompts", type=int, default=3, help="generation samples in the report per model (0: none)")
    run(p.parse_args())


if __name__ == "__main__":
    main()
