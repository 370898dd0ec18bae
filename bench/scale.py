"""Pruning a model larger than memory: FLAP 35 % on a random-initialised model of Llama-3-8B's shape, streamed from
disk (`prune --offload disk`), with its peak resident memory (and, on a GPU, peak GPU memory) against model size.

    python bench/scale.py --tokenizer DIR [--layers 8,16,32] [--device cpu|cuda] [--workdir /tmp/scale]
                          [--calib 8x128] [--out bench/results/scale.md]

The checkpoint is written to `--workdir` layer by layer (never whole in memory) as bfloat16 safetensors, one shard
per decoder layer, with Llama-3-8B's config (32 layers, hidden 4096, 32 query / 8 KV heads, MLP 14336, vocabulary
128,256, untied LM head: 8.03 B parameters, 16.06 GB). The smaller sizes are the same model cut to its first N
layers (their folders link the same shards), so per-layer work is equal and only the model size changes.
`--tokenizer` is any tokenizer folder whose ids fit the vocabulary (SmolLM2's here, so the bundled `code` corpus
calibrates it). Each size is pruned in its own process (so its peak resident memory is its own): FLAP, global
allocation, 35 %, bias compensation, `--calib` sequences × tokens of `code` (8 × 128 by default), bfloat16. The
output is verified twice: by prune itself (the written folder is streamed back and a 32-token probe's logits must
match the finished layers'), and here (the written config rebuilt on the meta device must name exactly the tensors,
with the shapes, in the written shards). Random weights say nothing about quality; this measures memory and time.
Everything in `--workdir` is deleted at the end unless --keep. With `--device cuda` the weights are generated on
that machine (nothing needs to travel)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
    dtype="bfloat16",
)


def _shard(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, hd, i = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (i, d),
        "mlp.up_proj.weight": (i, d),
        "mlp.down_proj.weight": (d, i),
    }


def _random(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights: ones, as initialised
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)


def write_model(folder: Path, tokenizer: Path, seed: int = 0) -> None:
    """The full model, one safetensors shard per decoder layer and one for the rest, written as it is generated."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    c = LLAMA3_8B
    n = c["num_hidden_layers"] + 1
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i in range(c["num_hidden_layers"]):
        tensors = {f"model.layers.{i}.{k}": _random(s, g) for k, s in layer_shapes(c).items()}
        save_file(tensors, str(folder / _shard(i + 1, n)), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, _shard(i + 1, n)))
        print(f"  wrote layer {i}", file=sys.stderr, flush=True)
    rest = {
        "model.embed_tokens.weight": _random((c["vocab_size"], c["hidden_size"]), g),
        "model.norm.weight": _random((c["hidden_size"],), g),
        "lm_head.weight": _random((c["vocab_size"], c["hidden_size"]), g),
    }
    save_file(rest, str(folder / _shard(n, n)), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, _shard(n, n)))
    _finish_folder(folder, c, weight_map, tokenizer)


def _finish_folder(folder: Path, config: dict, weight_map: dict[str, str], tokenizer: Path) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}) + "\n")
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, folder / f.name)


def cut_model(full: Path, folder: Path, layers: int, tokenizer: Path) -> None:
    """The first `layers` layers of `full` (symbolic links to its shards) with the rest shard."""
    folder.mkdir(parents=True, exist_ok=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: v for k, v in index.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    for file in set(keep.values()):
        (folder / file).symlink_to(full / file)
    _finish_folder(folder, {**LLAMA3_8B, "num_hidden_layers": layers}, keep, tokenizer)


CHILD = """
import json, resource, sys, time
import torch
from domainprune.run import prune
src, out, device = sys.argv[1:4]
calib = json.loads(sys.argv[4])
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
r = prune(src, out=out, offload="disk", method="flap", sparsity=0.35, data="code", dtype="bfloat16", device=device,
          progress=False, **calib)
wall = time.perf_counter() - start
print(json.dumps({"wall_seconds": wall, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
                  "report": r.report}))
"""


def check_output(out: Path) -> dict:
    """The written config, rebuilt on the meta device, names exactly the written tensors, with their shapes."""
    from safetensors import safe_open

    from domainprune.streaming import meta_model

    model = meta_model(out, torch.bfloat16)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    written = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            written.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    if written != expected:
        raise SystemExit(f"output check failed: {sorted(set(written) ^ set(expected))[:5]} or shapes differ")
    params = sum(torch.Size(s).numel() for s in written.values())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"tensors": len(written), "params": params, "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--layers", default="8,16,32", help="sizes: decoder layers of the 8B shape, largest last")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/domainprune-scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.md")
    ap.add_argument("--calib", default="8x128", help="calibration: sequences x tokens (one batch)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    samples, tokens = (int(x) for x in args.calib.split("x"))
    calib = dict(calib_samples=samples, seq_len=tokens, batch_size=samples)
    sizes = [int(x) for x in args.layers.split(",")]
    full = args.workdir / "llama3-8b-shape"
    rows = []
    try:
        started = time.perf_counter()
        generate = None  # seconds, when this run wrote the checkpoint (not when --keep left one)
        if not (full / "config.json").is_file():
            write_model(full, args.tokenizer)
            generate = time.perf_counter() - started
            print(f"generated in {generate:.0f} s", file=sys.stderr)
        for layers in sizes:
            src = full if layers == LLAMA3_8B["num_hidden_layers"] else args.workdir / f"layers-{layers}"
            if src != full and not src.exists():
                cut_model(full, src, layers, args.tokenizer)
            out = args.workdir / f"pruned-{layers}"
            shutil.rmtree(out, ignore_errors=True)
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(out), args.device, json.dumps(calib)],
                capture_output=True,
                text=True,
                env={"PYTHONPATH": str(ROOT), **_env()},
            )
            if run.returncode:
                raise SystemExit(f"prune failed for {layers} layers:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            result.update(layers=layers, input_bytes=src_bytes, output=check_output(out))
            rows.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
        write_table(args, rows, generate)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def write_table(args, rows: list[dict], generate: float | None) -> None:
    gb = 1e9
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    machine = gpu or f"{torch.get_num_threads()}-core shared CPU ({cpu})"
    lines = [
        "# Scale: FLAP 35 % on a Llama-3-8B-shaped model streamed from disk (`prune --offload disk`)",
        "",
        f"Machine: {machine}, torch {torch.__version__}. Produced by `python bench/scale.py --tokenizer DIR "
        f"--layers {args.layers} --calib {args.calib} --device {args.device}`.",
        "",
        "Random-initialised bfloat16 weights of Llama-3-8B's shape (hidden 4096, 32 query / 8 KV heads, MLP 14336, "
        "vocabulary 128,256, untied LM head), one safetensors shard per layer; the smaller sizes are its first N "
        "layers. FLAP, global allocation, 35 % of attention+MLP parameters, bias compensation, calibration "
        f"{args.calib.replace('x', ' sequences × ')} tokens of `code` (SmolLM2's tokenizer), bfloat16 compute. "
        "Random weights say nothing about quality."
        + (f" Generating and writing the 32-layer checkpoint took {generate:.0f} s." if generate else ""),
        "",
        "| layers | parameters | input on disk | peak resident memory | peak GPU memory | wall time | statistics walk "
        "per layer | pruning walk per layer | read / write | output verified |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rep, s = r["report"], r["report"]["stream"]
        walks = s["walks"]
        gpu_mem = f"{r['peak_gpu_bytes'] / gb:.2f} GB" if r["peak_gpu_bytes"] is not None else "–"
        lines.append(
            f"| {r['layers']} | {rep['total_params'][0] / 1e9:.2f} B → {rep['total_params'][1] / 1e9:.2f} B | "
            f"{r['input_bytes'] / gb:.2f} GB | **{r['peak_rss_bytes'] / gb:.2f} GB** | {gpu_mem} | "
            f"{r['wall_seconds']:.0f} s | {walks[0]['mean_layer_seconds']:.1f} s | "
            f"{walks[-1]['mean_layer_seconds']:.1f} s "
            f"| {s['read_seconds']:.0f} s / {s['write_seconds']:.0f} s | logits Δ {s['verify_max_logit_diff']:.1e}; "
            f"{r['output']['tensors']} tensors, {r['output']['bytes'] / gb:.2f} GB |"
        )
    largest = rows[-1]
    lines += [
        "",
        f"Peak resident memory is the pruning process's own high-water mark (`ru_maxrss`), from start to verified "
        f"output. For the largest model it is {largest['peak_rss_bytes'] / largest['input_bytes']:.1%} of the "
        "checkpoint: one decoder layer, the calibration activations, the embedding (read for the calibration "
        "forward) and, at the end, the LM head (read to be written), never the model. 'statistics walk' is the "
        "first streaming pass (read a layer, run the calibration batches through it, FLAP statistics and scores), "
        "'pruning walk' the second (read, cut, write). 'output verified': prune streamed the written folder back and "
        "a 32-token probe's logits matched those of the finished layers (largest difference shown); then the "
        "written config, rebuilt on the meta device, named exactly the written tensors with their shapes.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
