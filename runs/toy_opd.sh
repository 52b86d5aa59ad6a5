#!/usr/bin/env bash
# The toy world end to end: distil the shipped OCR and GenEval teachers into one student, then evaluate
# base, student and teachers on the held-out prompts. One H100: ~64 s + ~75 s; 2-core CPU: ~4 min + long eval.
set -euo pipefail
cd "$(dirname "$0")/.."
torchrun --standalone --nproc_per_node=1 train.py --teachers toy/ocr.safetensors,toy/geneval.safetensors --out out/toy_opd "$@"
python evaluate.py --lora opd=out/toy_opd/lora.safetensors,teacher_ocr=toy/ocr.safetensors,teacher_geneval=toy/geneval.safetensors,teacher_quality=toy/quality.safetensors --out out/toy_opd/eval
