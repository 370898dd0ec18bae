"""The CUDA path at scale: prune a random-initialised model of Llama-3-8B's shape on one GPU and measure pruning
time, peak GPU memory and batch-1 throughput against the dense model, in one process.

    python bench/gpu.py --tokenizer DIR --out bench/results/gpu.json [--methods flap,wanda-sp] [--round-to none,128]

The shape is Llama-3-8B's (32 layers, hidden 4096, 32 query / 8 KV heads, MLP 14336) except the vocabulary, which is
the tokenizer's (SmolLM2's 49,152 here, so that the bundled `code` corpus calibrates it). Random weights say nothing
about quality; this measures the machinery: statistics, scoring, surgery, export and speed, in bfloat16.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domainprune.evaluate import parameter_count, throughput  # noqa: E402
from domainprune.models import LoadedModel  # noqa: E402
from domainprune.run import prune  # noqa: E402
from domainprune.runfolder import save_pruned  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build(vocab_size: int, layers: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers}, vocab_size=vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    # random init has unit-scale weights everywhere; scale them so activations stay finite through 32 layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (SmolLM2's)")
    ap.add_argument("--methods", default="flap,wanda-sp")
    ap.add_argument("--sparsity", type=float, default=0.35)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--round-to", default="none,128", help="comma-separated: none (exact budget) or a multiple for kept MLP widths"
    )
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--export", action="store_true", help="also save and verify the first pruned model")
    ap.add_argument("--out", default="bench/results/gpu.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    device = "cuda"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    dense = build(len(tok), args.layers, device)
    rows = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {**LLAMA3_8B, "num_hidden_layers": args.layers, "vocab_size": len(tok)},
        "dtype": "bfloat16",
        "sparsity": args.sparsity,
        "calibration": f"{args.calib_samples}x{args.seq_len} code",
        "runs": [],
    }
    import transformers

    rows["transformers"] = transformers.__version__

    def speed_of(model):
        return throughput(model, repeats=args.repeats, prefill_len=args.prefill_len)

    speed_of(dense)  # warm-up: clocks, kernels, allocator
    speed = speed_of(dense)
    rows["dense"] = {"params": parameter_count(dense), **speed}
    print(json.dumps(rows["dense"]), flush=True)
    grid = [(m, None if r == "none" else int(r)) for m in args.methods.split(",") for r in args.round_to.split(",")]
    for method, round_to in grid:
        model = copy.deepcopy(dense)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        result = prune(
            LoadedModel(model, tok, None, "llama3-8b-shape-random"),
            data="code",
            method=method,
            sparsity=args.sparsity,
            calib_samples=args.calib_samples,
            seq_len=args.seq_len,
            batch_size=8,
            seed=0,
            progress=False,
            round_to=round_to,
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated()
        row = {
            "method": method,
            "allocation": result.recipe.allocation,
            "round_to": round_to,
            "prune_seconds": round(seconds, 1),
            "peak_gpu_bytes": peak,
            "peak_over_model_bytes": peak - base,
            "model_bytes": base,
            "sparsity_achieved": result.plan.params.sparsity,
            "params": parameter_count(model),
            "uniform": result.report["uniform"],
            **speed_of(model),
        }
        row["decode_speedup"] = row["decode_tokens_per_s"] / speed["decode_tokens_per_s"]
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / speed["prefill_tokens_per_s"]
        if args.export and not rows["runs"]:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                save_pruned(model, tok, Path(tmp) / "out", verify=True)
                row["export_verify_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)
        rows["runs"].append(row)
        del model, result
        gc.collect()
        torch.cuda.empty_cache()
    rows["dense_again"] = speed_of(dense)  # drift check: the dense model measured once more at the end
    print(json.dumps(rows["dense_again"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
