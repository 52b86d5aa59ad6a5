"""The toy base model: a small SD3 transformer in pixel space and a small text encoder (docs/toy_world.md).

Same classes and interface as a real base (models.Base, which models.load_toy builds from this file):
diffusers' SD3Transformer2DModel over 32x32 RGB "latents" x = 2 * image - 1 (decode is the identity map back
to [0, 1]), conditioned on a tiny transformer text encoder over the closed vocabulary of the toy prompts
(toy_tasks.py; a quoted string is read one character a token). Pre-trained with the flow-matching loss
(sft.py) on rendered ground truth, and stopped early on purpose: the base must be mediocre at every task,
leaving room to improve (`python toyworld.py build`). The weights ship in toy/base.safetensors, checked
against toy/SHA256SUMS on load. Conventions as sde_sampler.py: sigma runs 1 -> 0 (dt < 0), shift 3.0.

Demo: python -c "import toy_model; print(toy_model.tokenize(['a photo of a red square']))"
"""
import functools
from pathlib import Path
import re
import sys

import torch

from checkpoint import file_sha256
from toy_tasks import ALPHABET, IMAGE_SIZE, TOY_DIR, prompt_split

MAX_TOKENS = 16
SHIFT = 3.0                                                      # SD3.5-M's scheduler shift, kept for the toy
TRANSFORMER_CONFIG = dict(sample_size=IMAGE_SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
                          attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                          caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=IMAGE_SIZE // 2,
                          qk_norm="rms_norm")
TEXT_WIDTH = 64
# Training recipe for the toy world: applied by train.py when no --base is given, for flags not set.
# Tiny images are launch-bound on a GPU, so few large calls: target_batch=144 rolls out all 16 images in one call
# per step and labels the 16 x 9 states in one call per adapter; train_batch=72 trains an optimizer update's 8 x 9
# rows in one forward+backward (15 forwards + 2 backwards per iteration instead of 44 + 18).
# eval_every=20, eval_max_prompts=32: held-out reward (32 test prompts per task) at the start and the end.
TRAIN_DEFAULTS = dict(images_per_iteration=16, group_size=2, micro_batch=8, target_batch=144, train_batch=72,
                      updates=2, iterations=20, rank=16, alpha=32.0, lr=1e-3, resolution=IMAGE_SIZE, save_every=10,
                      eval_every=20, eval_max_prompts=32)


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Special tokens, every word of every toy prompt, and the OCR alphabet (lower case)."""
    words = {w for task in ("geneval", "ocr") for split in ("train", "test") for p in prompt_split(task, split)
             for w in _words(p)}
    return ("<pad>", "<bos>", "<unk>") + tuple(sorted(words | set(ALPHABET.lower()) | {'"'}))


def _words(prompt: str) -> list[str]:
    """'a sign that says "K7"' -> ['a', 'sign', 'that', 'says', '"', 'k', '7', '"']"""
    tokens = []
    for part, quoted in _split_quotes(prompt.lower()):
        tokens += ['"', *part, '"'] if quoted else [part]
    return tokens


def _split_quotes(prompt: str) -> list[tuple[str, bool]]:
    return [(m.group(1), True) if m.group(1) is not None else (m.group(2), False)
            for m in re.finditer(r'"([^"]*)"|([^\s"]+)', prompt)]


_warned_long = False


def tokenize(prompts: list[str]) -> torch.Tensor:
    """[B] prompts -> token ids [B, MAX_TOKENS]: <bos>, words (unknown ones <unk>), <pad>; long prompts truncated."""
    return torch.tensor([_token_ids(p) for p in prompts], dtype=torch.long).view(len(prompts), MAX_TOKENS)


@functools.lru_cache(maxsize=65536)
def _token_ids(prompt: str) -> tuple[int, ...]:
    global _warned_long
    index = _vocabulary_index()
    tokens = [1] + [index.get(w, 2) for w in _words(prompt)]
    if len(tokens) > MAX_TOKENS and not _warned_long:
        print(f"warning: toy prompt longer than {MAX_TOKENS} tokens is truncated: {prompt!r}", file=sys.stderr)
        _warned_long = True
    return tuple(tokens[:MAX_TOKENS] + [0] * (MAX_TOKENS - len(tokens)))


@functools.cache
def _vocabulary_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(vocabulary())}


class TextEncoder(torch.nn.Module):
    """Token ids [B, L] -> (embeds [B, L, joint_attention_dim], pooled [B, pooled_projection_dim])."""

    def __init__(self, vocab_size: int, width: int = TEXT_WIDTH):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.position = torch.nn.Parameter(torch.randn(MAX_TOKENS, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.to_embeds = torch.nn.Linear(width, TRANSFORMER_CONFIG["joint_attention_dim"])
        self.to_pooled = torch.nn.Linear(width, TRANSFORMER_CONFIG["pooled_projection_dim"])

    def forward(self, ids):
        pad = ids == 0                                                           # [B, L]
        h = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1)                                 # mean over real tokens (<bos> always)
        return self.to_embeds(h), self.to_pooled(pooled)


def new_base_modules(seed: int = 0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG), TextEncoder(len(vocabulary()))


def to_latent(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1                                                        # [0, 1] -> [-1, 1]


def decode(latents: torch.Tensor) -> torch.Tensor:
    return ((latents.float() + 1) / 2).clamp(0, 1)                                # identity decode


def load(device, dtype=torch.float32, folder: Path = TOY_DIR, verify: bool = True):
    """The shipped toy base (checksums verified against SHA256SUMS).  -> transformer, text encoder, name"""
    path = Path(folder) / "base.safetensors"
    if verify:
        verify_assets(folder, [path.name])
    from safetensors.torch import load_file
    state = load_file(path)
    transformer, text_encoder = new_base_modules()
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    text_encoder.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    transformer.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    torch.nn.Module.to(transformer, device, dtype)        # not diffusers' .to: it warns of fp32 modules it has none of
    return transformer, text_encoder.to(device), f"toy:{file_sha256(path)[:16]}"


def verify_assets(folder: Path, names: list[str]) -> None:
    """Check shipped files against SHA256SUMS; a clear error names a missing or corrupted one."""
    sums = dict(line.split()[::-1] for line in (Path(folder) / "SHA256SUMS").read_text().splitlines() if line.strip()) \
        if (Path(folder) / "SHA256SUMS").is_file() else {}
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(f"toy asset missing: {path} (rebuild with `python toyworld.py build`)")
        if name in sums and file_sha256(path) != sums[name]:
            raise ValueError(f"toy asset corrupted: {path} does not match toy/SHA256SUMS "
                             "(restore it with `git checkout toy/` or rebuild with `python toyworld.py build`)")
