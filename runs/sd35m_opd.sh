#!/usr/bin/env bash
# The paper's recipe on SD3.5-Medium (docs/method.md section 10), 8 GPUs of one node: merge-init cold start, then Flow-OPD
# with MAR against the base. Needs local copies of SD3.5-M, the Flow-GRPO LoRAs and Flow-GRPO's prompt files.
# --micro_batch 16 --compile: the fastest configuration measured under 70 GB (README, Speed). --ema: the authors'
# EMA of the LoRA, evaluated and exported as lora.safetensors (ema.py). Add in-loop evaluation with e.g.
# --eval_every 20 --eval_prompts ocr=$DATA/ocr/test.txt --eval_rewards ocr=ocr (docs/long_runs.md).
# Usage: SD35M=/models/sd3.5-medium LORAS=/models/loras DATA=/data/flow_grpo/dataset bash runs/sd35m_opd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python merge_lora.py "$LORAS/ocr" "$LORAS/geneval" --method ab-mean --weights 0.5,0.5 --out out/merge_init.safetensors
torchrun --standalone --nproc_per_node=8 train.py --base "$SD35M" \
    --teachers ocr="$LORAS/ocr",geneval="$LORAS/geneval" \
    --prompts ocr="$DATA/ocr/train.txt",geneval="$DATA/geneval/train_metadata.jsonl" --task_weights ocr=1,geneval=3 \
    --init_lora out/merge_init.safetensors --micro_batch 16 --compile --ema --out out/opd_sd35m "$@"
