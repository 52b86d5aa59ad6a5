"""Speed benchmark: full Flow-OPD iterations on SD3.5-Medium shapes, through train.py's own code.

Builds the SD3.5-M transformer from its published config with random weights (24 joint blocks, 24 heads of
64, dual attention in blocks 0-12, rms qk-norm, patch 2, 16 latent channels, joint dim 4096, pooled 2048),
random prompt embeddings of the real shapes (77 CLIP + 128 T5 = 205 tokens), two teacher LoRAs and an
anchor LoRA (r=32, alpha=64 on the 8 attention projections, 191 modules), then runs `train.opd_iteration`
at 512 px (10-step CFG SDE rollout, teacher + anchor velocities, the trained rows with grad, AdamW step) for each
configuration, and prints one table: images/s (= images per GPU per second), seconds per phase, peak GPU memory,
FLOPs per image per phase (counted with torch.utils.flop_counter on a one-image batch: the rollout, and per
trained row the targets and the student's forward+backward; an image has J = 9 rows dense, k with
--sampled_steps k), model-FLOP utilisation = FLOPs per image x images/s / the GPU's bf16 matmul peak (an 8192^3
matmul, measured in the same run), GPU-hours per 100 updates of the paper's recipe (256 images, 2 optimizer
steps each: 25,600 images at the measured images/s), and for sampled steps the cosine similarity of the
gradient to the dense gradient on the same rollouts and targets, averaged over --draws draws. Also the ratio
of a teacher pass with the base in fp32 (TF32 matmuls, as the authors run their teachers) to the bf16 pass.

--ratio: the PPO ratio at the first optimizer step, eager vs compiled (kl_only, lr 1e-30 (weights unchanged), 2 optimizer steps, so the
policy never moves and every exact ratio is 1): before the fix, max |log pi_train - log pi_rollout| and the
fraction of rows it would clip (first_step_ratio_noise, first_step_noise_clip_fraction); after, the ratios as
trained (clip_fraction; log_ratio_max over the second step, whose old log-probs the training forward recomputed).

Run (one GPU): python bench.py --configs "compiled b16,compiled b16 k1,compiled b16 k2,compiled b16 k3" --out bench_out
               python bench.py --ratio --out bench_ratio
CPU smoke (tiny shapes): python bench.py --tiny
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
# name: (micro_batch, grad_checkpointing, compile, sampled_steps, target_batch: rows per no-grad forward, 0 = micro);
# a name ending in " ema" also keeps the EMA (--ema) and times it
CONFIGS = {"eager b8": (8, False, False, 0, 0), "eager b16 ckpt": (16, True, False, 0, 0),
           "eager b16": (16, False, False, 0, 0), "compiled b16 ckpt": (16, True, True, 0, 0),
           "compiled b16": (16, False, True, 0, 0), "compiled b8": (8, False, True, 0, 0),
           "compiled b16 k1": (16, False, True, 1, 0), "compiled b16 k2": (16, False, True, 2, 0),
           "compiled b16 k3": (16, False, True, 3, 0), "compiled b16 t48": (16, False, True, 0, 48),
           "eager b8 k2": (8, False, False, 2, 0), "compiled b16 ema": (16, False, True, 0, 0)}
PAPER_UPDATE_IMAGES = 256              # images per update of the paper's recipe (2 optimizer steps each)


def random_base(config: dict, device, dtype, latent: int, seed: int = 0) -> Base:
    """The transformer with random weights; prompt embeddings drawn from a seed per prompt (real shapes)."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).requires_grad_(False).eval()
    torch.nn.Module.to(transformer, dtype)                # not diffusers' .to: it warns of fp32 modules it has none of
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
            target_velocities(base, ["teacher_ocr"] * rows, states, sigmas, cond, image, 4.5, micro_batch)
            torch.cuda.synchronize() if device.type == "cuda" else None
            seconds[name] = time.perf_counter() - start
        del base
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return seconds | {"fp32_over_bf16": seconds["fp32_tf32"] / seconds["bf16"]}


def bench_config(name: str, model_config: dict, latent: int, inputs: dict, device, iterations: int, images: int,
                 flops: bool, draws: int) -> dict:
    micro_batch, checkpointing, compiled, sampled, target_batch = CONFIGS[name]
    cfg = Config(base="random-sd3", **inputs, images_per_iteration=images, group_size=4, updates=1,
                 micro_batch=micro_batch, grad_checkpointing=checkpointing, compile=compiled, ema=name.endswith(" ema"), sampled_steps=sampled,
                 target_batch=target_batch, out=str(Path(inputs["anchor"]).parent / name.replace(" ", "_")), overwrite=True, resolution=latent * 8)
    return with_run(cfg, name, model_config, latent, device,
                    lambda run: measure_config(run, name, images, iterations, flops, draws))


def with_run(cfg: Config, name: str, model_config: dict, latent: int, device, measure) -> dict:
    """measure(run) for a run set up on a fresh random base; running out of memory gives an error row instead.
    Dynamo's caches are reset first: each config compiles its own blocks (the earlier configs' graphs would
    otherwise fill torch._dynamo's cache_size_limit and leave this config running eagerly)."""
    torch._dynamo.reset()
    base = random_base(model_config, device, torch.bfloat16 if device.type == "cuda" else torch.float32, latent)
    try:
        return measure(setup(cfg, 0, 1, device, base=base))
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


def measure_config(run, name: str, images: int, iterations: int, flops: bool, draws: int) -> dict:
    micro_batch, checkpointing, compiled, sampled, target_batch = CONFIGS[name]
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
              "target_batch": target_batch, "sampled_steps": sampled, "rows_per_image": sampled or run.cfg.train_steps, "warmup_s": warmup,
              "images_per_s": images / mean["seconds"], **mean,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan"),
              "flops": None, "grad_cosine": None}
    if sampled and draws:
        start = time.perf_counter()
        result["grad_cosine"], result["grad_cosines"] = gradient_agreement(run, draws)
        print(f"{name}: gradient cosine to dense {result['grad_cosine']:.4f} ({time.perf_counter() - start:.1f} s)",
              flush=True)
    if run.ema is not None:      # one EMA update (the EMA moves every 8th optimizer step); train.py's per-iteration
        import checkpoint         # snapshot (LoRA + AdamW + EMA copies, written at once on SIGTERM)
        import ema
        result["ema_update_s"] = median_seconds(lambda: ema.update(run.ema.weights, run.params, ema.decay(7)), device)
        result["snapshot_s"] = median_seconds(lambda: checkpoint.snapshot(run, 0), device, repeats=3)
    if flops:
        start = time.perf_counter()
        result["flops"] = count_flops(run)
        print(f"{name}: FLOPs counted in {time.perf_counter() - start:.1f} s", flush=True)
    return result


def median_seconds(fn, device, repeats: int = 10) -> float:
    """Median wall seconds of fn() over `repeats` calls, the device's queued work included."""
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[repeats // 2]


def gradient_agreement(run, draws: int) -> tuple[float, list[float]]:
    """Cosine similarity of the sampled-steps gradient (run.inclusion) to the dense gradient on the same rollouts
    and targets, for `draws` draws of every image's steps; the dense rows' targets serve every draw.
    -> (mean, per draw)"""
    from opd_loss import uniform_on_grid
    from train import ROW_SALT, local_batch, rows_at, sample_seed, student_rollout, velocities_at_rows
    import random
    mine, seeds = local_batch(run, 10_000)                                      # a batch the timing never saw
    batch = student_rollout(run, mine, seeds)
    J, N = run.cfg.train_steps, len(seeds)
    dense = rows_at(torch.ones(J, dtype=torch.float64), [0.0] * N, run.device)  # row j * N + i = (image i, step j)
    dense.targets["teacher"] = velocities_at_rows(run, route([batch.tasks[i] for i in dense.image.tolist()], run.routes), batch, dense)
    dense.targets["anchor"] = velocities_at_rows(run, [run.anchor] * len(dense), batch, dense)

    def gradient(rows):
        for part in rows.split(run.cfg.train_batch or run.cfg.micro_batch):
            ((part.weight * step_loss(run, batch, part)[0]).sum() / N).backward()
        flat = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for p in run.params])
        run.optimizer.zero_grad(set_to_none=True)
        return flat.double()

    reference, cosines = gradient(dense), []
    for d in range(draws):
        us = [uniform_on_grid(random.Random(sample_seed(seed, ROW_SALT, d))) for seed in seeds]
        rows = rows_at(run.inclusion, us, run.device)
        rows.targets = {name: v[rows.step * N + rows.image] for name, v in dense.targets.items()}
        cosines.append(torch.nn.functional.cosine_similarity(gradient(rows), reference, dim=0).item())
    return sum(cosines) / draws, cosines


def ratio_study(model_config: dict, latent: int, inputs: dict, device, images: int, configs: list[str]) -> list[dict]:
    """--ratio: per config, one warm-up and one measured kl_only iteration at lr 1e-30 (no change to fp32 weights; lr must be > 0) with 2 optimizer steps."""
    def measure(run, name):
        opd_iteration(run, 0)                                                  # warm-up (and compilation)
        metrics = opd_iteration(run, 1)
        keys = ("first_step_ratio_noise", "first_step_noise_clip_fraction", "clip_fraction", "log_ratio_max")
        result = {"config": name, **{k: metrics[k] for k in keys}}
        print(json.dumps(result), flush=True)
        return result

    results = []
    for name in configs:
        micro_batch, _, compiled, _, _ = CONFIGS[name]
        cfg = Config(base="random-sd3", **inputs, images_per_iteration=images, group_size=4, updates=2,
                     micro_batch=micro_batch, compile=compiled, loss="kl_only", lr=1e-30, weight_decay=0.0,
                     out=str(Path(inputs["anchor"]).parent / f"ratio_{name.replace(' ', '_')}"), overwrite=True,
                     resolution=latent * 8)
        results.append(with_run(cfg, name, model_config, latent, device, lambda run: measure(run, name)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per config (after one warm-up)")
    parser.add_argument("--images", type=int, default=16, help="images per iteration")
    parser.add_argument("--draws", type=int, default=4, help="draws of the sampled steps for the gradient cosine")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test of this script)")
    parser.add_argument("--skip_precision", action="store_true")
    parser.add_argument("--ratio", action="store_true", help="the first-step PPO ratio study instead of speed")
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
        if args.ratio:
            names = args.configs.split(",") if args.configs != ",".join(CONFIGS) else ["eager b16", "compiled b16"]
            record["ratio"] = ratio_study(model_config, latent, inputs, device, 2 * args.images, names)
            (out / "ratio.json").write_text(json.dumps(record, indent=2))
            (out / "ratio.md").write_text(ratio_table(record))
            print(ratio_table(record))
            return
        for name in args.configs.split(","):
            count = not any(c.get("flops") for c in record["configs"]) and not CONFIGS[name][1]  # model FLOPs:
            result = bench_config(name, model_config, latent, inputs, device, args.iterations, args.images, count,  # no
                                  args.draws)                                                                      # recompute
            record["configs"].append(result)
            print(json.dumps(result), flush=True)
            (out / "bench.json").write_text(json.dumps(record, indent=2))
        if not args.skip_precision:
            record["teacher_precision"] = teacher_precision_ratio(model_config, latent, device, 8, Path(tmp))
            print(json.dumps(record["teacher_precision"]), flush=True)
    counted = next(c for c in record["configs"] if c.get("flops"))
    rows = counted["rows_per_image"]                                           # the counted one-image batch's rows
    record["tflop"] = {"rollout": counted["flops"]["rollout"] / 1e12,            # per image, and per trained row:
                       "targets_per_row": counted["flops"]["targets"] / rows / 1e12,
                       "train_per_row": counted["flops"]["train"] / rows / 1e12}
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    (out / "bench.md").write_text(table(record))
    print(table(record))


def tflop_per_image(record: dict, rows: int) -> dict:
    """Per-phase TFLOP of one image with `rows` trained rows (the rollout is whole; targets and training per row)."""
    t = record["tflop"]
    phases = {"rollout": t["rollout"], "targets": rows * t["targets_per_row"], "train": rows * t["train_per_row"]}
    return phases | {"total": sum(phases.values())}


def table(record: dict) -> str:
    dense = tflop_per_image(record, 9)
    lines = [f"{record['device']}, torch {record['torch']}, bf16 matmul peak {record['matmul_peak_tflops']:.0f} TFLOP/s; "
             f"counted {dense['total']:.1f} TFLOP per image dense (" + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                       dense.items() if k != "total") + ")", "",
             "| config | images/s (per GPU) | s/iter | rollout | teacher+anchor | student fwd+bwd | optimizer | peak GB "
             "| TFLOP/image (rollout + targets + train) | MFU | grad cos vs dense | GPU-h / 100 paper updates |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in record["configs"]:
        if "error" in c:
            lines.append(f"| {c['config']} | {c['error'][:60]} ||||||||||")
            continue
        f = tflop_per_image(record, c["rows_per_image"])
        mfu = f["total"] * 1e12 * c["images_per_s"] / (record["matmul_peak_tflops"] * 1e12)
        cosine = "1 (is dense)" if not c["sampled_steps"] else \
            f"{c['grad_cosine']:.3f}" if c.get("grad_cosine") is not None else "-"
        lines.append(f"| {c['config']} | {c['images_per_s']:.2f} | {c['seconds']:.2f} | {c['seconds_rollout']:.2f} | "
                     f"{c['seconds_targets']:.2f} | {c['seconds_train']:.2f} | {c['seconds_optimizer']:.3f} | "
                     f"{c['peak_gb']:.1f} | {f['total']:.1f} ({f['rollout']:.1f} + {f['targets']:.1f} + {f['train']:.1f}) | "
                     f"{mfu:.1%} | {cosine} | {100 * PAPER_UPDATE_IMAGES / c['images_per_s'] / 3600:.2f} |")
    for c in record["configs"]:
        if "ema_update_s" in c:
            lines.append(f"\n{c['config']}: one EMA update {c['ema_update_s'] * 1e3:.2f} ms = "
                         f"{c['ema_update_s'] / c['seconds']:.3%} of its iteration (the EMA moves every 8 optimizer "
                         f"steps); train.py's per-iteration snapshot {c['snapshot_s'] * 1e3:.1f} ms = "
                         f"{c['snapshot_s'] / c['seconds']:.2%}")
    if "teacher_precision" in record:
        p = record["teacher_precision"]
        lines.append(f"\nteacher pass (9 steps, CFG, 8 images): bf16 {p['bf16']:.2f} s, fp32/TF32 {p['fp32_tf32']:.2f} s, "
                     f"ratio {p['fp32_over_bf16']:.2f}x")
    return "\n".join(lines) + "\n"


def ratio_table(record: dict) -> str:
    lines = [f"{record['device']}, torch {record['torch']}: kl_only, lr 1e-30 (weights unchanged), 2 optimizer steps, clip range 1e-4", "",
             "| config | before: max abs(log pi_train - log pi_rollout), 1st step | before: clipped, 1st step | "
             "after: clipped (both steps) | after: max abs log-ratio, 2nd step |", "|---|---|---|---|---|"]
    for c in record["ratio"]:
        if "error" in c:
            lines.append(f"| {c['config']} | {c['error'][:60]} ||||")
            continue
        lines.append(f"| {c['config']} | {c['first_step_ratio_noise']:.2e} | {c['first_step_noise_clip_fraction']:.1%} | "
                     f"{c['clip_fraction']:.1%} | {c['log_ratio_max']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
