"""FLUX.1 through the base seam and the whole loop, on a tiny FluxPipeline built offline from configs: a Flow-SDE
rollout and the noise-free sampler against FluxPipeline's own denoising loop (packing, position ids, guidance
embedding, dynamic-shift sigmas); FLUX LoRA files (peft, diffusers, flat) read to peft's deltas, and ours (training's
export, merge_lora's output) loaded by FluxPipeline.load_lora_weights at the right scale; LoRAs of the other family
refused in one line; OPD with two teachers in two formats (1 process = 2 processes), merge, SFT, GRPO and
evaluate.py on FLUX."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from conftest import in_world_of_one, random_lora, tiny_text_parts, tiny_vae, train_error, write_peft
import evaluate
import merge_lora
from merge_lora import load_lora, lora_family, save_lora
import models
from models import FLUX_TARGETS, SD3_TARGETS
import sde_sampler
from sde_sampler import Condition
from teachers import add_adapter
from test_train import SMALL, run_train
import train

RESOLUTION, MAX_SEQUENCE_LENGTH, GUIDANCE = 16, 16, 3.5


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline (guidance-distilled, like FLUX.1-dev) with every component a few thousand parameters."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)
    clip, t5, clip_tokenizer, t5_tokenizer = tiny_text_parts(clip_hidden=16, clip_layers=1)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FluxPipeline(
        transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
        text_encoder=CLIPTextModel(clip).eval(), tokenizer=clip_tokenizer,
        text_encoder_2=T5EncoderModel(t5).eval(), tokenizer_2=t5_tokenizer)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_flux")
    tiny_flux_pipeline().save_pretrained(folder)
    base = models.load_base(str(folder), "cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return folder, base


def test_flux_base_layout_and_schedule(flux):
    _, base = flux
    assert base.family_velocity is models.flux_velocity and base.latent_shape == (4, 8, 8)
    x = torch.randn(2, 4, 8, 8)
    packed = models.pack(x)
    assert packed.shape == (2, 16, 16) and torch.equal(models.unpack(packed, 8, 8), x)
    from diffusers import FluxPipeline
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 8))                      # diffusers' layout
    sigmas = base.sigmas(6)
    seq_len, mu = 16, 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)                            # calculate_shift
    t = torch.linspace(1, 1 / 6, 6, dtype=torch.float64)
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1))         # exponential time shift
    assert seq_len == (8 // 2) ** 2 and sigmas[-1] == 0 and len(sigmas) == 7
    torch.testing.assert_close(sigmas[:-1], expected.float(), atol=1e-6, rtol=0)


def test_a_flux_base_turns_cudnn_attention_off(flux):
    # cuDNN's SDPA backward failed in FLUX.1-dev's training backward on an H200 (results/models_h200/README.md)
    torch.backends.cuda.enable_cudnn_sdp(True)
    models.flux_base(flux[1].transformer, None, None, 8, {"shift": 3.0}, "again")
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


def test_flux_rollout_and_parity_with_pipeline(flux):
    folder, base = flux
    from diffusers import FluxPipeline
    prompts = ["a photo of a cat", "two red dog"]
    cond = base.condition(prompts)
    assert cond.embeds.shape == (2, MAX_SEQUENCE_LENGTH, 32) and cond.pooled.shape == (2, 16)
    steps, sigmas = 4, base.sigmas(4)
    x0, step_noise = sde_sampler.initial_noise([5, 6], base.latent_shape, steps, "cpu")

    def velocity(x, sigma, c):
        return base.velocity(x, sigma, c, GUIDANCE)

    trajectory = sde_sampler.rollout(velocity, cond, x0, step_noise, sigmas, noise_level=0.7)
    assert trajectory.x.shape == (steps + 1, 2, 4, 8, 8) and trajectory.log_prob.shape == (steps, 2)
    assert torch.isfinite(trajectory.x).all() and torch.isfinite(trajectory.log_prob).all()
    assert not torch.allclose(trajectory.x[-1, 0], trajectory.x[-1, 1])

    ours = sde_sampler.sample_ode(velocity, cond, x0, sigmas)
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps, guidance_scale=GUIDANCE,
                  latents=models.pack(x0), max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent").images
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float())
    torch.testing.assert_close(ours, models.unpack(theirs, 8, 8), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, x0, atol=1e-2)                                              # the loop moved
    images = base.decode(ours)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and images.min() >= 0 and images.max() <= 1


def test_flux_guidance_matters_and_is_required(flux):
    _, base = flux
    cond = base.condition(["a photo of a cat"])
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.7])
    assert not torch.allclose(base.velocity(x, sigma, cond, 1.0), base.velocity(x, sigma, cond, GUIDANCE))
    with pytest.raises(ValueError, match="guidance"):
        base.velocity(x, sigma, cond, None)


# ----------------------------------------------------------------------------------------- LoRA files

FLUX_MODULES = 15     # tiny FLUX under FLUX_TARGETS: 8 attention + 4 MLP projections (double), attn.to_q/k/v (single)
TRAIN = ["--resolution", RESOLUTION, "--max_sequence_length", MAX_SEQUENCE_LENGTH, "--steps", "3", "--train_steps", "2",
         "--images_per_iteration", "4", "--group_size", "2", "--micro_batch", "2", "--updates", "1", "--rank", "2",
         "--alpha", "4", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def flux_files(flux, tmp_path_factory) -> dict:
    """Two FLUX teachers, ocr a peft folder (Flow-GRPO's layout) and geneval our diffusers-keyed file; their prompts."""
    _, base = flux
    folder, targets = tmp_path_factory.mktemp("flux_loras"), FLUX_TARGETS.split(",")
    ocr = write_peft(random_lora(base.transformer, 1, targets=targets), folder / "ocr")
    geneval = folder / "geneval.safetensors"
    save_lora(random_lora(base.transformer, 2, rank=2, alpha=4.0, targets=targets), geneval)
    (folder / "ocr.txt").write_text('a sign that says "hello"\na red sign\n')
    (folder / "geneval.txt").write_text("two red cat\na blue dog on the left\n")
    return {"ocr": ocr, "geneval": geneval, "teachers": f"ocr={ocr},{geneval}",
            "prompts": f"ocr={folder / 'ocr.txt'},geneval={folder / 'geneval.txt'}", "folder": folder}


def assert_loads_in_flux_pipeline(transformer, path) -> None:
    """FluxPipeline.load_lora_weights(path) changes the transformer as our add_adapter does (velocities at 1e-5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    pipe = FluxPipeline(transformer=copy.deepcopy(transformer), scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    pipe.load_lora_weights(path)
    lora, ours = load_lora(path), copy.deepcopy(transformer)
    add_adapter(ours, lora, "student", str(path))
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (lora.rank, lora.alpha)          # not diffusers' silent alpha = r
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g), None, None)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v_diffusers, v_ours, v_base = (models.flux_velocity(t, x, sigma, cond, GUIDANCE)
                                       for t in (pipe.transformer, ours, transformer))
    torch.testing.assert_close(v_diffusers, v_ours, atol=1e-5, rtol=0)
    assert (v_ours - v_base).abs().max() > 1e-3                                  # the LoRA does something


def test_flux_defaults_and_every_lora_format_give_peft_deltas(flux, sd3_folder, tmp_path):
    folder, base = flux
    cfg = train.parse_config(["--base", str(folder)])
    assert (cfg.targets, cfg.guidance) == (FLUX_TARGETS, 3.5)                    # Flow-GRPO's FLUX LoRA and guidance
    assert train.parse_config(["--base", str(folder), "--targets", "attn.to_q"]).targets == "attn.to_q"   # flags win
    sd3 = train.parse_config(["--base", str(sd3_folder)])
    assert (sd3.targets, sd3.guidance) == (SD3_TARGETS, 4.5) and train.parse_config([]).targets == SD3_TARGETS

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=FLUX_TARGETS.split(","), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base.transformer), config)
    deltas = {name: layer.get_delta_weight("default").detach() for name, layer in model.base_model.model.named_modules()
              if hasattr(layer, "lora_A") and "default" in layer.lora_A}
    assert len(deltas) == FLUX_MODULES and lora_family(deltas) == "FLUX"
    assert {"transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.attn.to_v"} <= deltas.keys()
    model.save_pretrained(tmp_path / "peft")                                    # peft's own writer
    tensors = get_peft_model_state_dict(model)
    save_file(tensors, tmp_path / "flat.safetensors", metadata={"lora_alpha": "8"})
    from diffusers import FluxPipeline
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers={k.removeprefix("base_model.model."): v
                                                                      for k, v in tensors.items()},
                                   transformer_lora_adapter_metadata=config.to_dict())
    for path in (tmp_path / "peft", tmp_path / "flat.safetensors", tmp_path / "pytorch_lora_weights.safetensors"):
        lora = load_lora(path)
        assert lora.A.keys() == deltas.keys(), path
        for module, reference in deltas.items():
            torch.testing.assert_close(lora.delta(module), reference, rtol=1e-6, atol=1e-7)
    save_lora(lora, tmp_path / "ours.safetensors")
    assert_loads_in_flux_pipeline(base.transformer, tmp_path / "ours.safetensors")


def test_a_lora_of_the_other_family_is_refused_in_one_line(flux, flux_files, sd3_folder, teacher_files, tmp_path, capsys):
    folder, base = flux
    sd3_lora, flux_lora, prompts = teacher_files["pick"], flux_files["geneval"], flux_files["folder"] / "ocr.txt"
    on_sd3 = ["--base", sd3_folder, "--prompts", f"ocr={prompts}", "--out", tmp_path / "a", *SMALL]
    on_flux = ["--base", folder, "--prompts", f"ocr={prompts}", "--out", tmp_path / "b", *TRAIN]
    flux_misfit = "(module 'single_transformer_blocks.0.attn.to_k' is not a linear layer of this base)"
    sd3_misfit = "(module 'transformer_blocks.1.attn.add_k_proj' is not a linear layer of this base)"
    fix = ": give LoRAs trained on this base"
    cases = [(on_sd3 + ["--teachers", f"ocr={flux_lora}"],
              f"teacher ocr {flux_lora} targets FLUX modules {flux_misfit} but the base is SD3{fix}"),
             (on_sd3 + ["--teachers", f"ocr={teacher_files['ocr']}", "--anchor", flux_lora],
              f"--anchor {flux_lora} targets FLUX modules {flux_misfit} but the base is SD3{fix}"),
             (on_flux + ["--teachers", f"ocr={sd3_lora}"],
              f"teacher ocr {sd3_lora} targets SD3 modules {sd3_misfit} but the base is FLUX{fix}"),
             (on_flux + ["--teachers", f"ocr={flux_files['ocr']}", "--init_lora", sd3_lora],
              f"--init_lora {sd3_lora} targets SD3 modules {sd3_misfit} but the base is FLUX{fix}")]
    for args, message in cases:
        assert train_error(args) == message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"^LoRA opd .* targets SD3 modules"):         # evaluate.py --lora opd=...
        add_adapter(copy.deepcopy(base.transformer), load_lora(sd3_lora), "opd", f"opd {sd3_lora}")
    with pytest.raises(SystemExit):                                              # merge_lora.py takes no base: the
        merge_lora.main([str(sd3_lora), str(flux_lora), "--out", str(tmp_path / "m.safetensors")])  # modules differ
    assert "target different modules" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------------------- the modes on FLUX

def test_opd_on_flux_two_processes_give_the_lora_of_one_and_diffusers_loads_it(flux, flux_files, tmp_path):
    folder, base = flux
    args = ["--base", folder, "--teachers", flux_files["teachers"], "--prompts", flux_files["prompts"], *TRAIN,
            "--iterations", "2"]
    in_world_of_one(train.main, [*args, "--out", tmp_path / "one"])
    run_train([*args, "--out", tmp_path / "two"], nproc=2)
    record = json.loads((tmp_path / "one" / "config.json").read_text())["config"]
    assert (record["targets"], record["guidance"]) == (FLUX_TARGETS, 3.5)
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 and m["kl_teacher"] > 0 and m["grad_norm"] > 0 for m in metrics)
    one, two = load_lora(tmp_path / "one" / "lora.safetensors"), load_lora(tmp_path / "two" / "lora.safetensors")
    assert len(one.A) == FLUX_MODULES and (one.rank, one.alpha) == (2, 4.0)
    assert max(b.abs().max().item() for b in one.B.values()) > 1e-4                 # training moved the LoRA
    for m in one.A:
        torch.testing.assert_close(one.A[m], two.A[m], atol=1e-6, rtol=0)
        torch.testing.assert_close(one.B[m], two.B[m], atol=1e-6, rtol=0)
    assert_loads_in_flux_pipeline(base.transformer, tmp_path / "one" / "lora.safetensors")


def test_merge_sft_grpo_and_evaluate_run_on_flux(flux, flux_files, tmp_path):
    folder, base = flux
    assert base.conditional_guidance(GUIDANCE) == GUIDANCE                       # L_FM at the guidance embedding
    assert models.Base(None, None, None, (4, 8, 8), 3.0, "sd3").conditional_guidance(4.5) is None   # SD3: no CFG
    merged = tmp_path / "merged.safetensors"
    merge_lora.main([str(flux_files[t]) for t in ("ocr", "geneval")] + ["--method", "delta-mean", "--out", str(merged)])
    assert_loads_in_flux_pipeline(base.transformer, merged)

    common = ["--base", folder, "--prompts", flux_files["prompts"], *TRAIN, "--iterations", "1"]
    in_world_of_one(train.main, [*common, "--algo", "sft", "--teachers", flux_files["teachers"], "--init_lora", merged,
                                 "--sft_sample_steps", "2", "--out", tmp_path / "sft"])
    in_world_of_one(train.main, [*common, "--algo", "grpo", "--reward", "brightness", "--out", tmp_path / "grpo"])
    for run, key in (("sft", "loss"), ("grpo", "reward")):
        line = json.loads((tmp_path / run / "metrics.jsonl").read_text())
        assert line["iteration"] == 1 and line[key] > 0 and line["grad_norm"] > 0, (run, line)
    assert load_lora(tmp_path / "sft" / "lora.safetensors").rank == 6             # the merge's 4 + 2
    in_world_of_one(evaluate.main, ["--base", folder, "--prompts", f"ocr={flux_files['folder'] / 'ocr.txt'}",
                                    "--rewards", "ocr=brightness", "--lora", f"sft={tmp_path / 'sft/lora.safetensors'}",
                                    "--steps", "2", "--resolution", RESOLUTION, "--max_sequence_length",
                                    MAX_SEQUENCE_LENGTH, "--out", tmp_path / "eval"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["config"]["guidance"] == 3.5 and set(results["table"]) == {"base", "sft"}
    assert results["table"]["base"]["ocr"] != results["table"]["sft"]["ocr"]
