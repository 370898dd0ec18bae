"""Training-aware pruning against two-stage at the same all-in wall budget (issue 18): on one model, domain and level,
each recipe gets `--budget` seconds from the dense model in memory to the pruned, trained model in memory (pruning,
statistics, training and merging all count; measuring does not). Written to bench/results/training-aware.md (raw
rows in training-aware.jsonl, resumable: finished rows are kept, `--fresh` starts over).

    python bench/training_aware.py                                  # SmolLM2-135M, code, 35 %, 8 min per recipe
    python bench/training_aware.py --model qwen2.5-coder-0.5b --device cuda --levels 0.2,0.35 --budget 2700 \\
        --tasks mbpp --limit 500 --results bench/results/gpu             # the 0.5B rows with MBPP pass@1 on a GPU

Recipes (`--recipes`):
- two-stage: the default one-shot recipe (cfsp + OBS) at the level, then LoRA CE recovery on raw domain text
  (`domainprune recover`) for the rest of the budget;
- atp: `prune --method atp` (decisions learnt while LoRA tunes on the domain);
- loraprune: `prune --method loraprune`;
- iterative4: `prune --method cfsp --iterative 4` (cfsp without OBS: four OBS refits would not fit the budget), the
  four tunes sharing `--iterative-train-share` of the budget (the four statistics passes take the rest);
- perp-light: the default one-shot recipe, then `recover --train norms,biases` (RMSNorm gains and biases only).
Figures come from `domainprune.measure.measure`: perplexity on `--samples`×256 held-out test tokens of code and of
general text, zero-shot acc_norm or MBPP pass@1 for `--tasks` (`--limit` items). Training data are the domain's
calibration split (ATP's decision steps: its validation split), never the test split.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rows import load_rows, save_rows  # noqa: E402

from domainprune import cache  # noqa: E402
from domainprune.measure import measure  # noqa: E402
from domainprune.models import LoadedModel, load_model  # noqa: E402
from domainprune.recover import recover  # noqa: E402
from domainprune.run import prune  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RECIPES = "two-stage,two-stage-kd,two-stage-sdd,atp,loraprune,iterative4,perp-light"
# the recovery stage of each two-stage recipe (domainprune.recover options): raw-text CE, CE + KD on the dense logits,
# task-format self-distillation (the dense model's answers to requests built from the corpus, generated in the budget)
RECOVERY = {
    "two-stage": {},
    "two-stage-kd": {"kd_weight": 0.5},
    "two-stage-sdd": {"train_format": "sdd", "answer_tokens": 96, "samples": 32},  # 32 answers generated on CPU
    "perp-light": {"train": "norms,biases"},
}
# --cold: what a recipe may reuse from the cache (the converted model, its GGUF, the tokenised corpora); statistics,
# OBS refits and gradients are recomputed inside each recipe's budget
SHARED_CACHE = ("models", "gguf", "tokens")
RESERVE = 20.0  # seconds kept back from a training budget for merging, surgery and the end of the last step


def train_options(args, seconds: float, **extra) -> dict:
    return dict(
        time_budget=max(seconds, 1.0),
        samples=args.train_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        save_steps=10**6,
        **extra,
    )


def one_shot(loaded: LoadedModel, args, level: float):
    return prune(
        loaded,
        data=args.data,
        sparsity=level,
        calib_samples=args.calib_samples,
        seq_len=args.calib_seq_len,
        seed=0,
        progress=False,
    )


def run_recipe(name: str, loaded: LoadedModel, args, level: float, started: float) -> tuple[LoadedModel, dict]:
    left = lambda: args.budget - (time.perf_counter() - started) - RESERVE  # noqa: E731
    if name in RECOVERY:
        result = one_shot(loaded, args, level)
        info = {
            "prune_seconds": round(time.perf_counter() - started, 1),
            "plan": result.plan.summary(),
            "recipe": result.recipe.model_dump(mode="json"),
        }
        extra = dict(RECOVERY[name])
        if "kd_weight" in extra or "train_format" in extra:
            # the dense model; its loading and (sdd) its answers come before the training budget starts: all-in s
            extra["teacher"] = args.model
        with tempfile.TemporaryDirectory() as tmp:
            rec = recover(
                LoadedModel(result.model, loaded.tokenizer, None, loaded.source),
                out=Path(tmp) / "r",
                data=args.data,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                max_steps=None,
                epochs=1000,
                time_budget=max(left(), 1.0),
                save_steps=10**6,
                device=args.device,
                progress=False,
                verify=False,
                **{"samples": args.train_samples, **extra},
            )
        info["training"] = {
            k: rec.report.get(k)
            for k in ("steps", "train_seconds", "first_loss", "last_loss", "trained_params", "trainable")
        }
        return LoadedModel(rec.model, loaded.tokenizer, None, loaded.source), info
    if name in ("atp", "loraprune"):
        extra = {"pdg_lr": args.pdg_lr} if name == "atp" else {}
        result = prune(
            loaded,
            data=args.data,
            method=name,
            sparsity=level,
            seed=0,
            progress=False,
            train=train_options(args, left(), **extra),
        )
    elif name.startswith("iterative"):
        stages = int(name.removeprefix("iterative"))
        # the stages' statistics passes count against the budget too: the tunes get `--iterative-train-share` of it
        result = prune(
            loaded,
            data=args.data,
            method="cfsp",
            sparsity=level,
            iterative=stages,
            calib_samples=args.calib_samples,
            seq_len=args.calib_seq_len,
            seed=0,
            progress=False,
            train=train_options(args, left() * args.iterative_train_share),
        )
    else:
        raise SystemExit(f"unknown recipe {name!r}; known: {RECIPES}")
    info = {
        "recipe": result.recipe.model_dump(mode="json"),
        "plan": result.plan.summary(),
        "training": result.report.get("training", {}),
        "training_log": result.training_log,
    }
    return LoadedModel(result.model, loaded.tokenizer, None, loaded.source), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="code")
    ap.add_argument("--levels", default="0.35")
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--budget", type=float, default=480.0, help="all-in wall seconds per recipe")
    ap.add_argument("--samples", type=int, default=128, help="held-out 256-token sequences per perplexity corpus")
    ap.add_argument("--tasks", default="", help="zero-shot tasks and/or mbpp, comma-separated")
    ap.add_argument("--limit", type=int, default=200, help="items per zero-shot task / MBPP problems")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--iterative-train-share", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pdg-lr", type=float, default=1e-2, help="ATP's decision-generator learning rate")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="each recipe starts from an empty statistics cache (only the model and tokenised corpora are shared)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.results)
    raw = out / "training-aware.jsonl"
    done = load_rows(raw, args.fresh)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    settings = dict(
        sources=("code", "general"),
        samples=args.samples,
        seq_len=256,
        tasks=tasks,
        limit=args.limit,
        speed=False,
        progress=False,
    )
    dense = load_model(args.model, dtype="float32", device=args.device)
    cuda = next(dense.model.parameters()).device.type == "cuda"
    threads = torch.get_num_threads()
    machine = (
        torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {threads} threads"
    ) + f", torch {torch.__version__}"
    if f"{args.model}|dense" not in done:
        m = measure(dense, "dense", **settings)
        done[f"{args.model}|dense"] = {
            "key": f"{args.model}|dense",
            "model": args.model,
            "recipe_name": "dense",
            "machine": machine,
            "measurement": m.to_dict(),
        }
        save_rows(raw, done)
    for level in (float(x) for x in args.levels.split(",")):
        for name in args.recipes.split(","):
            key = f"{args.model}|{name}|{level:.2f}|{args.budget:.0f}"
            if key in done:
                continue
            print(f"== {key}", file=sys.stderr, flush=True)
            loaded = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, None, args.model)
            torch.manual_seed(0)
            with cold_cache(args.cold):
                started = time.perf_counter()
                trained, info = run_recipe(name, loaded, args, level, started)
            if cuda:
                torch.cuda.synchronize()
            all_in = time.perf_counter() - started
            m = measure(trained, name, **settings)
            done[key] = {
                "key": key,
                "model": args.model,
                "recipe_name": name,
                "level": level,
                "budget": args.budget,
                "all_in_seconds": round(all_in, 1),
                "cold_cache": args.cold,
                "machine": machine,
                **info,
                "measurement": m.to_dict(),
            }
            save_rows(raw, done)
            print(
                f"   {all_in:.0f} s all-in, code ppl {m.perplexity['code']:.3f}, general ppl "
                f"{m.perplexity['general']:.3f}",
                file=sys.stderr,
                flush=True,
            )
            del loaded, trained
            gc.collect()
    write_markdown(done, out / "training-aware.md")


@contextlib.contextmanager
def cold_cache(cold: bool):
    """With `cold`, point DOMAINPRUNE_CACHE at a fresh folder that links only SHARED_CACHE from the real cache."""
    if not cold:
        yield
        return
    real = cache.cache_dir()
    with tempfile.TemporaryDirectory(prefix="domainprune-cold-") as tmp:
        for name in SHARED_CACHE:
            if (real / name).exists():
                (Path(tmp) / name).symlink_to(real / name)
        with mock.patch.dict(os.environ, {"DOMAINPRUNE_CACHE": tmp}):
            yield


NOTES = "<!-- notes: kept when the table is rewritten -->"


def write_markdown(done: dict, path: Path) -> None:
    notes = path.read_text().partition(NOTES)[2] if path.is_file() else ""
    lines = [
        "# Training-aware pruning vs two-stage at equal wall budget",
        "",
        "Generated by `bench/training_aware.py`; every figure from `domainprune.measure.measure` (held-out test "
        "split). Ratios are to the dense model of the same table.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in done.values()):
        dense = done.get(f"{model}|dense")
        if dense is None:
            continue
        d = dense["measurement"]
        extra = sorted({*d["zero_shot"], *d["pass_at_1"]})
        lines += [
            f"## {model} ({dense['machine']})",
            "",
            "| recipe | level | budget s | all-in s | train steps | trained params | params | code ppl "
            "(× dense) | general ppl (× dense) |" + "".join(f" {t} |" for t in extra),
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra),
        ]
        rows = [dense] + [r for r in done.values() if r["model"] == model and r["recipe_name"] != "dense"]
        for r in rows:
            m = r["measurement"]
            t = r.get("training", {})
            trained = t.get("trained_params") or t.get("trainable_params")
            trained = (
                (trained.get("total") or sum(v for k, v in trained.items() if k != "model"))
                if isinstance(trained, dict)
                else ""
                if not t
                else "LoRA"
            )
            steps = t.get("steps", sum(s.get("steps", 0) for s in t.get("stages", [])) or "")
            cells = [
                r["recipe_name"],
                f"{r['level']:.0%}" if "level" in r else "",
                str(int(r.get("budget", 0)) or ""),
                str(r.get("all_in_seconds", "")),
                str(steps),
                f"{trained:,}" if isinstance(trained, int) else trained,
                f"{m['params']:,}",
            ]
            for src in ("code", "general"):
                cells.append(f"{m['perplexity'][src]:.3f} ({m['perplexity'][src] / d['perplexity'][src]:.3f}×)")
            for task in extra:
                v = m["zero_shot"].get(task, m["pass_at_1"].get(task))
                cells.append("" if v is None else f"{v:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "What each recipe removed:", ""]
        lines += [f"- {r['recipe_name']}: {r['plan']}" for r in rows if r.get("plan")]
        lines.append("")
    path.write_text("\n".join(lines) + "\n" + NOTES + notes)


if __name__ == "__main__":
    main()
