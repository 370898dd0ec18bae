"""Recovery benchmark (issue 7): BENCHMARK.md's workload, FLAP with global allocation at 35 % and 50 %, domain and
general figures before and after recovery with CE only, KD from the dense model, and self-data distillation (+ KD);
wall time spent on each recovery. Written to bench/results/recovery.md (raw rows in recovery.jsonl).

    python bench/recovery.py                                   # the full grid (resumable: finished rows are kept)
    python bench/recovery.py --levels 0.35 --variants ce,kd --time-budget 300 --limit 100

Each recovery gets the same wall-clock budget (--time-budget seconds, default 15 minutes) and step cap, so the
variants are compared at equal training time on this machine; the pruned checkpoints are written once to --models-dir
and every variant starts from them. Figures come from `domainprune.measure.measure` (perplexity on 128×256 test
sequences per source, zero-shot acc_norm on piqa/hellaswag/arc_easy with --limit items); speed is not measured here
(recovery does not change shapes, so bench/quality.py's speed figures apply unchanged). Training data are the code
corpus's calibration split, never its test split.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import sys
import time
from pathlib import Path

import torch
from rows import load_rows, save_rows

from domainprune.measure import BENCH_TASKS, Measurement, measure, ratios
from domainprune.models import LoadedModel, load_model
from domainprune.recover import recover
from domainprune.run import prune

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "ce": dict(kd_weight=0.0),
    "kd": dict(kd_weight=0.5, kd_temperature=2.0),
    "sdd": dict(self_distill=True, kd_weight=0.0),
    "sdd+kd": dict(self_distill=True, kd_weight=0.5, kd_temperature=2.0),
}


def run(args) -> None:
    raw = RESULTS / "recovery.jsonl"
    done = load_rows(raw, args.fresh)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    settings = dict(samples=args.samples, seq_len=256, tasks=tasks, limit=args.limit, batch_size=8, speed=False)
    dense = load_model(args.model, dtype="float32", device=args.device)
    if "dense" not in done:
        done["dense"] = {"key": "dense", "measurement": measure(dense, "dense", **settings).to_dict()}
        save_rows(raw, done)
    models_dir = Path(args.models_dir)
    recovery = dict(
        data="code",
        samples=args.train_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        time_budget=args.time_budget,
        save_steps=args.save_steps,
        lr=args.lr,
        device=args.device,
        seed=0,
    )
    for level in (float(x) for x in args.levels.split(",")):
        base = f"flap|global|{level:.2f}"
        folder = models_dir / f"flap_global_{level:.2f}"
        if base not in done or not folder.is_dir():
            print(f"== prune {base}", file=sys.stderr, flush=True)
            model = copy.deepcopy(dense.model)
            loaded = LoadedModel(model, dense.tokenizer, None, args.model)
            started = time.perf_counter()
            result = prune(
                loaded,
                out=folder,
                force=True,
                data="code",
                method="flap",
                allocation="global",
                sparsity=level,
                calib_samples=args.calib_samples,
                seed=0,
                progress=False,
            )
            seconds = time.perf_counter() - started
            if base not in done:
                m = measure(load_model(folder, dtype="float32", device=args.device), base, **settings)
                done[base] = {
                    "key": base,
                    "level": level,
                    "variant": "none",
                    "prune_seconds": seconds,
                    "achieved": result.plan.params.sparsity,
                    "measurement": m.to_dict(),
                }
                save_rows(raw, done)
            del model, loaded, result
            gc.collect()
        for variant in args.variants.split(","):
            key = f"{base}|{variant}"
            if key in done:
                continue
            print(f"== recover {key}", file=sys.stderr, flush=True)
            out = models_dir / f"flap_global_{level:.2f}_{variant}"
            started = time.perf_counter()
            # the dense model in memory is the teacher (KD and self-distillation); resumes if interrupted
            rec = recover(folder, out=out, teacher=dense, force=True, progress=False, **recovery, **VARIANTS[variant])
            seconds = time.perf_counter() - started
            teacher_device = next(dense.model.parameters()).device
            m = measure(load_model(out, dtype="float32", device=str(teacher_device)), key, **settings)
            done[key] = {
                "key": key,
                "level": level,
                "variant": variant,
                "wall_seconds": seconds,
                "train_seconds": rec.report["train_seconds"],
                "steps": rec.report["steps"],
                "stopped_by_time_budget": rec.report["stopped_by_time_budget"],
                "first_loss": rec.report.get("first_loss"),
                "last_loss": rec.report.get("last_loss"),
                "self_distill_seconds": rec.report.get("self_distill_seconds"),
                "checkpoint": str(out),
                "config": rec.config.model_dump(),
                "measurement": m.to_dict(),
            }
            save_rows(raw, done)
            del rec
            gc.collect()
    write_markdown(done, args, tasks)


def _measurement(d: dict) -> Measurement:
    return Measurement(**{k: v for k, v in d.items() if k != "zero_shot_mean"})


def write_markdown(done: dict, args, tasks: tuple[str, ...]) -> None:
    dense = _measurement(done["dense"]["measurement"])
    lines = [
        "# Recovery after pruning: CE vs KD vs self-data distillation",
        "",
        f"Model SmolLM2-135M-Instruct (float32), FLAP with global allocation, domain `code` (calibration "
        f"{args.calib_samples}×256). Recovery: LoRA r=8 α=16 dropout 0.05 on q,k,v,o,gate,up,down, merged into the "
        f"weights; {args.train_samples} training sequences of {args.seq_len} tokens from the code calibration split, "
        f"batch {args.batch_size}×{args.grad_accum}, lr {args.lr or 2e-4:g} (cosine, 5 warm-up steps), at most "
        f"{args.max_steps} steps and {args.time_budget:.0f} s of training each. KD: (1−w)·CE + w·T²·KL with w=0.5, "
        "T=2. Self-data distillation (sdd): the dense model regenerates the second half of every training sequence "
        f"greedily and the loss covers that half. Test perplexity on {dense.test_sequences.get('code')}×256 code and "
        f"{dense.test_sequences.get('general')}×256 general sequences; zero-shot acc_norm on "
        f"{', '.join(tasks) or 'no tasks'}{f' (first {args.limit} items)' if args.limit else ''}. Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        f"Dense: code ppl {dense.perplexity['code']:.3f}, general ppl {dense.perplexity['general']:.3f}"
        + (f", zero-shot mean {dense.zero_shot_mean:.4f}" if dense.zero_shot else "")
        + ".",
        "",
        "| level | recovery | code ppl (×dense) | general ppl (×dense) | zero-shot (Δ dense) | steps | loss first → "
        "last | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        (r for k, r in done.items() if k != "dense"), key=lambda r: (r["level"], r["variant"] != "none", r["variant"])
    )
    for r in rows:
        m = _measurement(r["measurement"])
        q = ratios(m, dense)
        zs = (
            f"{m.zero_shot_mean:.4f} ({-q['zero_shot_drop']:+.4f})" if tasks and len(m.zero_shot) == len(tasks) else "-"
        )
        loss = f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r.get("first_loss") is not None else "-"
        steps = f"{r['steps']}{' (budget)' if r.get('stopped_by_time_budget') else ''}" if "steps" in r else "-"
        wall = r.get("wall_seconds", r.get("prune_seconds"))
        lines.append(
            f"| {r['level']:.0%} | {r['variant'] if r['variant'] != 'none' else 'pruned, no recovery'} | "
            f"{m.perplexity['code']:.3f} ({q['ppl_code']:.2f}×) | {m.perplexity['general']:.3f} "
            f"({q['ppl_general']:.2f}×) | {zs} | {steps} | {loss} | {r.get('train_seconds', 0):.0f} | {wall:.0f} |"
        )
    lines += [
        "",
        "wall s: recovery including data preparation (self-distillation generation) and the verified export; "
        "for the unrecovered rows, the pruning time.",
        "",
    ]
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default="0.35,0.5")
    p.add_argument("--variants", default="ce,kd,sdd", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--samples", type=int, default=128, help="test sequences per source")
    p.add_argument("--tasks", default=",".join(BENCH_TASKS))
    p.add_argument("--limit", type=int, default=500, help="items per zero-shot task")
    p.add_argument("--train-samples", type=int, default=256, help="recovery training sequences")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per recovery training sequence")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 (LoRA)")
    p.add_argument("--max-steps", type=int, default=500, help="step cap; the time budget normally stops first on CPU")
    p.add_argument("--time-budget", type=float, default=900.0, help="seconds of training per recovery (15 minutes)")
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--models-dir", default="runs/bench-recovery")
    p.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {', '.join(sorted(unknown))}; use {', '.join(VARIANTS)}")
    run(args)


if __name__ == "__main__":
    main()
