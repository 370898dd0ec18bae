"""Vocabulary trimming on BENCHMARK.md's workload: SmolLM2-135M-Instruct, domain `code`, trimmed at several coverage
targets (and the optuna utility optimum), each measured in one process beside the untrimmed model.
Writes bench/results/vocab.md.

    python bench/vocab.py                                  # 0.99, 0.999, 0.9999 + optuna (alpha 0.5)
    python bench/vocab.py --coverages 0.999 --no-optuna --chars 20000 --threads 1

Per row: kept tokens, calibration and test coverage (code and general), tokens per character and bits per byte
on the same first `--chars` characters of each test split (tokenised by each model's own tokenizer), parameters,
checkpoint size (written, reloaded and verified), LM-head time per decode step and end-to-end decode/prefill speed
as ratios to the untrimmed model measured right beside it.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from domainprune.data import load_corpus
from domainprune.models import load_model
from domainprune.vocab import evaluate_trim, save, trim_vocabulary

RESULTS = Path(__file__).parent / "results"


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    loaded = load_model(args.model, dtype="float32", device=args.device)
    domain, general = load_corpus("code"), load_corpus("general")
    settings = [dict(coverage=c) for c in args.coverages] + ([dict(strategy="optuna", alpha=args.alpha)] if args.optuna else [])
    rows, reference = [], None
    for setting in settings:
        print(f"== {setting}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        model, tokenizer, report = trim_vocabulary(loaded, domain, **setting)
        trim_s = time.perf_counter() - started
        evaluate_trim(loaded, model, tokenizer, report, domain=domain, general=general, chars=args.chars,
                      seq_len=256, batch_size=4, speed=True, reference=reference)
        reference = report.evaluation
        with tempfile.TemporaryDirectory() as tmp:
            save(model, tokenizer, report, Path(tmp) / "trimmed")  # verified reload; fills checkpoint size
        rows.append({"setting": setting, "trim_seconds": trim_s, **report.to_dict()})
        del model, tokenizer
        gc.collect()
    return rows


def label(row: dict) -> str:
    s = row["setting"]
    return f"coverage {s['coverage']}" if "coverage" in s else f"optuna α={s['alpha']}"


def write_markdown(rows: list[dict], args, seconds: float) -> str:
    first = rows[0]
    ev0 = first["evaluation"]
    code0, gen0 = ev0["sources"]["domain"]["original"], ev0["sources"]["general"]["original"]
    speeds = [r["evaluation"]["speed"] for r in rows]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    head0 = median([s["lm_head_ms_original"] for s in speeds])
    dec0 = median([s["decode_tokens_per_s_original"] for s in speeds])
    pre0 = median([s["prefill_tokens_per_s_original"] for s in speeds])
    lines = [
        "# Vocabulary trimming: size, speed and per-byte perplexity",
        "",
        f"SmolLM2-135M-Instruct (de-quantised from Q4_1, float32, tied embeddings, 49,152 tokens); domain `code` "
        f"(token counts on the whole calibration split: {first['calibration_tokens']:,} tokens). Bits per byte = "
        f"total NLL / ln 2 / UTF-8 bytes on the same first {args.chars:,} characters of each test split (code: "
        f"{code0['bytes']:,} bytes; general = Wikipedia: {gen0['bytes']:,} bytes), tokenised by each model's own "
        "tokenizer into 256-token windows overlapping by one token, so every text token is predicted once. "
        "Coverage = share of the original tokenizer's tokens of a split that are kept. Speed: batch 1, decode 128 "
        "tokens after a 64-token prompt (random ids below the trimmed vocabulary size), prefill 256 tokens, median "
        "of 3 runs after a warm-up; LM head = one decode step's `lm_head` call, median of 3×50; every ratio is to the "
        "untrimmed model measured right beside that row in the same process. "
        f"Machine: {platform.machine()}, 2 cores shared with other users' jobs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s); whole run {seconds / 60:.0f} min.",
        "",
        "| model | kept tokens | coverage calib / test code / test general | params | checkpoint MB | tokens/char code (Δ) | tokens/char general (Δ) | bits/byte code (Δ) | bits/byte general (Δ) | LM head ms/step (×) | decode tok/s (×) | prefill tok/s (×) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| untrimmed | 49,152 | 100% / 100% / 100% | {first['params_original'] / 1e6:.1f}M | "
        f"{first['checkpoint_bytes_original'] / 1e6:.1f} | {code0['tokens_per_char']:.4f} | {gen0['tokens_per_char']:.4f} | "
        f"{code0['bits_per_byte']:.4f} | {gen0['bits_per_byte']:.4f} | {head0:.2f} | {dec0:.1f} | {pre0:.1f} |",
    ]
    for r in rows:
        ev, sp = r["evaluation"], r["evaluation"]["speed"]
        c, g = ev["sources"]["domain"], ev["sources"]["general"]
        lines.append(
            f"| {label(r)} | {r['kept_vocab']:,} ({r['kept_vocab'] / r['original_vocab']:.1%}) | "
            f"{r['calibration_coverage']:.4%} / {c['test_coverage']:.3%} / {g['test_coverage']:.2%} | "
            f"{r['params_trimmed'] / 1e6:.1f}M ({r['params_trimmed'] / r['params_original'] - 1:+.1%}) | "
            f"{r['checkpoint_bytes_trimmed'] / 1e6:.1f} | "
            f"{c['trimmed']['tokens_per_char']:.4f} ({c['tokens_per_char_ratio'] - 1:+.2%}) | "
            f"{g['trimmed']['tokens_per_char']:.4f} ({g['tokens_per_char_ratio'] - 1:+.2%}) | "
            f"{c['trimmed']['bits_per_byte']:.4f} ({c['bits_per_byte_ratio'] - 1:+.2%}) | "
            f"{g['trimmed']['bits_per_byte']:.4f} ({g['bits_per_byte_ratio'] - 1:+.2%}) | "
            f"{sp['lm_head_ms_trimmed']:.2f} ({sp['lm_head_speedup']:.2f}×) | "
            f"{sp['decode_tokens_per_s_trimmed']:.1f} ({sp['decode_speedup']:.3f}×) | "
            f"{sp['prefill_tokens_per_s_trimmed']:.1f} ({sp['prefill_speedup']:.3f}×) |"
        )
    lines += ["", "Trim time per row (count, choose, rewrite tokenizer, slice): " + ", ".join(
        f"{label(r)} {r['trim_seconds']:.1f} s" for r in rows) + "."]
    if opt := next((r for r in rows if r.get("optuna")), None):
        o = opt["optuna"]
        lines.append(
            f"Optuna (TPE, seed {o['seed']}, {o['trials']} trials, α={o['alpha']}, min coverage {o['min_coverage']}): "
            f"k*={o['best_size']:,}, U={o['utility']:.4f} (C={o['coverage']:.4%}, R={o['latency_gain']:.2%})."
        )
    text = "\n".join(lines) + "\n"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--coverages", type=float, nargs="+", default=[0.99, 0.999, 0.9999])
    p.add_argument("--optuna", action=argparse.BooleanOptionalAction, default=True, help="also the optuna optimum")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--chars", type=int, default=50_000, help="test characters per source for tokens/char and bits/byte")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "vocab.md")
    args = p.parse_args()
    started = time.perf_counter()
    rows = run(args)
    text = write_markdown(rows, args, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
