"""Speed benchmark: full Flow-OPD iterations on SD3.5-Medium shapes, through train.py's own code.

Builds the SD3.5-M transformer from its published config with random weights (24 joint blocks, 24 heads of
64, dual attention in blocks 0-12, rms qk-norm, patch 2, 16 latent channels, joint dim 4096, pooled 2048),
random prompt embeddings of the real shapes (77 CLIP + 128 T5 = 205 tokens), two teacher LoRAs and an
anchor LoRA (r=32, alpha=64 on the 8 attention projections, 191 modules), then runs `train.opd_iteration`
at 512 px (10-step CFG SDE rollout, teacher + anchor velocities, 9 trained steps with grad, AdamW step)
for each configuration, and prints one table: images/s, seconds per phase, peak GPU memory, and model-FLOP
utilisation = FLOPs per image (counted with torch.utils.flop_counter on each phase) x images/s / the GPU's
bf16 matmul peak (an 8192^3 matmul, measured in the same run). Also the ratio of a teacher pass with the
base in fp32 (TF32 matmuls, as the authors run their teachers) to the same pass in bf16.

Run (one GPU): python bench.py --out bench_out        CPU smoke (tiny shapes): python bench.py --tiny
"""
import argparse
import gc
import json
from pathlib import Path
import tempfile
import time
import zlib

import torch

from merge_lora import LoRA, save_lora
from models import Base
from teachers import target_velocities
from train import Config, opd_iteration, route, setup, setup_distributed, step_loss

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
TOKENS = 205
LATENT = {"sd35m": 64, "tiny": 8}      # latent side: 512 px / VAE factor 8 (the config's sample_size 128 is 1024 px)
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out")
# name: (micro_batch, grad_checkpointing, compile)
CONFIGS = {"eager b8": (8, False, False), "eager b16 ckpt": (16, True, False), "eager b16": (16, False, False),
           "compiled b16 ckpt": (16, True, True), "compiled b16": (16, False, True), "compiled b8": (8, False, True)}


def random_base(config: dict, device, dtype, latent: int, seed: int = 0) -> Base:
    """The transformer with random weights; prompt embeddings drawn from a seed per prompt (real shapes)."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(dtype).requires_grad_(False).eval()
    dim, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]

    def encode(prompts):
        rows = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(TOKENS, dim, generator=g) for g in rows])
        return embeds.to(device, dtype), torch.stack([torch.randn(pooled, generator=g) for g in rows]).to(device, dtype)

    return Base(transformer, encode, lambda x: x, (config["in_channels"], latent, latent), 3.0, "random-sd3")


def random_lora(transformer, seed: int, rank: int = 32, alpha: float = 64.0) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            A[name] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            B[name] = torch.randn(module.out_features, rank, generator=g) * 0.01
    return LoRA(A, B, alpha)


def write_inputs(folder: Path, transformer) -> dict:
    """Teacher/anchor LoRA files and prompt files for the run config."""
    for i, name in enumerate(("ocr", "geneval", "anchor")):
        save_lora(random_lora(transformer, i), folder / f"{name}.safetensors")
    for task in ("ocr", "geneval"):
        (folder / f"{task}.txt").write_text("".join(f"{task} prompt {i}\n" for i in range(64)))
    return {"teachers": f"{folder}/ocr.safetensors,{folder}/geneval.safetensors", "anchor": f"{folder}/anchor.safetensors",
            "prompts": f"ocr={folder}/ocr.txt,geneval={folder}/geneval.txt"}


def matmul_peak(device, n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s (the MFU denominator)."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def count_flops(run) -> dict:
    """FLOPs per image of each phase, counted on a one-image batch with torch.utils.flop_counter (its rows: all
    trained steps, or --sampled_steps drawn)."""
    from torch.utils.flop_counter import FlopCounterMode
    from train import draw_rows, student_rollout, velocities_at_rows
    flops = {}
    with FlopCounterMode(display=False) as counter:
        batch = student_rollout(run, [("ocr", "ocr prompt 0")], [0])
    flops["rollout"] = counter.get_total_flops()
    rows = draw_rows(run, [0])
    with FlopCounterMode(display=False) as counter:                          # FLOPs do not depend on --target_batch
        rows.targets["teacher"] = velocities_at_rows(run, route(["ocr"] * len(rows), run.routes), batch, rows)
        rows.targets["anchor"] = velocities_at_rows(run, [run.anchor] * len(rows), batch, rows)
    flops["targets"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        for part in rows.split(1):
            step_loss(run, batch, part)[0].sum().backward()
    flops["train"] = counter.get_total_flops()
    run.optimizer.zero_grad(set_to_none=True)
    return flops


def teacher_precision_ratio(model_config: dict, latent: int, device, micro_batch: int, folder: Path) -> dict:
    """Seconds of one teacher pass (9 steps, CFG) with the base in fp32/TF32 (the authors' teachers) vs bf16."""
    from merge_lora import load_lora
    from teachers import add_adapter
    torch.backends.cuda.matmul.allow_tf32 = True
    seconds = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32_tf32", torch.float32)):
        base = random_base(model_config, device, dtype, latent)
        add_adapter(base.transformer, load_lora(folder / "ocr.safetensors"), "teacher_ocr")
        rows = 9 * micro_batch                                                  # 9 states of each image
        states = torch.randn(rows, *base.latent_shape, device=device)
        sigmas = torch.linspace(1, 0.1, 9, device=device).repeat_interleave(micro_batch)
        cond = base.condition([f"p{i}" for i in range(micro_batch)])
        image = torch.arange(micro_batch, device=device).repeat(9)
        for repeat in range(2):                                                 # the first pass warms up
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
            target_velocities(base.transformer, ["teacher_ocr"] * rows, states, sigmas, cond, image, 4.5, micro_batch)
            torch.cuda.synchronize() if device.type == "cuda" else None
            seconds[name] = time.perf_counter() - start
        del base
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return seconds | {"fp32_over_bf16": seconds["fp32_tf32"] / seconds["bf16"]}


def bench_config(name: str, model_config: dict, latent: int, inputs: dict, device, iterations: int, images: int,
                 flops: bool) -> dict:
    micro_batch, checkpointing, compiled = CONFIGS[name]
    base = random_base(model_config, device, torch.bfloat16 if device.type == "cuda" else torch.float32, latent)
    cfg = Config(base="random-sd3", **inputs, images_per_iteration=images, group_size=4, optimizer_steps=1,
                 micro_batch=micro_batch, grad_checkpointing=checkpointing, compile=compiled,
                 out=str(Path(inputs["anchor"]).parent / name.replace(" ", "_")), overwrite=True,
                 resolution=latent * 8)
    try:
        return measure_config(setup(cfg, 0, 1, device, base=base), name, images, iterations, flops)
    except torch.OutOfMemoryError as error:
        import traceback
        ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(error.__traceback__)
                if Path(f.filename).parent == Path(__file__).parent]
        return {"config": name, "error": f"out of memory at {' < '.join(reversed(ours[-3:]))}: {str(error)[:160]}",
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    finally:
        del base
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None


def measure_config(run, name: str, images: int, iterations: int, flops: bool) -> dict:
    micro_batch, checkpointing, compiled = CONFIGS[name]
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    opd_iteration(run, 0)                                                      # warm-up (and compilation)
    warmup = time.perf_counter() - start
    print(f"{name}: warm-up iteration {warmup:.1f} s", flush=True)
    rows = []
    for iteration in range(1, iterations + 1):
        start = time.perf_counter()
        metrics = opd_iteration(run, iteration)
        torch.cuda.synchronize() if device.type == "cuda" else None
        rows.append(metrics | {"seconds": time.perf_counter() - start})
        print(f"{name}: iteration {iteration} {rows[-1]['seconds']:.1f} s", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("seconds", "seconds_rollout", "seconds_targets",
                                                               "seconds_train", "seconds_optimizer")}
    result = {"config": name, "micro_batch": micro_batch, "checkpointing": checkpointing, "compile": compiled,
              "warmup_s": warmup, "images_per_s": images / mean["seconds"], **mean,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan"), "flops": None}
    if flops:
        start = time.perf_counter()
        result["flops"] = count_flops(run)
        print(f"{name}: FLOPs counted in {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per config (after one warm-up)")
    parser.add_argument("--images", type=int, default=16, help="images per iteration")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test of this script)")
    parser.add_argument("--skip_precision", action="store_true")
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args()
    _, _, device = setup_distributed()                                         # a world of one, as train.py
    model_config, latent = (TINY, LATENT["tiny"]) if args.tiny else (SD35M, LATENT["sd35m"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import peft
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "peft": peft.__version__,
              "matmul_peak_tflops": matmul_peak(device) / 1e12, "configs": []}
    print(json.dumps(record), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp), random_base(model_config, "meta", torch.float32, latent).transformer)  # shapes only
        for name in args.configs.split(","):
            count = not any(c.get("flops") for c in record["configs"]) and not CONFIGS[name][1]  # model FLOPs:
            result = bench_config(name, model_config, latent, inputs, device, args.iterations, args.images, count)  # no recompute
            record["configs"].append(result)
            print(json.dumps(result), flush=True)
            (out / "bench.json").write_text(json.dumps(record, indent=2))
        if not args.skip_precision:
            record["teacher_precision"] = teacher_precision_ratio(model_config, latent, device, 8, Path(tmp))
            print(json.dumps(record["teacher_precision"]), flush=True)
    flops = next(c["flops"] for c in record["configs"] if c.get("flops"))
    record["tflop_per_image"] = {k: v / 1e12 for k, v in flops.items()} | {"total": sum(flops.values()) / 1e12}
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    (out / "bench.md").write_text(table(record))
    print(table(record))


def table(record: dict) -> str:
    total = record["tflop_per_image"]["total"]
    lines = [f"{record['device']}, torch {record['torch']}, bf16 matmul peak {record['matmul_peak_tflops']:.0f} TFLOP/s; "
             f"counted {total:.1f} TFLOP per image (" + ", ".join(f"{k} {v:.1f}" for k, v in
                                                       record["tflop_per_image"].items() if k != "total") + ")", "",
             "| config | images/s | s/iter | rollout | teacher+anchor | student fwd+bwd | optimizer | peak GB | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in record["configs"]:
        if "error" in c:
            lines.append(f"| {c['config']} | {c['error'][:60]} |||||||")
            continue
        mfu = total * 1e12 * c["images_per_s"] / (record["matmul_peak_tflops"] * 1e12)
        lines.append(f"| {c['config']} | {c['images_per_s']:.2f} | {c['seconds']:.2f} | {c['seconds_rollout']:.2f} | "
                     f"{c['seconds_targets']:.2f} | {c['seconds_train']:.2f} | {c['seconds_optimizer']:.3f} | "
                     f"{c['peak_gb']:.1f} | {mfu:.1%} |")
    if "teacher_precision" in record:
        p = record["teacher_precision"]
        lines.append(f"\nteacher pass (9 steps, CFG, 8 images): bf16 {p['bf16']:.2f} s, fp32/TF32 {p['fp32_tf32']:.2f} s, "
                     f"ratio {p['fp32_over_bf16']:.2f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
