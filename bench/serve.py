"""Speed inside llama.cpp: SmolLM2-135M dense vs pruned, each exported with `domainprune export` (F16 and Q4_K_M) and
run by llama-cpp-python in this process. Writes bench/results/serve.md (and serve.json).

    python bench/serve.py                                   # prune the runs below (cached under --work), then time
    python bench/serve.py --calib-samples 32 --rounds 3 --threads 2
    python bench/serve.py --runs flap35=runs/code35         # time existing run folders instead

Per model and quant type: decode tokens/s (batch 1: 128 new tokens, one at a time through the KV cache, after a
64-token prompt; the median gap between tokens), prefill tokens/s (one 256-token prompt; the median of the
rounds), the GGUF file size, the parameter ratio dense/pruned (the bytes ratio at one quant type) and the tensors
whose width made llama.cpp's quantiser fall back to another type. Models are timed in turn within every round
(dense first), so a slower or busier moment of the machine is shared by all of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RECIPES = {
    "flap35": dict(method="flap", sparsity=0.35),
    "flap35-round32": dict(method="flap", sparsity=0.35, round_to=32),
    "flap35-round256": dict(method="flap", sparsity=0.35, round_to=256),
    "flap50": dict(method="flap", sparsity=0.5),
    "uniform35": dict(method="flap", sparsity=0.35, allocation="uniform"),
    "cfsp-obs35": dict(method="cfsp", reconstruct="obs", sparsity=0.35),
    "cfsp-obs35-round256": dict(method="cfsp", reconstruct="obs", sparsity=0.35, round_to=256),
}
QUANTS = ("f16", "q4_k_m")


def make_runs(args) -> dict[str, Path]:
    from domainprune.models import load_model
    from domainprune.run import prune

    runs = {}
    for name in args.recipes:
        out = args.work / name
        if not (out / "config.json").is_file():
            print(f"== prune {name}", file=sys.stderr, flush=True)
            dense = load_model("smollm2-135m", dtype="float32", device="cpu")
            prune(
                dense,
                data="code",
                calib_samples=args.calib_samples,
                seq_len=256,
                batch_size=8,
                out=out,
                force=True,
                progress=False,
                **RECIPES[name],
            )
        runs[name] = out
    return runs


def export_all(runs: dict[str, Path], work: Path) -> dict[tuple[str, str], dict]:
    from domainprune.evaluate import parameter_count
    from domainprune.gguf_export import export_gguf
    from domainprune.models import load_model

    files = {}
    for name, source in {"dense": "smollm2-135m", **{k: str(v) for k, v in runs.items()}}.items():
        loaded = load_model(source, dtype="float32", device="cpu")
        params = parameter_count(loaded.model)
        for quant in QUANTS:
            path = work / "gguf" / f"{name}.{quant}.gguf"
            print(f"== export {name} {quant}", file=sys.stderr, flush=True)
            r = export_gguf(loaded.model, loaded.tokenizer, path, quant=quant, force=True)
            files[name, quant] = dict(
                path=str(path), arch=r.arch, bytes=r.bytes, params=params, fallbacks=len(r.fallbacks)
            )
    return files


def time_model(llm, prompt: list[int], prefill: list[int], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one round."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(prefill)
    prefill_s = time.perf_counter() - started
    llm.reset()
    llm.eval(prompt)
    gaps = []
    for i in range(new_tokens):
        started = time.perf_counter()
        llm.eval([prefill[i % len(prefill)]])
        gaps.append(time.perf_counter() - started)
    return 1 / statistics.median(gaps), len(prefill) / prefill_s


def measure(files: dict[tuple[str, str], dict], args) -> list[dict]:
    import llama_cpp

    from domainprune.measure import heldout_sequences
    from domainprune.models import load_model

    tok = load_model("smollm2-135m", dtype="float32", device="cpu").tokenizer
    seq = heldout_sequences("code", tok, 1, max(args.prefill_tokens, args.prompt_tokens))[0].tolist()
    prompt, prefill = seq[: args.prompt_tokens], seq[: args.prefill_tokens]
    rows = []
    for quant in QUANTS:
        names = [n for (n, q) in files if q == quant]
        llms = {
            n: llama_cpp.Llama(
                model_path=files[n, quant]["path"], n_ctx=512, n_batch=256, n_threads=args.threads, verbose=False
            )
            for n in names
        }
        got: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for r in range(args.rounds + 1):  # round 0 warms up (page cache, thread pool) and is discarded
            for n in names:
                result = time_model(llms[n], prompt, prefill, args.new_tokens)
                if r:
                    got[n].append(result)
        for llm in llms.values():
            llm.close()
        for n in names:
            f = files[n, quant]
            rows.append(
                dict(
                    model=n,
                    quant=quant,
                    **f,
                    decode=statistics.median(x[0] for x in got[n]),
                    prefill=statistics.median(x[1] for x in got[n]),
                )
            )
    return rows


def markdown(rows: list[dict], args) -> str:
    dense = {r["quant"]: r for r in rows if r["model"] == "dense"}
    lines = [
        "# SmolLM2-135M in llama.cpp: dense vs pruned (`bench/serve.py`)",
        "",
        f"llama-cpp-python {args.llama_version}, {args.threads} threads, {platform.processor() or platform.machine()}; "
        f"{args.rounds} rounds, models in turn; calibration "
        + (f"{args.calib_samples}×256 code tokens" if not args.runs else "as the given runs were pruned")
        + " (speed depends on the widths, not on the calibration size). Decode: batch 1, "
        f"{args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt (median gap). Prefill: one "
        f"{args.prefill_tokens}-token prompt.",
        "",
        "| model | quant | arch | GGUF MB | params ratio | decode tok/s | decode × | prefill tok/s | prefill × | "
        "fallbacks |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = dense[r["quant"]]
        lines.append(
            f"| {r['model']} | {r['quant']} | {r['arch']} | {r['bytes'] / 1e6:.1f} | {d['params'] / r['params']:.3f} | "
            f"{r['decode']:.1f} | {r['decode'] / d['decode']:.3f} | {r['prefill']:.1f} | "
            f"{r['prefill'] / d['prefill']:.3f} | {r['fallbacks']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--runs", nargs="*", default=None, help="name=folder pairs to time instead of pruning")
    p.add_argument("--work", type=Path, default=Path("runs/bench-serve"))
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for serve.md and serve.json")
    args = p.parse_args()
    import llama_cpp

    args.llama_version = llama_cpp.__version__
    runs = {k: Path(v) for k, v in (x.split("=", 1) for x in args.runs)} if args.runs else make_runs(args)
    files = export_all(runs, args.work)
    rows = measure(files, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "serve.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
