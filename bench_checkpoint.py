"""Checkpoint write time for an SD3.5-Medium student LoRA (r = 32 on the 8 attention projections, 191 modules).

Builds fp32 LoRA parameters of the real shapes (from the SD3.5-M config on the meta device, no weights), takes
one AdamW step so that both moments exist, and times what checkpoint.write writes, through the same functions:
the training checkpoint (student + AdamW state + RNG + identity, torch.save through checkpoint.write_atomic,
fsync included) and the diffusers-format LoRA export (merge_lora.save_lora). Median of --repeats.

Run: python bench_checkpoint.py [--out /tmp/ckpt_bench] [--repeats 5]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import checkpoint
from bench import SD35M
from merge_lora import LoRA, save_lora
from models import SD3_TARGETS


def sd35m_lora_shapes(rank: int = 32) -> dict[str, tuple[int, int]]:
    """module -> (in_features, out_features) for every targeted linear layer of SD3.5-M."""
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35M)
    return {n: (m.in_features, m.out_features) for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(tuple(SD3_TARGETS.split(",")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    shapes = sd35m_lora_shapes(args.rank)
    A = {m: torch.nn.Parameter(torch.randn(args.rank, i) * 0.01) for m, (i, o) in shapes.items()}
    B = {m: torch.nn.Parameter(torch.randn(o, args.rank) * 0.01) for m, (i, o) in shapes.items()}
    params = [*A.values(), *B.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    student = {f"{m}.lora_A.student.weight": a.detach() for m, a in A.items()}
    student |= {f"{m}.lora_B.student.weight": b.detach() for m, b in B.items()}
    record = {"iteration": 1, "next_iteration": 2, "seed": 0, "student": student,
              "optimizer": optimizer.state_dict(), "rng": [checkpoint.rng_state()], "world_size": 1,
              "identity": {"base": "sd3.5-medium", "files": {}, "config": {}}}
    n = sum(p.numel() for p in params)
    folder = Path(args.out or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    timings = {"checkpoint (LoRA + AdamW)": [], "LoRA export (diffusers format)": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        checkpoint.write_atomic(folder / "ckpt.pt", lambda f: torch.save(record, f))
        timings["checkpoint (LoRA + AdamW)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        save_lora(LoRA(A, B, 2.0 * args.rank), folder / "lora.safetensors")
        timings["LoRA export (diffusers format)"].append(time.perf_counter() - start)
    print(f"SD3.5-M student LoRA: {len(shapes)} modules, r={args.rank}, {n / 1e6:.2f}M params; folder {folder}")
    for name, seconds in timings.items():
        size = (folder / ("ckpt.pt" if name.startswith("checkpoint") else "lora.safetensors")).stat().st_size
        print(f"{name}: {size / 1e6:.0f} MB, median {statistics.median(seconds):.3f} s "
              f"(min {min(seconds):.3f}, max {max(seconds):.3f}) over {args.repeats}")


if __name__ == "__main__":
    main()
