"""Benchmark: OCR reward throughput (images/s) on 512 px rendered-text images, CPU.

Times `make_reward("ocr")` (batched: detection per image, recognition of all crops of the batch in one
call) and, as the reference, the engine's own per-image `engine.ocr(image)`. Also prints the mean OCR
score, which should be ~1 on these clean renders (a throughput figure on wrong reads means nothing).

Run: python bench_rewards.py [--images 64] [--batch 16]
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import rewards

WORDS = ["hello world", "flow matching", "OPEN SESAME", "Cafe 2024", "distill", "teacher", "PIZZA",
         "quick fox", "banana", "sunset", "on policy", "KL 0.04"]


def render(text: str, font_size: int, size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - right + left) // 2, (size - bottom + top) // 2), text, fill="black", font=font)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    texts = [WORDS[i % len(WORDS)] for i in range(args.images)]
    images = [render(text, 40 + 4 * (i % 8)) for i, text in enumerate(texts)]
    prompts = [f'a poster that says "{text}"' for text in texts]
    reward = rewards.make_reward("ocr")
    engine = rewards.load_ocr_engine()
    reward(images[:4], prompts[:4])  # warm-up
    start = time.perf_counter()
    scores = torch.cat([reward(images[i:i + args.batch], prompts[i:i + args.batch])
                        for i in range(0, len(images), args.batch)])
    reward_rate = len(images) / (time.perf_counter() - start)
    bgr = [np.asarray(image)[:, :, ::-1].copy() for image in images]
    start = time.perf_counter()
    for array in bgr:
        engine.ocr(array)
    engine_rate = len(images) / (time.perf_counter() - start)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"cpu cores: {os.cpu_count()}, images: {args.images} x 512 px, batch {args.batch}")
    print(f"ocr reward (batched recognition): {reward_rate:.1f} images/s, mean score {scores.mean():.3f}")
    print(f"engine.ocr per image (reference): {engine_rate:.1f} images/s")


if __name__ == "__main__":
    main()
