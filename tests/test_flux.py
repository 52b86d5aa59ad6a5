"""FLUX.1 through the base seam: a tiny FluxPipeline built offline from configs, loaded with models.load_base;
a Flow-SDE rollout, and the noise-free sampler against FluxPipeline's own denoising loop (the parity of packing,
position ids, guidance embedding and the dynamic-shift sigmas)."""
import pytest
import torch

from conftest import tiny_text_parts, tiny_vae
import models
import sde_sampler

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
