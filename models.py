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
A second family (FLUX.1, issue 19) plugs in by providing these: its own loader and velocity (its packed
latents, position ids and guidance embedding), encoder, decoder, latent shape and sigmas.
The transformer is frozen and in eval mode; LoRA adapters are added on top (teachers.py, train.py).

Demo: python -c "import models; b = models.load_base('path/to/sd3.5-medium', 'cuda'); print(b.latent_shape)"
"""
import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
import sys
from typing import Callable

import torch

from sde_sampler import Condition, shifted_sigmas
import toy_model


@dataclass
class Base:
    transformer: torch.nn.Module                                   # SD3Transformer2DModel, frozen
    encode_prompts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # -> embeds [B,L,D], pooled [B,P]
    decode: Callable[[torch.Tensor], torch.Tensor]                 # latents [B,C,h,w] -> images [B,3,H,W] in [0,1]
    latent_shape: tuple[int, int, int]                             # (C, h, w)
    shift: float                                                   # scheduler time shift (3.0 for SD3.5-M)
    name: str                                                      # identifies the base in run records
    cache_size: int = 1024                                         # prompts kept (SD3.5-M: 1.7 MB each in bf16)
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
        """The velocity at (x, sigma), guidance included (sd3_velocity).  x: [B,C,H,W], sigma: [B] -> float32 [B,C,H,W]"""
        return sd3_velocity(self.transformer, x, sigma, cond, guidance)

    def sigmas(self, steps: int) -> torch.Tensor:
        return shifted_sigmas(steps, self.shift)

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


def base_weight(transformer) -> torch.Tensor:
    """The patch embedding's weight: its dtype and device are the base's.  (diffusers' `transformer.dtype` and
    `.device` walk every submodule on each call, tens of ms per forward with LoRA adapters attached.)"""
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
    """An SD3 folder (`path`), or the toy world when `path` is empty."""
    if not path:
        return load_toy(device, dtype)
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
