"""One init run by 1 process and by N processes (torch.distributed, gloo on CPU): the largest relative difference
of each method's correction s * B @ A over the layers, and of the perplexities.

    python -m bench.distributed_check                 # tiny Llama built from a config, 2 processes, CPU
    python -m bench.distributed_check --processes 4
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.common import ROOT
from quailora_app.runs import RunFolder
from tests.helpers import TINY_TEXT, free_port, save_tiny_llama

METHODS = ("svd", "quailora", "closed_form")


def corrections(run_dir: Path, method: str) -> dict[str, torch.Tensor]:
    folder = run_dir / "adapters" / method
    config = json.loads((folder / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    w = load_file(folder / "adapter_model.safetensors")
    return {k: s * w[k.replace("lora_A", "lora_B")] @ w[k] for k in w if "lora_A" in k}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=11, help="11 split 6/5 over 2 processes")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="quailora-dist-"))
    model = save_tiny_llama(tmp / "model")
    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)))
    init = ["-m", "quailora_app", "init", "--model", str(model), "--dataset", str(text), "--seq-len", "48",
            "--calib-samples", str(args.calib_samples), "--eval-tokens", "512", "--rank", "4",
            "--methods", *METHODS, "--no-baselines"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    runs = {1: [sys.executable, *init, "--out", str(tmp / "one")],
            args.processes: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                             "--master_port", str(free_port()), *init, "--out", str(tmp / "many")]}
    for n, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(f"{n}-process run failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
    print(f"## 1 process vs {args.processes} processes (gloo, CPU): tiny Llama, {args.calib_samples} x 48 calibration "
          "tokens, rank 4\n\n| method | layers | max relative difference of s B A | perplexity 1 / N |\n"
          "|---|---|---|---|")
    r1, rn = (RunFolder(tmp / d).read_report()["perplexity"] for d in ("one", "many"))
    for m in METHODS:
        a, b = corrections(tmp / "one", m), corrections(tmp / "many", m)
        diff = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
        print(f"| {m} | {len(a)} | {diff:.2e} | {r1[m]:.6f} / {rn[m]:.6f} |")
    print(f"\nrun folders: {tmp / 'one'}, {tmp / 'many'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
