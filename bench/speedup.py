"""Latency budgets (`--target-speedup`): does the pruned model reach the speedup it was pruned for, on this machine?
SmolLM2-135M, domain `code`, FLAP with global allocation; for every target, the sparsity `--target-speedup` chose,
the speedup its latency table predicted, the speedup measured here, and what the domain paid in perplexity.
Written to bench/results/speedup.md (raw rows in speedup.jsonl).

    python bench/speedup.py                                  # targets 1.2, 1.3, 1.5 at batch-1 decode (resumable)
    python bench/speedup.py --targets 1.5 --phase prefill --rounds 5

The claim checked (issue text): `--target-speedup` meets its target within 5 % in measured decode throughput on this
machine. Measured speedup = median over --rounds rounds of (pruned tokens/s ÷ dense tokens/s), the dense model and the
pruned one measured back to back in each round (alternating which goes first), in this process, each as `domainprune
eval` measures it (batch 1; decode: 1 / the median gap between new tokens of `generate`, 128 new tokens after a
64-token prompt; prefill: --prefill-tokens tokens; --speed-repeats timed runs; both models warmed up once before the
first round). `prune()`'s own confirmation (report.json's `speedup.measured`, one round) is listed beside
it. Run it on an otherwise idle machine: the latency table (cached after the first target) and every speed figure
are wall-clock timings.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rows import load_rows, save_rows

from domainprune.errors import DomainpruneError
from domainprune.evaluate import throughput
from domainprune.latency import latency_table
from domainprune.measure import Measurement, measure
from domainprune.models import LoadedModel, load_model
from domainprune.run import prune

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 0.05


def row_key(args, target: float) -> str:
    return f"{args.method}|{args.allocation}|x{target:.2f}|{args.phase}" + (
        f"|round{args.round_to}" if args.round_to else ""
    )


def speeds(model: torch.nn.Module, args, warmup: bool = False) -> dict[str, float]:
    t = throughput(model, prefill_len=args.prefill_tokens, repeats=args.speed_repeats, warmup=warmup)
    return {"decode": t["decode_tokens_per_s"], "prefill": t["prefill_tokens_per_s"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(args) -> None:
    raw = RESULTS / "speedup.jsonl"
    done = load_rows(raw, args.fresh)
    dense = load_model(args.model, dtype="float32", device=args.device)
    settings = dict(sources=("code",), samples=args.samples, seq_len=256, speed=False, progress=False)
    if "dense" not in done:
        m = measure(dense, "dense", **settings)
        done["dense"] = {"key": "dense", "machine": machine(), "measurement": m.to_dict()}
        save_rows(raw, done)
    for target in (float(x) for x in args.targets.split(",")):
        key = row_key(args, target)
        if key in done:
            continue
        print(f"== {key}", file=sys.stderr, flush=True)
        model = copy.deepcopy(dense.model)
        loaded = LoadedModel(model, dense.tokenizer, None, args.model)
        started = time.perf_counter()
        try:
            result = prune(
                loaded,
                data="code",
                method=args.method,
                allocation=args.allocation,
                target_speedup=target,
                speedup_phase=args.phase,
                prefill_tokens=args.prefill_tokens,
                calib_samples=args.calib_samples,
                round_to=args.round_to,
                seed=0,
                progress=False,
            )
        except DomainpruneError as e:  # predicted out of reach: the tool refuses, and the table says so
            done[key] = {
                "key": key,
                "method": args.method,
                "allocation": args.allocation,
                "target": target,
                "phase": args.phase,
                "refused": str(e),
                "machine": machine(),
            }
            save_rows(raw, done)
            continue
        seconds = time.perf_counter() - started
        speeds(dense.model, args, warmup=True), speeds(model, args, warmup=True)  # warm both once
        rounds = []
        for r in range(args.rounds):  # back to back, alternating which goes first, so drift hits both alike
            first, second = (dense.model, model) if r % 2 == 0 else (model, dense.model)
            a, b = speeds(first, args), speeds(second, args)
            d, p = (a, b) if r % 2 == 0 else (b, a)
            rounds.append({"dense": d, "pruned": p})
        ratio = {
            ph: statistics.median(x["pruned"][ph] / x["dense"][ph] for x in rounds) for ph in ("decode", "prefill")
        }
        m = measure(loaded, key, **settings)
        recipe = result.recipe
        done[key] = {
            "key": key,
            "method": args.method,
            "allocation": args.allocation,
            "target": target,
            "phase": args.phase,
            "sparsity": recipe.sparsity,
            "achieved": result.plan.params.sparsity,
            "predicted": recipe.predicted_speedup,
            "measured": ratio[args.phase],
            "measured_decode": ratio["decode"],
            "measured_prefill": ratio["prefill"],
            "prune_measured": result.report["speedup"]["measured"],
            "rounds": rounds,
            "within": abs(ratio[args.phase] / target - 1) <= TOLERANCE,
            "prune_seconds": seconds,
            "uniform": result.report["uniform"],
            "recipe": recipe.model_dump(),
            "machine": machine(),
            "measurement": m.to_dict(),
        }
        save_rows(raw, done)
        del model, loaded, result
        gc.collect()
    table = latency_table(dense.model, prefill_tokens=args.prefill_tokens, progress=False)  # cached by the prunes
    write_markdown(done, args, table)


def rounded(row: dict) -> str:
    multiple = (row.get("recipe") or {}).get("round_to")
    return f", --round-to {multiple}" if multiple else ""


def write_markdown(done: dict, args, table) -> None:
    dense = Measurement.from_dict(done["dense"]["measurement"])
    rows = sorted(
        (r for k, r in done.items() if k != "dense"),
        key=lambda r: (r["phase"], r["method"], r["allocation"], r["target"]),
    )
    fixed = {ph: table.fixed[ph] / table.dense[ph] for ph in ("decode", "prefill")}
    lines = [
        "# Latency budgets: `--target-speedup` against measured speed",
        "",
        f"Model SmolLM2-135M-Instruct (float32), domain `code`, calibration {args.calib_samples}×256 tokens; every row "
        f"pruned with `--target-speedup T` (method and allocation as listed), which measures a latency table on this "
        f"machine (cached) and solves for the smallest sparsity whose plan it predicts to run T× faster "
        f"(docs/allocation.md). Measured: median over {args.rounds} rounds of pruned ÷ dense tokens/s, both models in "
        "this process, back to back, alternating which goes first (batch 1; decode: 1 / the median gap between new "
        f"tokens of `generate`, 128 tokens after a 64-token prompt; prefill {args.prefill_tokens} tokens; "
        f"{args.speed_repeats} timed run(s) per model and round, both warmed up once before the first round); `prune` "
        "column: prune()'s own confirmation (report.json, one round). Code perplexity on "
        f"{dense.test_sequences.get('code')}×256 held-out code sequences, no retraining. Machine: "
        f"{done['dense'].get('machine', machine())}.",
        "",
        f"Latency table: dense {1e3 * table.dense['decode']:.2f} ms per decode step ({fixed['decode']:.0%} of it "
        f"outside attention+MLP: embedding, norms, LM head, `generate`), {1e3 * table.dense['prefill']:.1f} ms per "
        f"{table.prefill_tokens}-token prefill ({fixed['prefill']:.0%} outside); device {table.device}. Dense code "
        f"perplexity {dense.perplexity['code']:.3f}, {dense.params:,} parameters.",
        "",
        "| method | allocation | phase | target | sparsity chosen | achieved | predicted × | measured × | prune × | "
        "within 5 % | decode × | prefill × | code ppl (×dense) | params | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(
                f"| {r['method']} | {r['allocation']} | {r['phase']} | {r['target']:.2f}× | refused: {r['refused']} |"
                + " |" * 10
            )
            continue
        m = Measurement.from_dict(r["measurement"])
        lines.append(
            f"| {r['method']} | {r['allocation']}{rounded(r)} | {r['phase']} | {r['target']:.2f}× | "
            f"{r['sparsity']:.2%} | {r['achieved']:.2%} | {r['predicted']:.3f} | {r['measured']:.3f} | "
            f"{r['prune_measured']:.3f} | {'yes' if r['within'] else 'no'} "
            f"({100 * (r['measured'] / r['target'] - 1):+.1f} %) | {r['measured_decode']:.3f} | "
            f"{r['measured_prefill']:.3f} | {m.perplexity['code']:.3f} "
            f"({m.perplexity['code'] / dense.perplexity['code']:.2f}×) | {m.params / 1e6:.1f}M | "
            f"{r['prune_seconds']:.0f} |"
        )
    solved = [r for r in rows if "refused" not in r]
    met = [r for r in solved if r["within"]]
    off = [f"{r['target']:.2f}× ({100 * (r['measured'] / r['target'] - 1):+.1f} %)" for r in solved if not r["within"]]
    refused = [f"{r['target']:.2f}×" for r in rows if "refused" in r]
    lines += [
        "",
        f"Claim (`--target-speedup` meets its target within 5 % in measured {args.phase} throughput on this machine): "
        f"{len(met)} of {len(solved)} solved targets within 5 %"
        + (f"; off: {', '.join(off)}" if off else "")
        + (f"; refused as predicted out of reach: {', '.join(refused)}" if refused else "")
        + ".",
        "",
    ]
    (RESULTS / "speedup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", default="1.2,1.3,1.5", help="comma-separated speedup targets (> 1)")
    p.add_argument("--phase", default="decode", choices=("decode", "prefill"))
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--method", default="flap")
    p.add_argument("--allocation", default="global")
    p.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="kept MLP widths rounded to a multiple of this (96: the latency table's grid on SmolLM2)",
    )
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--samples", type=int, default=128, help="code test sequences for perplexity")
    p.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="dense/pruned speed rounds per target, alternating which goes first (median of the ratios)",
    )
    p.add_argument("--speed-repeats", type=int, default=1, help="timed runs per model and round")
    p.add_argument("--device", default="auto")
    p.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    args = p.parse_args()
    if any(float(t) <= 1 for t in args.targets.split(",")):
        p.error("--targets must all be above 1")
    run(args)


if __name__ == "__main__":
    main()
