"""`--allocation search --reconstruct obs` (domainprune.tyr) against cfsp + OBS with its own and uniform allocation,
SmolLM2-135M, code, 35 %, calibration 128×128 (as bench/results/quality.md), test perplexity on 32×256 code and
32×256 general sequences, each row pruned from a fresh load; wall time, CPU time (both threads) and peak RSS of
`prune()`. Writes
bench/results/tyr-search.jsonl (rows as they finish; a rerun skips finished rows) and tyr-search.md.

    python bench/tyr_search.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from quality import PeakRSS

from domainprune.measure import measure
from domainprune.models import load_model
from domainprune.run import prune

RESULTS = Path(__file__).parent / "results"
CALIB = dict(data="code", calib_samples=128, seq_len=128, sparsity=0.35)
ROWS = {
    "cfsp search+obs": dict(method="cfsp", allocation="search", reconstruct="obs"),
    "cfsp cfsp+obs": dict(method="cfsp", reconstruct="obs"),
    "cfsp uniform+obs": dict(method="cfsp", allocation="uniform", reconstruct="obs"),
    "cfsp global+obs": dict(method="cfsp", allocation="global", reconstruct="obs"),
    # the fitness adds the KL over the dense model's answers to 8 task-format requests (docs/allocation.md)
    "cfsp search+obs task1": dict(method="cfsp", allocation="search", reconstruct="obs", search_task_weight=1.0),
}


def main() -> None:
    jsonl = RESULTS / "tyr-search.jsonl"
    rows = list(map(json.loads, jsonl.read_text().splitlines())) if jsonl.is_file() else []
    done = {r["row"]: r for r in rows}
    names = sys.argv[1:] or ["dense", *ROWS]
    for name in names:
        if name in done:
            continue
        loaded = load_model("smollm2-135m")
        row = {"row": name, "load1": os.getloadavg()[0]}
        if name != "dense":
            t, cpu = time.time(), time.process_time()
            with PeakRSS() as rss:
                result = prune(loaded, **CALIB, **ROWS[name])
            row.update(
                prune_s=round(time.time() - t, 1),
                prune_cpu_s=round(time.process_time() - cpu, 1),
                peak_rss_gib=round(rss.peak / 2**30, 2),
                sparsity=result.plan.params.sparsity,
                search_kl=result.recipe.search_kl,
                recipe=result.recipe.model_dump(),
            )
            loaded.model = result.model
        m = measure(loaded, name, samples=32, seq_len=256, speed=False, progress=False)
        row.update(ppl=m.perplexity, params=m.params, load2=os.getloadavg()[0])
        print(json.dumps(row)[:400], flush=True)
        done[name] = row
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
    write_md(rows)


def write_md(rows: list[dict]) -> None:
    """Every row of the JSONL file in order (a recipe measured twice, at different loads, shows twice)."""
    dense = next((r for r in rows if r["row"] == "dense"), None)
    lines = [
        "# Search with reconstruction in the loop (`--allocation search --reconstruct obs`)",
        "",
        "SmolLM2-135M-Instruct (float32), domain `code`, 35 % of attention+MLP, calibration 128×128 tokens; test "
        "perplexity on 32×256 code and 32×256 general (Wikipedia) test sequences; each row pruned from a fresh load "
        f"by `bench/tyr_search.py`. Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, shared with other jobs (1-min load average at the start and end of each row given).",
        "",
    ]
    lines += [
        'Rows: `prune()` with `data="code", calib_samples=128, seq_len=128, sparsity=0.35, method="cfsp"` and the '
        "allocation named (`cfsp` is the method's own); the search row is `domainprune prune --model smollm2-135m "
        "--data code --calib-samples 128 --seq-len 128 --sparsity 0.35 --method cfsp --allocation search --reconstruct "
        "obs`, its defaults 2 rounds × 4 generations × 8 offspring, fitness on 16 held-out validation sequences "
        "(docs/allocation.md). `prune CPU s`: the process's CPU time, both threads together. The load column shows "
        "what the other sessions on the same 2 cores did to wall times: the search ran at load 8–11 for most of "
        "its 55 min; cfsp + OBS took 733 s at load 6–8 and 55 s at load 2–3. The `task1` row "
        "(`--search-task-weight 1`: the fitness adds the KL over the dense model's answers to 8 task-format "
        "requests) ran alone on the machine, from an empty statistics cache.",
        "",
    ]
    if dense:
        lines.append(f"Dense: code ppl {dense['ppl']['code']:.3f}, general ppl {dense['ppl']['general']:.3f}.")
        lines.append("")
    lines += [
        "| recipe | achieved | code ppl (×dense) | general ppl (×dense) | search fitness start → end | prune s | "
        "prune CPU s | peak RSS GiB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["row"]
        if name == "dense":
            continue
        cells = []
        for src in ("code", "general"):
            v = r["ppl"][src]
            cells.append(f"{v:.3f} ({v / dense['ppl'][src]:.2f}×)" if dense else f"{v:.3f}")
        kl = r.get("search_kl")
        lines.append(
            f"| {name} | {100 * r['sparsity']:.2f}% | {cells[0]} | {cells[1]} | "
            f"{'-' if not kl else f'{kl[0]:.4f} → {kl[1]:.4f}'} | {r['prune_s']:.0f} | {r['prune_cpu_s']:.0f} | "
            f"{r['peak_rss_gib']} | "
            f"{r['load1']:.1f} / {r['load2']:.1f} |"
        )
    (RESULTS / "tyr-search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
