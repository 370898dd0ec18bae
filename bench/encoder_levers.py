"""Allocation levers for the encoder target (issue 20: 35 % without recovery, code nDCG@10 within 5 % of dense), read
on every query of the code validation and test splits (bench/embeddings.py reads 200 test queries), so that a lever is
judged on more than one sample of queries. Written to bench/results/encoder-levers.md (rows in encoder-levers.jsonl,
resumable).

    python bench/encoder_levers.py --seeds 0,1,2

Recipes (`--recipes`), all on `--method`'s scores (default wanda-sp; rows of other methods are labelled
`METHOD/RECIPE`) on 64 code calibration pairs (draw `seed`), 35 % of attention+FFN:
- `uniform`, `global`, `global:ffn`: the allocations of bench/embeddings.py (`global:ffn` keeps every head);
- `headsH`: global allocation with exactly H of the 72 heads kept (the heads with the highest per-layer standardised
  scores, at least one per layer), FFN channels globally for the rest: the exchange rate between heads and channels,
  which `global` sets implicitly by standardising each kind's scores;
- `roundsN`: N rounds of global allocation, the scores re-computed on the partly pruned model before each round.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch
from embeddings import calibration_pairs, method_scores
from rows import load_rows, save_rows

from domainprune.encoders import retrieval
from domainprune.encoders.allocate import ALLOCATIONS, zscore
from domainprune.encoders.criteria import Calibration, LayerScores, get_criterion
from domainprune.encoders.model import BertUnits, encoder_units, load_encoder
from domainprune.encoders.pipeline import EncoderRecipe, apply_plan, plan_units

RESULTS = Path(__file__).parent / "results"
RECIPES = "uniform,global,global:ffn,heads56,heads64,rounds4"
MODEL = "all-minilm-l6-v2"
LEVEL = 0.35


def keep_heads(units: BertUnits, scores: list[LayerScores], total: int) -> list[LayerScores]:
    """Keep `total` heads, the best by per-layer standardised score (each layer its best one first); the scores of
    what is left, for the channels' allocation."""
    keep = {i: [int(torch.argmax(s.heads))] for i, s in enumerate(scores)}
    ranked = sorted(
        ((float(z), i, j) for i, s in enumerate(scores) for j, z in enumerate(zscore(s.heads))), key=lambda c: -c[0]
    )
    for _, i, j in ranked:
        if sum(map(len, keep.values())) >= total:
            break
        if j not in keep[i]:
            keep[i].append(j)
    left = []
    for i, s in enumerate(scores):
        kept = sorted(keep[i])
        if len(kept) < units.heads(i):
            units.keep_heads(i, kept)
        left.append(LayerScores(s.heads[kept], s.channels))
    return left


def prune(model, recipe: str, method: str, scores: list[LayerScores], calib: Calibration) -> None:
    units = encoder_units(model)
    dense_params = units.attention_mlp_params()
    if recipe in ("uniform", "global", "global:ffn"):
        allocation, _, which = recipe.partition(":")
        plan = EncoderRecipe(model=MODEL, sparsity=LEVEL, allocation=allocation, units=which or "all")
        apply_plan(units, plan_units(units, scores, plan))
    elif recipe.startswith("heads"):
        left = keep_heads(units, scores, int(recipe.removeprefix("heads")))
        share = 1 - (1 - LEVEL) * dense_params / units.attention_mlp_params()  # of what is left, from channels
        apply_plan(units, {"layers": ALLOCATIONS.lookup("global")(units, left, share, "ffn")})
    elif recipe.startswith("rounds"):
        rounds = int(recipe.removeprefix("rounds"))
        for k in range(1, rounds + 1):
            if k > 1:
                torch.manual_seed(0)
                scores = get_criterion(method).score(model, calib)
            share = 1 - (1 - LEVEL * k / rounds) * dense_params / units.attention_mlp_params()
            plan = EncoderRecipe(model=MODEL, sparsity=share, allocation="global")
            apply_plan(units, plan_units(units, scores, plan))
    else:
        raise SystemExit(f"unknown recipe {recipe!r}; known: uniform, global, global:ffn, headsH, roundsN")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--seeds", default="0", help="calibration draws (64 pairs each)")
    ap.add_argument("--method", default="wanda-sp", help="encoder criterion whose scores every recipe uses")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = RESULTS / "encoder-levers.jsonl"
    done = load_rows(raw, args.fresh)
    dense = load_encoder(MODEL, device=torch.device("cpu")).float()
    dense.max_seq_length = 128
    pairs = {"code": retrieval.load_pairs("code"), "general": retrieval.load_pairs("general")}
    splits = {
        "code validation": retrieval.build_split("code", pairs["code"], "validation"),
        "code test": retrieval.build_split("code", pairs["code"], "test"),
        "general test": retrieval.build_split("general", pairs["general"], "test"),
    }
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"

    def measure(model) -> dict:
        return {name: retrieval.evaluate(model, split, batch_size=64)["ndcg@10"] for name, split in splits.items()}

    if "dense" not in done:
        done["dense"] = {"key": "dense", "machine": machine, "ndcg@10": measure(dense)}
        save_rows(raw, done)
    dense_params = encoder_units(dense).attention_mlp_params()
    options = argparse.Namespace(model=MODEL, max_seq_length=128, calib_batch=16, device="cpu")
    for seed in (int(s) for s in args.seeds.split(",")):
        domain = calibration_pairs(pairs["code"], 64, seed)
        calib = Calibration([t for p in domain for t in p[:2]], domain, [], batch_size=16)
        scores = None
        for recipe in args.recipes.split(","):
            label = recipe if args.method == "wanda-sp" else f"{args.method}/{recipe}"
            key = f"{label}|{seed}"
            if key in done:
                continue
            if scores is None:
                scores = method_scores(dense, args.method, "", domain, [], options)[0]
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            prune(model, recipe, args.method, scores, calib)
            units = encoder_units(model)
            done[key] = {
                "key": key,
                "recipe": label,
                "seed": seed,
                "machine": machine,
                "prune_seconds": round(time.perf_counter() - started, 1),
                "sparsity": 1 - units.attention_mlp_params() / dense_params,
                "per_layer": units.per_layer(),
                "ndcg@10": measure(model),
            }
            save_rows(raw, done)
            print(key, done[key]["ndcg@10"], flush=True)
    write_markdown(done, RESULTS / "encoder-levers.md")


def write_markdown(done: dict, path: Path) -> None:
    dense = done["dense"]["ndcg@10"]
    names = list(dense)
    lines = [
        "# Encoder allocation levers at 35 %, on whole splits (issue 20)",
        "",
        f"Generated by `bench/encoder_levers.py` on {done['dense']['machine']}. all-MiniLM-L6-v2, wanda-sp scores "
        "(`METHOD/` rows: that criterion's) on 64 code calibration pairs (draw = seed), 35 % of attention+FFN "
        "parameters, no recovery. nDCG@10 over every query of each split against its whole corpus; % of dense in "
        "brackets.",
        "",
        "| recipe | seed | heads kept | " + " | ".join(names) + " |",
        "|---|---|---:|" + "---:|" * len(names),
        "| dense | | 72 | " + " | ".join(f"{dense[n]:.4f}" for n in names) + " |",
    ]
    rows = sorted((r for k, r in done.items() if k != "dense"), key=lambda r: (r["recipe"], r["seed"]))
    for r in rows:
        heads = sum(x["heads"] for x in r["per_layer"])
        cells = [f"{r['ndcg@10'][n]:.4f} ({100 * r['ndcg@10'][n] / dense[n]:.1f})" for n in names]
        lines.append(f"| {r['recipe']} | {r['seed']} | {heads} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over the seeds measured, % of dense:", "", "| recipe | seeds | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---:|" * len(names))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        means = [sum(100 * r["ndcg@10"][n] / dense[n] for r in mine) / len(mine) for n in names]
        lines.append(f"| {recipe} | {len(mine)} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
