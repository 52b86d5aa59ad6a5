"""Shared fixtures: a tiny SD3 pipeline folder built offline from configs, and LoRA files for it."""
import json
import os
from pathlib import Path
import signal

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "sign", "that", "says", "hello", "two", "the", "on", "left"]


def tiny_vae(shift_factor: float, scaling_factor: float):
    """A two-level AutoencoderKL with 4 latent channels (its own random weights: build it after seeding)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, sample_size=16, shift_factor=shift_factor, scaling_factor=scaling_factor)


def tiny_text_parts(clip_hidden: int, clip_layers: int):
    """CLIP and T5 configs over WORDS, and their tokenizers built offline.  -> (clip config, t5 config, clip
    tokenizer, t5 tokenizer)"""
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer
    clip = CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=clip_hidden, intermediate_size=16,
                          num_hidden_layers=clip_layers, num_attention_heads=2, projection_dim=16,
                          max_position_embeddings=77, bos_token_id=len(WORDS) + 1, eos_token_id=len(WORDS) + 2,
                          pad_token_id=len(WORDS) + 2)
    t5 = T5Config(vocab_size=len(WORDS) + 4, d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=8)
    vocab = {w + "</w>": i for i, w in enumerate(WORDS)} | {"<unk>": len(WORDS), "<|startoftext|>": len(WORDS) + 1,
                                                            "<|endoftext|>": len(WORDS) + 2}
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5_tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS],
                               model_max_length=512)
    return clip, t5, clip_tokenizer, t5_tokenizer


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with every component a few thousand parameters, from configs alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
    clip, t5, clip_tokenizer, t5_tokenizer = tiny_text_parts(clip_hidden=8, clip_layers=2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=CLIPTextModelWithProjection(clip).eval(), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip).eval(), tokenizer_2=clip_tokenizer,
        text_encoder_3=T5EncoderModel(t5).eval(), tokenizer_3=t5_tokenizer)
    return pipe


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out")


def random_lora(transformer, seed: int, rank: int = 4, alpha: float = 8.0, std: float = 0.3, targets=TARGETS):
    """A LoRA record on the linear layers of `transformer` whose names end with `targets` (default: the SD3 attention
    projections), with nonzero A and B."""
    from merge_lora import LoRA
    generator = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(targets)):
            A[name] = torch.randn(rank, module.in_features, generator=generator) * std
            B[name] = torch.randn(module.out_features, rank, generator=generator) * std
    return LoRA(A, B, alpha)


def write_peft(lora, folder: Path, with_config: bool = True) -> Path:
    """The published Flow-GRPO layout: adapter_model.safetensors (peft keys) + adapter_config.json."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module in lora.A:
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora.A[module].contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora.B[module].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    if with_config:
        config = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.A)}
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def sd3_transformer(sd3_folder):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel.from_pretrained(sd3_folder, subfolder="transformer").eval()


@pytest.fixture(scope="session")
def teacher_files(sd3_folder, sd3_transformer, tmp_path_factory) -> dict:
    """Three teacher LoRAs for the tiny SD3: ocr and geneval in peft folders, pick in diffusers format."""
    from merge_lora import save_lora
    folder = tmp_path_factory.mktemp("teachers")
    files = {"ocr": write_peft(random_lora(sd3_transformer, 1), folder / "ocr"),
             "geneval": write_peft(random_lora(sd3_transformer, 2), folder / "geneval"),
             "pick": folder / "pick.safetensors"}
    save_lora(random_lora(sd3_transformer, 3, rank=2, alpha=4.0), files["pick"])
    return files


def in_world_of_one(main, args: list, threads: int | None = None, env: dict | None = None) -> None:
    """main(args) (train.main, evaluate.main) in this process, as a fresh world of one (no interpreter start-up), with
    `env` set; the distributed variables, `env`'s and the SIGTERM/SIGINT handlers (train.main installs its own) put
    back afterwards. threads: torch's thread count meanwhile (1: the arithmetic of a subprocess under
    OMP_NUM_THREADS=1)."""
    env = env or {}
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *env)
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads_before = torch.get_num_threads()
    os.environ.update(env)
    try:
        if threads:
            torch.set_num_threads(threads)
        main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads_before)
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(saved)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def train_error(args: list) -> str:
    """train.main(args) in this process (no interpreter start-up), which must fail; -> its error message.
    The CLI prints that message as one line `train.py: error: ...` and exits 2 (tested through a subprocess)."""
    import train
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        in_world_of_one(train.main, args)
    return str(error.value)
