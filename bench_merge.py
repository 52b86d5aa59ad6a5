"""Benchmark: merging two SD3.5-M-shaped teacher LoRAs with merge_lora.py, end to end and in-process.

Two random LoRAs of the real shapes (r=32, alpha=64 on the 191 SD3.5-M attention projections: to_q/k/v,
to_out.0, add_q/k/v_proj, to_add_out of 24 blocks, all 1536x1536, the last block without to_add_out),
written as peft folders like the published Flow-GRPO LoRAs. Per method: the CLI's wall time (python start,
load, merge, save; the CLI runs torch on one thread), the merge alone in-process on 1 thread and on torch's
default thread count, and the reported relative Frobenius error of the SVD compression.
Targets (issue 3): ab-mean / delta-mean < 5 s, delta-mean --rank 32 < 60 s on the 2-core CPU.

Run: python bench_merge.py [--skip_ties]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_lora import LoRA, load_lora, merge, relative_error

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def sd35m_lora(seed: int, rank: int = 32, alpha: float = 64.0, width: int = 1536, blocks: int = 24) -> LoRA:
    """Random LoRA on the 191 SD3.5-M attention projections (the last block has no to_add_out)."""
    generator = torch.Generator().manual_seed(seed)
    modules = [f"transformer_blocks.{i}.attn.{t}" for i in range(blocks) for t in TARGETS
               if not (i == blocks - 1 and t == "to_add_out")]
    A = {m: torch.randn(rank, width, generator=generator) / width ** 0.5 for m in modules}   # [r, in]
    B = {m: torch.randn(width, rank, generator=generator) * 1e-2 for m in modules}          # [out, r]
    return LoRA(A, B, alpha)


def write_peft(lora: LoRA, folder: Path) -> Path:
    """adapter_model.safetensors (peft keys) + adapter_config.json, the published layout."""
    folder.mkdir()
    save_file({f"base_model.model.{m}.lora_{p}.weight": getattr(lora, p)[m] for m in lora.A for p in "AB"},
              folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.A)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def timed_merge(loras, method, rank, threads):
    torch.set_num_threads(threads)
    start = time.perf_counter()
    residuals = merge(loras, None, method, rank)[1]
    return time.perf_counter() - start, residuals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_ties", action="store_true", help="leave out ties (a dense SVD per module, minutes)")
    args = parser.parse_args()
    runs = [("ab-mean", None), ("delta-mean", None), ("delta-mean", 32)] + ([] if args.skip_ties else [("ties", 32)])
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [write_peft(sd35m_lora(seed), Path(tmp) / f"teacher{seed}") for seed in (1, 2)]
        loras = [load_lora(path) for path in inputs]
        print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
        print(f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, inputs: 2 peft folders x "
              f"{len(loras[0].A)} modules, r={loras[0].rank}, alpha={loras[0].alpha:g}, 1536x1536")
        print(f"{'python merge_lora.py a b --method':36s} {'CLI wall s':>10s} {'merge s 1 thr':>13s} "
              f"{f'merge s {default_threads} thr':>13s} {'rel. error':>10s}")
        for method, rank in runs:
            options = f"{method}" + (f" --rank {rank}" if rank else "")
            command = [sys.executable, "merge_lora.py", *map(str, inputs), "--method", *options.split(),
                       "--out", str(Path(tmp) / "merged.safetensors")]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            wall = time.perf_counter() - start
            one, residuals = timed_merge(loras, method, rank, 1)
            many = f"{timed_merge(loras, method, rank, default_threads)[0]:.2f}" if method != "ties" else "-"
            error = f"{relative_error(residuals):.4f}" if residuals else "exact"
            print(f"{options:36s} {wall:10.2f} {one:13.2f} {many:>13s} {error:>10s}", flush=True)


if __name__ == "__main__":
    main()
