"""Does the pruned model keep the domain skill? MBPP pass@1 beside code and general perplexity, for the dense model
and each recipe, on one model (the code-capable Qwen2.5-Coder-0.5B-Instruct by default), all in one process.

    python bench/skill.py                                   # every recipe below, all 500 MBPP problems
    python bench/skill.py --recipes dense,cfsp+obs@0.35 --limit 20 --device cpu

A recipe is `method[/allocation][+obs]@sparsity[~text|~sdd]` ("dense" for the unpruned model); the method's own
default allocation applies when none is named. `~text` / `~sdd` then recover the pruned model with LoRA, the same
number of steps, batch and sequence length for both: on raw corpus text (`recover --train-format text`) or on the
dense model's answers to requests built from the corpus's documented functions (`--train-format sdd`).

Rows go to bench/results/skill.jsonl as they finish (resumable: finished rows are kept; `--fresh` starts over),
every generated answer to skill-answers.jsonl.gz (so scoring can be checked or redone without the model), and the
table to skill.md. MBPP: greedy, `--code-tokens` new tokens at most, batched on a
GPU (domainprune.mbpp); perplexity on `--samples`×256 held-out tokens of each corpus. Timings are for the machine
named in each row.
"""

from __future__ import annotations

import argparse
import copy
import gc
import gzip
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import PeakRSS  # noqa: E402
from rows import load_rows, save_rows  # noqa: E402

from domainprune.mbpp import MAX_NEW_TOKENS, evaluate_mbpp, standard_error  # noqa: E402
from domainprune.measure import measure  # noqa: E402
from domainprune.models import LoadedModel, load_model  # noqa: E402
from domainprune.run import prune  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# In order of what the issue needs first: the best recipe and the default, then every baseline, then the levels.
RECIPES = (
    "dense,cfsp+obs@0.35,flap@0.35,cfsp+obs@0.20,flap+obs@0.35,wanda-sp@0.35,magnitude@0.35,taylor@0.35,"
    "shortgpt@0.20,flap@0.20,wanda-sp@0.20,cfsp+obs@0.50,flap@0.50,cfsp@0.35,flap+obs@0.20,taylor@0.20,"
    "magnitude@0.20,shortgpt@0.35,wanda-sp@0.50,flap+obs@0.50"
)


def parse_recipe(text: str) -> dict:
    """'cfsp+obs@0.35' -> {"method": "cfsp", "allocation": None, "reconstruct": "obs", "sparsity": 0.35}."""
    if text == "dense":
        return {}
    text, _, recovery = text.partition("~")
    head, _, level = text.partition("@")
    obs = head.endswith("+obs")
    method, _, allocation = head.removesuffix("+obs").partition("/")
    return {
        "method": method,
        "allocation": allocation or None,
        "reconstruct": "obs" if obs else None,
        "sparsity": float(level),
        "recovery": recovery or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--limit", type=int, default=None, help="first N MBPP problems (all 500 without it)")
    ap.add_argument("--code-tokens", type=int, default=MAX_NEW_TOKENS)
    ap.add_argument("--code-batch", type=int, default=None, help="MBPP prompts decoded together (default: mbpp's)")
    ap.add_argument("--samples", type=int, default=32, help="held-out 256-token sequences per perplexity corpus")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--recover-steps", type=int, default=200, help="~text/~sdd: optimiser steps")
    ap.add_argument("--recover-samples", type=int, default=800, help="~text: sequences; ~sdd: requests")
    ap.add_argument("--recover-batch", type=int, default=8)
    ap.add_argument("--recover-seq-len", type=int, default=512)
    ap.add_argument("--results", default=str(RESULTS), help="folder for skill.jsonl, skill-answers.jsonl.gz")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    out = Path(args.results)
    raw, answers_file = out / "skill.jsonl", out / "skill-answers.jsonl.gz"
    done = load_rows(raw, args.fresh)
    if args.fresh:
        answers_file.unlink(missing_ok=True)
    dense = load_model(args.model, dtype="float32", device=args.device)
    cuda = next(dense.model.parameters()).device.type == "cuda"
    machine = (
        torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    ) + f", torch {torch.__version__}, Python {platform.python_version()}"
    for key in args.recipes.split(","):
        if key in done:
            continue
        print(f"== {key}", file=sys.stderr, flush=True)
        try:
            run_recipe(key, dense, done, machine, raw, answers_file, args)
        except Exception:  # a bench of many recipes: one recipe's failure is logged, the others still run
            traceback.print_exc()
            print(f"   {key} FAILED (no row written)", file=sys.stderr, flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    write_markdown(done, out / "skill.md")


def run_recipe(key: str, dense: LoadedModel, done: dict, machine: str, raw: Path, answers_file: Path, args) -> None:
    """Prune (and recover) one recipe, measure it, and save its row and answers."""
    cuda = next(dense.model.parameters()).device.type == "cuda"
    recipe = parse_recipe(key)
    loaded = dense if not recipe else LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, None, args.model)
    row = {"key": key, "model": args.model, "machine": machine, **recipe}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if recipe:
        started = time.perf_counter()
        with PeakRSS() as mem:
            result = prune(
                loaded,
                data="code",
                calib_samples=args.calib_samples,
                seq_len=args.calib_seq_len,
                seed=0,
                progress=False,
                **{k: v for k, v in recipe.items() if v is not None and k != "recovery"},
            )
        if cuda:
            torch.cuda.synchronize()
        row.update(
            prune_seconds=time.perf_counter() - started,
            peak_rss_bytes=mem.peak,
            achieved=result.plan.params.sparsity,
            recipe=result.recipe.model_dump(mode="json"),
        )
        if cuda:
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        if recipe["recovery"]:
            loaded, row["recovery_report"] = recovered(loaded, dense, recipe["recovery"], args)
    m = measure(
        loaded,
        key,
        sources=("code", "general"),
        samples=args.samples,
        seq_len=256,
        tasks=(),
        speed=False,
        progress=False,
    )
    row["params"], row["perplexity"] = m.params, m.perplexity
    started = time.perf_counter()
    mbpp = evaluate_mbpp(
        loaded.model, loaded.tokenizer, limit=args.limit, max_new_tokens=args.code_tokens, batch_size=args.code_batch
    )
    row.update(
        mbpp_seconds=time.perf_counter() - started,
        pass_at_1=mbpp["pass_at_1"],
        problems=mbpp["n"],
        stderr=mbpp["stderr"],
        isolation=mbpp["isolation"],
        code_tokens=args.code_tokens,
    )
    with gzip.open(answers_file, "at", encoding="utf-8") as f:
        for r in mbpp["results"]:
            f.write(json.dumps({"key": key, **r}) + "\n")
    done[key] = row
    save_rows(raw, done)
    print(
        f"   pass@1 {row['pass_at_1']:.3f} ± {row['stderr']:.3f}  code ppl {row['perplexity']['code']:.3f}  "
        f"general ppl {row['perplexity']['general']:.3f}",
        file=sys.stderr,
        flush=True,
    )


def recovered(loaded: LoadedModel, dense: LoadedModel, train_format: str, args) -> tuple[LoadedModel, dict]:
    """The pruned model after LoRA recovery in `train_format` (text or sdd), and recovery's report."""
    import tempfile

    from domainprune.recover import recover

    with tempfile.TemporaryDirectory() as tmp:
        result = recover(
            loaded,
            out=Path(tmp) / "recovered",
            teacher=dense,
            data="code",
            train_format=train_format,
            samples=args.recover_samples,
            batch_size=args.recover_batch,
            seq_len=args.recover_seq_len,
            answer_tokens=args.code_tokens,
            max_steps=args.recover_steps,
            time_budget=None,
            device=args.device,
            progress=False,
            verify=False,
        )
    return LoadedModel(result.model, dense.tokenizer, None, loaded.source), result.report


NOTES = "<!-- notes: kept when the table is rewritten -->"


def write_markdown(done: dict, path: Path) -> None:
    """The table of every row; what follows the NOTES marker in an existing file (the reading) is kept."""
    dense = done.get("dense")
    if dense is None:
        return
    notes = path.read_text().partition(NOTES)[2] if path.is_file() else ""
    lines = [
        f"# Skill: MBPP pass@1 beside perplexity ({dense['model']})",
        "",
        f"`python bench/skill.py` on {dense['machine']}. Calibration: the bundled `code` corpus; MBPP: greedy, "
        f"{dense['code_tokens']} new tokens at most, {dense['problems']} problems, sandbox {dense['isolation']}; "
        "perplexity on held-out code and general text. ± is the binomial standard error.",
        "",
        "| recipe | achieved | params | pass@1 (×dense) | code ppl (×dense) | general ppl (×dense) | prune s | "
        "peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in done.items():
        p, ppl = row["pass_at_1"], row["perplexity"]
        rel = p / dense["pass_at_1"] if dense["pass_at_1"] else float("nan")
        gpu = f"{row['peak_gpu_bytes'] / 2**30:.1f}" if row.get("peak_gpu_bytes") else "-"
        lines.append(
            f"| {key} | {row.get('achieved', 0):.2%} | {row['params'] / 1e6:.1f}M | "
            f"{p:.3f} ± {standard_error(p, row['problems']):.3f} ({rel:.2f}) | "
            f"{ppl['code']:.3f} ({ppl['code'] / dense['perplexity']['code']:.2f}×) | "
            f"{ppl['general']:.3f} ({ppl['general'] / dense['perplexity']['general']:.2f}×) | "
            f"{row.get('prune_seconds', 0):.0f} | {gpu} |"
        )
    path.write_text("\n".join(lines) + "\n\n" + NOTES + (notes or "\n"))


if __name__ == "__main__":
    main()
