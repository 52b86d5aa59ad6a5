"""Speed benchmark: full Flow-OPD iterations on a real model's shapes (SD3.5-Medium by default, SD3.5-Large or
FLUX.1-dev with --model), through train.py's own code.

Builds the transformer from its published config with random weights and random prompt embeddings of the real
shapes, two teacher LoRAs and an anchor LoRA (r=32, alpha=64 on the attention projections), then runs
`train.opd_iteration` at 512 px (10-step SDE rollout, teacher + anchor velocities, the trained rows with grad, AdamW
step) for each configuration. --model (MODELS):
    sd35m (default): SD3.5-M, 24 joint blocks, 24 heads of 64, dual attention in blocks 0-12, rms qk-norm, patch 2,
        16 latent channels, joint dim 4096, pooled 2048; 77 CLIP + 128 T5 = 205 text tokens; CFG 4.5 (2 rows/image).
    sd35l: SD3.5-Large, 38 joint blocks, 38 heads of 64 (2432 wide), no dual attention, pos_embed_max_size 192;
        otherwise as sd35m (the same 205 text tokens, CFG 4.5).
    flux-dev: FLUX.1-dev, 19 double-stream and 38 single-stream blocks, 24 heads of 128, joint dim 4096, pooled 768,
        in_channels 64 (16 latent channels packed 2x2), guidance embedding, rope axes (16, 56, 56); 128 T5 tokens
        (Flow-GRPO's FLUX setting, scripts/train_flux.py max_sequence_length=128; FluxPipeline's default is 512);
        guidance 3.5 in one forward (no CFG pair); FLUX.1-dev's scheduler config (dynamic shift, mu from the 1024
        packed image tokens). The base goes through models.py's FLUX seam (flux_velocity, flux_sigmas).
Prints one table: images/s (= images per GPU per second), seconds per phase, peak GPU memory, FLOPs per image per
phase (counted with torch.utils.flop_counter on a one-image batch, gradient checkpointing off while counting: the
rollout, and per trained row the targets and the student's forward+backward; an image has J = 9 rows dense, k with
--sampled_steps k), model-FLOP utilisation = FLOPs per image x images/s / the GPU's bf16 matmul peak (an 8192^3
matmul, measured in the same run), GPU-hours per 100 updates of the paper's recipe (256 images, 2 optimizer
steps each: 25,600 images at the measured images/s), and for sampled steps the cosine similarity of the
gradient to the dense gradient on the same rollouts and targets, averaged over --draws draws. Also the ratio
of a teacher pass with the base in fp32 (TF32 matmuls, as the authors run their teachers) to the bf16 pass.
A row also records how many transformer blocks --compile compiled (train.speed_up).

--ratio: the PPO ratio at the first optimizer step, eager vs compiled (kl_only, lr 1e-30 (weights unchanged), 2
optimizer steps, so the policy never moves and every exact ratio is 1): before the fix, max |log pi_train - log
pi_rollout| and the fraction of rows it would clip (first_step_ratio_noise, first_step_noise_clip_fraction); after,
the ratios as trained (clip_fraction; log_ratio_max over the second step, whose old log-probs the training forward
recomputed).

Run (one GPU): python bench.py --configs "compiled b16,compiled b16 k1,compiled b16 k2,compiled b16 k3" --out bench_out
               python bench.py --ratio --out bench_ratio
Large models, one H200. Measured (results/models_h200/): SD3.5-L compiled b16, 0.70 images/s, 121.5 GB,
60.5 % MFU; FLUX.1-dev compiled b8, 0.64 images/s, 73.4 GB, 59.5 % MFU (k2: 1.66 images/s), once cuDNN's attention,
whose backward failed on FLUX, was turned off (models.flux_base; docs/speed.md).
Estimates made before: one forward of one image (torch's FLOP counter on meta tensors) is 4.45 TFLOP on SD3.5-M
(CFG pair), 14.4 on SD3.5-L, 15.8 on FLUX.1-dev (no CFG pair); a dense iteration
~3.3x (SD3.5-L) and ~3.5x (FLUX.1-dev, ~0.74 PFLOP per image) SD3.5-M's 214 TFLOP per image, ~30 s for 16 images
at SD3.5-M's compiled 53% MFU. Activations the training forward saves (meta tensors; on SD3.5-M eager b8 it counts
43 GB against 44.4 measured) plus weights: eager micro-batch 8 / 16, SD3.5-L 96 / 170 GB, FLUX.1-dev 90 / 144 GB;
compiling saved a third of SD3.5-M's activations at b16. train.speed_up compiles FLUX's 19 double-stream and 38
single-stream blocks (a row's compiled_blocks says how many). One config per 10-minute call (compile, 3 iterations,
the FLOP count: ~4-5 min); a config that runs out of memory gives an error row and the next one runs:
               python bench.py --model sd35l --configs "compiled b16" --skip_precision --out $OUT/sd35l
               python bench.py --model flux-dev --configs "compiled b8,compiled b8 k2" --draws 2 --skip_precision --out $OUT/flux
CPU smoke (tiny shapes of the model's family): python bench.py --tiny [--model flux-dev]
"""
import argparse
from dataclasses import dataclass
import gc
import json
from pathlib import Path
import tempfile
import time
import zlib

import torch

from merge_lora import LoRA, save_lora
from models import FLUX_TARGETS, SD3_TARGETS, Base, blocks, flux_base
from teachers import target_velocities
from train import Config, opd_iteration, route, setup, setup_distributed, step_loss

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35L = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
             pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)   # FLUX.1-dev's scheduler config


@dataclass(frozen=True)
class Shapes:
    """What bench needs of a model: its family's transformer config, the latent side at 512 px (VAE factor 8; the
    SD3 configs' sample_size 128 is 1024 px), text tokens per prompt, train.py's --guidance, the LoRA targets."""
    family: str                        # "sd3" (SD3Transformer2DModel, CFG) | "flux" (FluxTransformer2DModel)
    config: dict
    latent: int
    tokens: int
    guidance: float
    targets: str                       # comma list of module-name suffixes: models.py's, as train.py's defaults


MODELS = {"sd35m": Shapes("sd3", SD35M, 64, 205, 4.5, SD3_TARGETS),
          "sd35l": Shapes("sd3", SD35L, 64, 205, 4.5, SD3_TARGETS),
          "flux-dev": Shapes("flux", FLUX_DEV, 64, 128, 3.5, FLUX_TARGETS)}
TINY_MODELS = {"sd3": Shapes("sd3", TINY, 8, 205, 4.5, SD3_TARGETS),
               "flux": Shapes("flux", TINY_FLUX, 8, 16, 3.5, FLUX_TARGETS)}
# name: (micro_batch, grad_checkpointing, compile, sampled_steps, target_batch: rows per no-grad forward, 0 = micro);
# a name ending in " ema" also keeps the EMA (--ema) and times it
CONFIGS = {"eager b8": (8, False, False, 0, 0), "eager b16 ckpt": (16, True, False, 0, 0),
           "eager b16": (16, False, False, 0, 0), "compiled b16 ckpt": (16, True, True, 0, 0),
           "compiled b16": (16, False, True, 0, 0), "compiled b8": (8, False, True, 0, 0),
           "compiled b16 k1": (16, False, True, 1, 0), "compiled b16 k2": (16, False, True, 2, 0),
           "compiled b16 k3": (16, False, True, 3, 0), "compiled b16 t48": (16, False, True, 0, 48),
           "eager b8 k2": (8, False, False, 2, 0), "compiled b16 ema": (16, False, True, 0, 0),
           "compiled b8 k2": (8, False, True, 2, 0)}
PAPER_UPDATE_IMAGES = 256              # images per update of the paper's recipe (2 optimizer steps each)


def random_base(model: Shapes, device, dtype, seed: int = 0) -> Base:
    """The transformer with random weights; prompt embeddings drawn from a seed per prompt (real shapes). A FLUX
    base goes through models.py's FLUX seam (flux_velocity, FLUX.1-dev's dynamic-shift sigmas), as load_flux
    builds it; latents stay unpacked, (in_channels / 4, h, w)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(seed)
    config, latent = model.config, model.latent
    with torch.device(device):
        kind = FluxTransformer2DModel if model.family == "flux" else SD3Transformer2DModel
        transformer = kind(**config).requires_grad_(False).eval()
    torch.nn.Module.to(transformer, dtype)                # not diffusers' .to: it warns of fp32 modules it has none of
    dim, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]

    def encode(prompts):
        rows = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(model.tokens, dim, generator=g) for g in rows])
        return embeds.to(device, dtype), torch.stack([torch.randn(pooled, generator=g) for g in rows]).to(device, dtype)

    if model.family == "sd3":
        return Base(transformer, encode, lambda x: x, (config["in_channels"], latent, latent), 3.0, "random-sd3")
    return flux_base(transformer, encode, lambda x: x, latent, FLUX_SCHEDULER, "random-flux")


def random_lora(transformer, seed: int, targets: str, rank: int = 32, alpha: float = 64.0) -> LoRA:
    g, suffixes = torch.Generator().manual_seed(seed), tuple(targets.split(","))
    A, B = {}, {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
            A[name] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            B[name] = torch.randn(module.out_features, rank, generator=g) * 0.01
    return LoRA(A, B, alpha)


def write_inputs(folder: Path, transformer, targets: str) -> dict:
    """Teacher/anchor LoRA files and prompt files for the run config."""
    for i, name in enumerate(("ocr", "geneval", "anchor")):
        save_lora(random_lora(transformer, i, targets), folder / f"{name}.safetensors")
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
    trained steps, or --sampled_steps drawn). Model FLOPs: gradient checkpointing is off while counting (its
    recomputed forward is not counted)."""
    transformer = run.base.transformer
    if not run.cfg.grad_checkpointing:
        return count_phases(run)
    transformer.disable_gradient_checkpointing()
    try:
        return count_phases(run)
    finally:
        transformer.enable_gradient_checkpointing()


def count_phases(run) -> dict:
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


def teacher_precision_ratio(model: Shapes, device, micro_batch: int, folder: Path) -> dict:
    """Seconds of one teacher pass (9 steps, the model's guidance) with the base in fp32/TF32 (the authors'
    teachers) vs bf16."""
    from merge_lora import load_lora
    from teachers import add_adapter
    torch.backends.cuda.matmul.allow_tf32 = True
    seconds = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32_tf32", torch.float32)):
        base = random_base(model, device, dtype)
        add_adapter(base.transformer, load_lora(folder / "ocr.safetensors"), "teacher_ocr")
        rows = 9 * micro_batch                                                  # 9 states of each image
        states = torch.randn(rows, *base.latent_shape, device=device)
        sigmas = torch.linspace(1, 0.1, 9, device=device).repeat_interleave(micro_batch)
        cond = base.condition([f"p{i}" for i in range(micro_batch)])
        image = torch.arange(micro_batch, device=device).repeat(9)
        for repeat in range(2):                                                 # the first pass warms up
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
            target_velocities(base, ["teacher_ocr"] * rows, states, sigmas, cond, image, model.guidance, micro_batch)
            torch.cuda.synchronize() if device.type == "cuda" else None
            seconds[name] = time.perf_counter() - start
        del base
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return seconds | {"fp32_over_bf16": seconds["fp32_tf32"] / seconds["bf16"]}


def bench_config(name: str, model: Shapes, inputs: dict, device, iterations: int, images: int, flops: bool,
                 draws: int) -> dict:
    micro_batch, checkpointing, compiled, sampled, target_batch = CONFIGS[name]
    cfg = Config(**model_flags(model), **inputs, images_per_iteration=images, group_size=4, updates=1,
                 micro_batch=micro_batch, grad_checkpointing=checkpointing, compile=compiled, ema=name.endswith(" ema"), sampled_steps=sampled,
                 target_batch=target_batch, out=str(Path(inputs["anchor"]).parent / name.replace(" ", "_")), overwrite=True)
    return with_run(cfg, name, model, device, lambda run: measure_config(run, name, images, iterations, flops, draws))


def model_flags(model: Shapes) -> dict:
    """train.py flags that follow the model: the base's name in the record, resolution, guidance, LoRA targets."""
    return dict(base=f"random-{model.family}", resolution=model.latent * 8, guidance=model.guidance,
                targets=model.targets)


def with_run(cfg: Config, name: str, model: Shapes, device, measure) -> dict:
    """measure(run) for a run set up on a fresh random base; running out of memory gives an error row instead.
    Dynamo's caches are reset first: each config compiles its own blocks (the earlier configs' graphs would
    otherwise fill torch._dynamo's cache_size_limit and leave this config running eagerly)."""
    torch._dynamo.reset()
    base = random_base(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
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
              "compiled_blocks": compiled_blocks(run.base.transformer), "flops": None, "grad_cosine": None}
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


def compiled_blocks(transformer) -> str:
    """'compiled/all' of models.blocks (nn.Module.compile sets _compiled_call_impl)."""
    every = blocks(transformer)
    return f"{sum(getattr(b, '_compiled_call_impl', None) is not None for b in every)}/{len(every)}"


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


def ratio_study(model: Shapes, inputs: dict, device, images: int, configs: list[str]) -> list[dict]:
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
        cfg = Config(**model_flags(model), **inputs, images_per_iteration=images, group_size=4, updates=2,
                     micro_batch=micro_batch, compile=compiled, loss="kl_only", lr=1e-30, weight_decay=0.0,
                     out=str(Path(inputs["anchor"]).parent / f"ratio_{name.replace(' ', '_')}"), overwrite=True)
        results.append(with_run(cfg, name, model, device, lambda run: measure(run, name)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per config (after one warm-up)")
    parser.add_argument("--images", type=int, default=16, help="images per iteration")
    parser.add_argument("--draws", type=int, default=4, help="draws of the sampled steps for the gradient cosine")
    parser.add_argument("--model", default="sd35m", choices=list(MODELS), help="the shapes to benchmark")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes of the model's family (a CPU smoke test)")
    parser.add_argument("--skip_precision", action="store_true")
    parser.add_argument("--ratio", action="store_true", help="the first-step PPO ratio study instead of speed")
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args()
    _, _, device = setup_distributed()                                         # a world of one, as train.py
    model = TINY_MODELS[MODELS[args.model].family] if args.tiny else MODELS[args.model]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import peft
    record = {"model": args.model + " (tiny)" * args.tiny,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "peft": peft.__version__,
              "matmul_peak_tflops": matmul_peak(device) / 1e12, "configs": []}
    print(json.dumps(record), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        shapes_only = random_base(model, "meta", torch.float32).transformer
        inputs = write_inputs(Path(tmp), shapes_only, model.targets)
        if args.ratio:
            names = args.configs.split(",") if args.configs != ",".join(CONFIGS) else ["eager b16", "compiled b16"]
            record["ratio"] = ratio_study(model, inputs, device, 2 * args.images, names)
            (out / "ratio.json").write_text(json.dumps(record, indent=2))
            (out / "ratio.md").write_text(ratio_table(record))
            print(ratio_table(record))
            return
        for name in args.configs.split(","):
            count = not any(c.get("flops") for c in record["configs"])                 # once, on one image
            result = bench_config(name, model, inputs, device, args.iterations, args.images, count, args.draws)
            record["configs"].append(result)
            print(json.dumps(result), flush=True)
            (out / "bench.json").write_text(json.dumps(record, indent=2))
        if not args.skip_precision:
            record["teacher_precision"] = teacher_precision_ratio(model, device, 8, Path(tmp))
            print(json.dumps(record["teacher_precision"]), flush=True)
    record["tflop"] = tflop_record(record["configs"])
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    (out / "bench.md").write_text(table(record))
    print(table(record))


def tflop_record(configs: list[dict]) -> dict | None:
    """TFLOP of the rollout per image and of the targets and training per trained row, from the config whose
    one-image batch was counted (None when none was: every config ran out of memory)."""
    counted = next((c for c in configs if c.get("flops")), None)
    if counted is None:
        return None
    rows = counted["rows_per_image"]                                           # the counted one-image batch's rows
    return {"rollout": counted["flops"]["rollout"] / 1e12, "targets_per_row": counted["flops"]["targets"] / rows / 1e12,
            "train_per_row": counted["flops"]["train"] / rows / 1e12}


def tflop_per_image(record: dict, rows: int) -> dict:
    """Per-phase TFLOP of one image with `rows` trained rows (the rollout is whole; targets and training per row);
    NaN when nothing was counted."""
    t = record["tflop"] or {"rollout": float("nan"), "targets_per_row": float("nan"), "train_per_row": float("nan")}
    phases = {"rollout": t["rollout"], "targets": rows * t["targets_per_row"], "train": rows * t["train_per_row"]}
    return phases | {"total": sum(phases.values())}


def table(record: dict) -> str:
    dense = tflop_per_image(record, 9)
    lines = [f"{record.get('model', 'sd35m')}: {record['device']}, torch {record['torch']}, "
             f"bf16 matmul peak {record['matmul_peak_tflops']:.0f} TFLOP/s; "
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
    partial = {c["compiled_blocks"] for c in record["configs"] if c.get("compile") and "compiled_blocks" in c
               and len(set(c["compiled_blocks"].split("/"))) == 2}
    if partial:
        lines.append(f"\n--compile compiled {', '.join(sorted(partial))} of the transformer blocks (train.speed_up)")
    for c in record["configs"]:
        if "ema_update_s" in c:
            lines.append(f"\n{c['config']}: one EMA update {c['ema_update_s'] * 1e3:.2f} ms = "
                         f"{c['ema_update_s'] / c['seconds']:.3%} of its iteration (the EMA moves every 8 optimizer "
                         f"steps); train.py's per-iteration snapshot {c['snapshot_s'] * 1e3:.1f} ms = "
                         f"{c['snapshot_s'] / c['seconds']:.2%}")
    if "teacher_precision" in record:
        p = record["teacher_precision"]
        lines.append(f"\nteacher pass (9 steps, the model's guidance, 8 images): bf16 {p['bf16']:.2f} s, fp32/TF32 {p['fp32_tf32']:.2f} s, "
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
