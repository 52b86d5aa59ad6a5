"""The base model: everything that depends on the model family, in one place (the seam the loop calls).

A `Base` gives the loop all it needs of the model, and nothing else calls the transformer's forward:
    - `velocity(x, sigma, cond, guidance) -> float32 [B,C,H,W]`: a batch of latents, sigmas and a condition
      to a velocity, guidance included (SD3: CFG, v = v_uncond + g (v_cond - v_uncond), negative prompt "",
      uncond and cond rows in one batched forward, bf16 autocast for a bf16 base; guidance None = the
      conditional velocity alone, one forward, for the flow-matching loss of sft.py);
    - `condition(prompts)` (prompt embeddings with the negative prompt "", each unique prompt encoded once,
      cached);
    - `decode(latents) -> images in [0, 1]`;
    - `latent_shape` (C, h, w) and `sigmas(steps)`, the scheduler's sigmas (sigma runs 1 -> 0, see sde_sampler.py).
The sampler (sde_sampler.py) takes `velocity` as a callable; teachers.py, train.py, heldout.py and sft.py
call the base. Adapters (peft, on `Base.transformer`) are switched by teachers.use_adapter. Two kinds of
SD3 base today:
    - a diffusers SD3 folder, loaded with StableDiffusion3Pipeline.from_pretrained (SD3.5-Medium for
      real use; tiny folders in the tests); T5 truncated to `max_sequence_length` tokens (128 in Flow-GRPO)
    - the toy world's base (toy_model.py, an SD3 transformer in pixel space: the same SD3 velocity), when
      no folder is given.
A second family, FLUX.1 (issue 19), plugs in through the same fields: `load_flux` (a diffusers FluxPipeline
folder; `load_base` dispatches on model_index.json's `_class_name`) sets `Base.family_velocity = flux_velocity`
and `Base.schedule` to FLUX's sigmas; the SD3 path leaves both None (sd3_velocity, shifted_sigmas).
    - Latents: the sampler keeps FLUX latents UNPACKED, [B, C, h, w] (C = the VAE's 16 latent channels), and
      flux_velocity packs them into 2x2 patches ([B, h/2 * w/2, 4C], FluxPipeline._pack_latents' layout) for the
      forward and unpacks the velocity. Packing is a permutation of elements, so sde_sampler's per-element-mean
      log-prob, its noise and the KL are the same numbers in either layout; `latent_shape` is (C, h, w).
    - Position ids as the pipeline builds them: img_ids [h/2 * w/2, 3] = (0, row, col), txt_ids zeros [L, 3].
    - Prompts: the pipeline's own encode_prompt; Condition.embeds = T5's sequence (max_sequence_length tokens),
      Condition.pooled = CLIP's pooled output. Condition's negative rows (the "" prompt) are carried but
      unused: FLUX has no CFG pair.
    - Guidance: FLUX.1-dev is guidance-distilled: one forward with the guidance embedding (the transformer's
      `guidance` argument = the guidance scale, when transformer.config.guidance_embeds), no CFG pair, no
      negative prompt. We follow Flow-GRPO's FLUX configs (config/grpo.py, pickscore_flux*: FLUX.1-dev,
      sample.guidance_scale = 3.5, 512 px, 6 sampling steps, 28 eval steps, no true CFG).
    - Sigmas as FluxPipeline sets them: FlowMatchEulerDiscreteScheduler (the folder's config,
      use_dynamic_shifting) .set_timesteps(sigmas=linspace(1, 1/T, T), mu), mu = calculate_shift of the packed
      image sequence length h/2 * w/2 between the config's (base_image_seq_len, base_shift) and
      (max_image_seq_len, max_shift); then a final 0.
    - Decoding as FluxPipeline does: latents / scaling_factor + shift_factor, then the VAE.
    - The flow-matching loss (sft.py, train.py --algo sft) needs the conditional velocity: on SD3 the conditional
      branch alone (guidance None, no CFG pair); FLUX.1-dev has no unconditional branch, and its conditional
      velocity is its one forward with the guidance embedding at the sampling guidance (`Base.conditional_guidance`;
      what FLUX.1-dev LoRA fine-tuning does, e.g. diffusers' train_dreambooth_lora_flux.py: guidance =
      --guidance_scale when transformer.config.guidance_embeds). So L_FM on FLUX trains the student at --guidance.
    - LoRA targets (`FLUX_TARGETS`, the default --targets for a FLUX folder: `family_defaults`): Flow-GRPO's FLUX
      script (scripts/train_flux.py; r = 64, alpha = 128) adapts the attention projections `attn.{to_q, to_k, to_v,
      to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out}` AND the MLPs of the double-stream blocks
      `ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2` (its SD3 script: attention only, our
      SD3_TARGETS). As suffixes they also reach the single-stream blocks' `attn.to_q/k/v` (their fused MLP,
      proj_mlp / proj_out, is not adapted). The default guidance of a FLUX folder is Flow-GRPO's 3.5 (SD3: CFG 4.5).
    - LoRA files say nothing of their base; merge_lora.lora_family reads the family off the module names
      (single-stream blocks: FLUX), and teachers.add_adapter names both families when a LoRA of one does not fit a
      base of the other.
  Why the Flow-SDE step and the KL hold unchanged for FLUX: FLUX is trained with the same rectified-flow
  convention as SD3, x_sigma = (1 - sigma) x0 + sigma eps with velocity v = eps - x0, and the transformer's
  timestep is sigma itself (SD3's is 1000 sigma: both forwards take their own scaling, inside the velocity).
  The Flow-SDE step (Flow-GRPO eq. 9) and the Gaussian KL between two policies' step means are derived from
  that convention alone, for any decreasing grid 1 = sigma_0 > ... > sigma_T = 0; FLUX differs only in the
  grid (the resolution-dependent exponential shift instead of SD3's fixed shift 3), which the sampler takes
  as an argument.
The transformer is frozen and in eval mode; LoRA adapters are added on top (teachers.py, train.py).

Demo: python -c "import models; b = models.load_base('path/to/sd3.5-medium', 'cuda'); print(b.latent_shape)"
"""
import contextlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
import sys
from typing import Callable

import torch

from sde_sampler import Condition, shifted_sigmas
import toy_model


SD3_TARGETS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
               "attn.to_add_out")                          # Flow-GRPO's SD3 LoRA: the joint attention (DESIGN 3.7)
FLUX_TARGETS = SD3_TARGETS + ",ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"   # Flow-GRPO's FLUX LoRA
FLUX_GUIDANCE = 3.5                                        # Flow-GRPO's FLUX.1-dev sample.guidance_scale
FAMILY_DEFAULTS = {"SD3": {}, "FLUX": {"targets": FLUX_TARGETS, "guidance": FLUX_GUIDANCE}}   # over the SD3 defaults


def folder_family(path: str) -> str:
    """'FLUX' for a diffusers FluxPipeline folder (model_index.json's `_class_name`), else 'SD3' (an SD3 folder, a
    path that is not a folder yet, or "" = the toy world, an SD3 transformer)."""
    index = Path(path) / "model_index.json" if path else None
    if index is not None and index.is_file() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline":
        return "FLUX"
    return "SD3"


def family_defaults(path: str) -> dict:
    """Defaults that depend on the base's family, for the flags the user did not set (train.py, evaluate.py)."""
    return FAMILY_DEFAULTS[folder_family(path)]


@dataclass
class Base:
    transformer: torch.nn.Module                                   # SD3 or FLUX transformer (diffusers), frozen
    encode_prompts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # -> embeds [B,L,D], pooled [B,P]
    decode: Callable[[torch.Tensor], torch.Tensor]                 # latents [B,C,h,w] -> images [B,3,H,W] in [0,1]
    latent_shape: tuple[int, int, int]                             # (C, h, w)
    shift: float                                                   # scheduler time shift (3.0 for SD3.5-M)
    name: str                                                      # identifies the base in run records
    cache_size: int = 1024                                         # prompts kept (SD3.5-M: 1.7 MB each in bf16)
    family_velocity: Callable | None = None                        # (transformer, x, sigma, cond, guidance) -> v; None: sd3_velocity
    schedule: Callable[[int], torch.Tensor] | None = None          # steps -> sigmas [T+1]; None: shifted_sigmas(steps, shift)
    embedded_guidance: bool = False                                # guidance is an input (FLUX.1-dev): no CFG pair
    _cache: OrderedDict = field(default_factory=OrderedDict)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings per prompt, each unique prompt encoded once and kept in a bounded cache."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            with torch.no_grad():
                embeds, pooled = self.encode_prompts(new)
            for i, prompt in enumerate(new):
                self._cache[prompt] = (embeds[i], pooled[i])
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > max(self.cache_size, len(prompts)):
            self._cache.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def condition(self, prompts: list[str]) -> Condition:
        """Prompt rows plus the negative prompt "" for CFG."""
        (embeds, pooled), (neg_embeds, neg_pooled) = self.encode(prompts), self.encode([""])
        return Condition(embeds, pooled, neg_embeds, neg_pooled)

    def velocity(self, x, sigma, cond: Condition, guidance: float | None) -> torch.Tensor:
        """The velocity at (x, sigma), guidance included (sd3_velocity or flux_velocity).  x: [B,C,H,W], sigma: [B] -> float32 [B,C,H,W]"""
        return (self.family_velocity or sd3_velocity)(self.transformer, x, sigma, cond, guidance)

    def conditional_guidance(self, guidance: float) -> float | None:
        """The `guidance` argument of the conditional velocity (the flow-matching loss): None on a CFG base (SD3: the
        conditional branch alone), the sampling guidance on a guidance-distilled one (FLUX.1-dev: its one forward)."""
        return guidance if self.embedded_guidance else None

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampling grid, 1 -> 0.  [T+1]"""
        return self.schedule(steps) if self.schedule is not None else shifted_sigmas(steps, self.shift)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device


def sd3_velocity(transformer, x, sigma, cond: Condition, guidance: float | None) -> torch.Tensor:
    """SD3's velocity (the transformer's `timestep` is 1000 * sigma). CFG with guidance g:
    v = v_uncond + g (v_cond - v_uncond), negative prompt "", uncond and cond rows in one call; guidance None:
    the conditional velocity alone, one forward (the flow-matching loss).
    x: [B,C,H,W], sigma: [B] -> float32 [B,C,H,W]"""
    n, dtype = x.shape[0], base_weight(transformer).dtype
    embeds, pooled = cond.embeds, cond.pooled
    if guidance is not None:                                                    # rows: uncond then cond
        x, sigma = torch.cat([x, x]), sigma.repeat(2)
        embeds = torch.cat([cond.neg_embeds.expand(n, -1, -1), embeds])
        pooled = torch.cat([cond.neg_pooled.expand(n, -1), pooled])
    with autocast(transformer):
        v = transformer(hidden_states=x.to(dtype), timestep=(1000 * sigma).to(dtype),
                        encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
                        return_dict=False)[0].float()
    if guidance is None:
        return v
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)                            # CFG


def flux_velocity(transformer, x, sigma, cond: Condition, guidance: float | None) -> torch.Tensor:
    """FLUX.1's velocity (the transformer's `timestep` is sigma): latents packed into 2x2 patches, position ids as
    FluxPipeline builds them, one forward; a guidance-distilled transformer (FLUX.1-dev) gets `guidance` through
    its guidance embedding (no CFG pair, cond's negative rows unused) and needs a value; without a guidance
    embedding (FLUX.1-schnell) guidance is ignored.
    x: [B,C,h,w], sigma: [B] -> float32 [B,C,h,w]"""
    n, _, h, w = x.shape
    dtype, device = base_weight(transformer).dtype, x.device
    embed_guidance = None
    if transformer.config.guidance_embeds:
        if guidance is None:
            raise ValueError("a guidance-distilled FLUX base (FLUX.1-dev) needs a guidance scale (Flow-GRPO: 3.5)")
        embed_guidance = torch.full([n], float(guidance), device=device)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)  # [h/2*w/2, 3]
    txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=dtype)                          # [L, 3]
    with autocast(transformer):
        v = transformer(hidden_states=pack(x).to(dtype), timestep=sigma.to(dtype),
                        guidance=None if embed_guidance is None else embed_guidance.to(dtype),
                        pooled_projections=cond.pooled.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                        txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0].float()
    return unpack(v, h, w)


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch tokens.  [B,C,h,w] -> [B, h/2 * w/2, 4C], channel-major within a token"""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack.  [B, h/2 * w/2, 4C] -> [B,C,h,w]"""
    n, _, c4 = tokens.shape
    return tokens.reshape(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def flux_sigmas(steps: int, scheduler_config, image_seq_len: int) -> torch.Tensor:
    """FluxPipeline's sigmas: the folder's scheduler (use_dynamic_shifting) at sigmas linspace(1, 1/T, T) and
    mu = base_shift + (max_shift - base_shift) (n - base_seq_len) / (max_seq_len - base_seq_len), n the packed
    image sequence length; ending in 0.  [T+1]"""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    c = scheduler.config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)   # calculate_shift
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.float().cpu()


def blocks(transformer) -> list[torch.nn.Module]:
    """The transformer's blocks: SD3's joint blocks; FLUX's double-stream then single-stream blocks."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def flux_base(transformer, encode_prompts, decode, size: int, scheduler_config: dict, name: str) -> Base:
    """A FLUX transformer as a Base: unpacked latents (in_channels / 4, size, size), flux_velocity, the scheduler
    config's dynamic-shift sigmas over the size/2 x size/2 packed image tokens, the guidance embedding if it has one.
    It also turns cuDNN's attention off for the process (PyTorch's other fused kernels, flash first, take over):
    in FLUX.1-dev's training backward on an H200 (torch 2.11, cuDNN 9.19) cuDNN's SDPA backward failed
    (`mha_graph.execute(...).is_good()`; a CUDA illegal memory access without CUDA_LAUNCH_BLOCKING), eager and
    compiled alike; without it both run (results/models_h200/README.md)."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    return Base(transformer, encode_prompts, decode, (transformer.config.in_channels // 4, size, size),
                scheduler_config["shift"], name, family_velocity=flux_velocity,
                schedule=lambda steps: flux_sigmas(steps, scheduler_config, (size // 2) ** 2),
                embedded_guidance=bool(transformer.config.guidance_embeds))


def base_weight(transformer) -> torch.Tensor:
    """The patch embedding's weight (SD3's pos_embed.proj, FLUX's x_embedder): its dtype and device are the base's.
    (diffusers' `transformer.dtype` and `.device` walk every submodule on each call, tens of ms per forward with
    LoRA adapters attached.)"""
    if hasattr(transformer, "x_embedder"):
        return transformer.x_embedder.weight
    return transformer.pos_embed.proj.weight


def autocast(transformer):
    """bf16 autocast when the base runs in bf16, so fp32 LoRA weights meet bf16 activations without fp32 copies
    of every LoRA input (train.add_student turns peft's input casting off); for an fp32 base no context at all
    (a disabled torch.autocast would switch off a caller's autocast, e.g. the toy build's bf16 pre-training)."""
    weight = base_weight(transformer)
    if weight.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(weight.device.type, dtype=weight.dtype)


def too_long(pipe, prompt: str, max_sequence_length: int) -> bool:
    """Whether a text encoder of the pipeline would truncate `prompt`."""
    def count(tokenizer, limit: int) -> int:                        # capped at limit + 1: no tokenizer warning
        return len(tokenizer(prompt, truncation=True, max_length=limit + 1).input_ids)
    clip_limit = pipe.tokenizer.model_max_length
    if count(pipe.tokenizer, clip_limit) > clip_limit:
        return True
    return pipe.tokenizer_3 is not None and count(pipe.tokenizer_3, max_sequence_length) > max_sequence_length


def load_base(path: str, device, dtype=torch.float32, resolution: int = 512, max_sequence_length: int = 128) -> Base:
    """A diffusers SD3 or FLUX folder (`path`, by model_index.json's `_class_name`), or the toy world when `path` is empty."""
    if not path:
        return load_toy(device, dtype)
    if folder_family(path) == "FLUX":
        return load_flux(path, device, dtype, resolution, max_sequence_length)
    return load_sd3(path, device, dtype, resolution, max_sequence_length)


def load_toy(device, dtype=torch.float32, folder: Path = toy_model.TOY_DIR, verify: bool = True) -> Base:
    """The shipped toy base (toy/base.safetensors, checksums verified against toy/SHA256SUMS)."""
    return toy_base(*toy_model.load(device, dtype, folder, verify))


def toy_base(transformer, text_encoder, name: str) -> Base:
    """Wrap toy modules as a Base (a fresh prompt cache: make a new one after the encoder changes)."""
    device = next(transformer.parameters()).device

    def encode_prompts(prompts):
        return text_encoder(toy_model.tokenize(prompts).to(device))

    size = toy_model.IMAGE_SIZE
    return Base(transformer, encode_prompts, toy_model.decode, (3, size, size), toy_model.SHIFT, name)


def load_flux(path: str, device, dtype, resolution: int, max_sequence_length: int) -> Base:
    """A diffusers FluxPipeline folder as a Base (flux_velocity, FLUX's sigmas, unpacked [C, h, w] latents; see
    the module docstring); text encoders stay on `device` for encoding."""
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = FluxPipeline.from_pretrained(path, dtype=dtype).to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution % (2 * vae_scale):
        raise ValueError(f"--resolution {resolution} must be a multiple of {2 * vae_scale} for FLUX (VAE x 2x2 packing)")

    def encode_prompts(prompts):
        levels = [(log, log.get_verbosity()) for log in (diffusers_logging, transformers_logging)]
        for log, _ in levels:
            log.set_verbosity_error()
        try:
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=max_sequence_length)
        finally:
            for log, level in levels:
                log.set_verbosity(level)
        return embeds, pooled                                       # T5 [B,L,D], CLIP pooled [B,P]

    def decode(latents):                                            # [B,C,h,w], unpacked
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        with torch.no_grad():
            images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    return flux_base(pipe.transformer, encode_prompts, decode, resolution // vae_scale, dict(pipe.scheduler.config),
                     str(Path(path).resolve()))


def load_sd3(path: str, device, dtype, resolution: int, max_sequence_length: int) -> Base:
    """A diffusers SD3 folder (model_index.json) as a Base; text encoders stay on `device` for encoding."""
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {path}: not a diffusers SD3 folder (no model_index.json)")
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype).to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution % (vae_scale * pipe.transformer.config.patch_size):
        raise ValueError(f"--resolution {resolution} must be a multiple of {vae_scale * pipe.transformer.config.patch_size}")

    warned = []

    def encode_prompts(prompts):
        long = [p for p in prompts if too_long(pipe, p, max_sequence_length)]
        if long and not warned:                                     # one warning a run, not diffusers' one per call
            warned.append(long[0])
            print(f"warning: prompts longer than CLIP's {pipe.tokenizer.model_max_length} or T5's {max_sequence_length} "
                  f"tokens are truncated (first: {long[0][:60]!r}...)", file=sys.stderr, flush=True)
        levels = [(log, log.get_verbosity()) for log in (diffusers_logging, transformers_logging)]
        for log, _ in levels:
            log.set_verbosity_error()
        try:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=max_sequence_length)
        finally:
            for log, level in levels:
                log.set_verbosity(level)
        return embeds, pooled

    def decode(latents):
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        with torch.no_grad():
            images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    size = resolution // vae_scale
    return Base(pipe.transformer, encode_prompts, decode, (pipe.transformer.config.in_channels, size, size),
                pipe.scheduler.config.shift, str(Path(path).resolve()))
