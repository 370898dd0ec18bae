"""Peak resident memory of `prune --offload disk` against the number of layers, on a small bfloat16 Llama (hidden
1024, MLP 4096, 8 / 4 heads of 128, SmolLM2's 49,152-token vocabulary) with 4 and 32 layers: FLAP 35 %, 4 × 64
calibration tokens, one thread. Prints, per size, the resident memory before pruning, the peak (VmHWM, reset before
pruning), and the resident memory after every 8th layer turn (walk, layer, MiB resident, MiB peak so far).

    python bench/scale_memory.py --tokenizer DIR [--workdir /tmp/domainprune-scale-memory]

Small enough for a minute per size on two shared cores; bench/scale.py measures the 8B shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, re, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from domainprune import streaming
from domainprune.run import prune

def mib(key):
    return int(re.search(rf"{key}:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024

trace = []
release = streaming.DiskStream.release
def traced(self, adapter, i):
    release(self, adapter, i)
    trace.append((len(self.walks), i, mib("VmRSS"), mib("VmHWM")))
streaming.DiskStream.release = traced
Path("/proc/self/clear_refs").write_text("5")
before = mib("VmRSS")
prune(sys.argv[1], out=sys.argv[2], offload="disk", progress=False, device="cpu", dtype="bfloat16", method="flap",
      sparsity=0.35, data="code", calib_samples=4, seq_len=64, batch_size=4)
print(json.dumps({"before_mib": before, "peak_mib": mib("VmHWM"), "trace": trace[::8]}))
"""


def build(layers: int, folder: Path, tokenizer: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=49152,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/domainprune-scale-memory"))
    args = ap.parse_args()
    try:
        for layers in (4, 32):
            src, out = args.workdir / f"m{layers}", args.workdir / f"o{layers}"
            build(layers, src, args.tokenizer)
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(out)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                check=True,
            )
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps({"layers": layers, **result}))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
