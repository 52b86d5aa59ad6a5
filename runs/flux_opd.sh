#!/usr/bin/env bash
# Flow-OPD on FLUX.1-dev (issue 19), 8 GPUs of one node, following runs/sd35m_opd.sh: merge-init cold start from two
# FLUX teacher LoRAs, then Flow-OPD with MAR against the base (or against the LoRA named by ANCHOR).
# Needs a local diffusers FluxPipeline folder of FLUX.1-dev (train.py loads it through models.load_flux), two teacher
# LoRAs trained on it, and Flow-GRPO's prompt files.
# FLUX specifics: the LoRA targets and the guidance defaults for a FLUX base come from models.py (the FLUX seam);
# --guidance 3.5 restates Flow-GRPO's FLUX value (config/grpo.py: sample.guidance_scale 3.5, one forward through
# the guidance embedding, no CFG pair). T5 prompt length: train.py's --max_sequence_length 128, as Flow-GRPO's FLUX
# training (scripts/train_flux.py). The student starts from the merged teachers (--init_lora), so it adapts the
# teachers' modules. 512 px as Flow-GRPO's FLUX configs; the SDE keeps train.py's 10 steps (Flow-GRPO's FLUX: 6).
# Micro-batch 8, compiled: 73.4 GB peak and 59.5 % MFU on one H200 (bench.py --model flux-dev, random weights,
# results/models_h200/; eager: 84.3 GB); on 80 GB GPUs measure first, or add --grad_checkpointing:
#   python bench.py --model flux-dev --configs "compiled b8" --skip_precision --out out/bench_flux
# Usage: FLUX=/models/FLUX.1-dev LORAS=/models/flux_loras DATA=/data/flow_grpo/dataset [ANCHOR=anchor.safetensors] \
#        bash runs/flux_opd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python merge_lora.py "$LORAS/ocr" "$LORAS/geneval" --method ab-mean --weights 0.5,0.5 --out out/merge_init_flux.safetensors
torchrun --standalone --nproc_per_node=8 train.py --base "$FLUX" \
    --teachers ocr="$LORAS/ocr",geneval="$LORAS/geneval" ${ANCHOR:+--anchor "$ANCHOR"} \
    --prompts ocr="$DATA/ocr/train.txt",geneval="$DATA/geneval/train_metadata.jsonl" --task_weights ocr=1,geneval=3 \
    --init_lora out/merge_init_flux.safetensors --resolution 512 --guidance 3.5 --micro_batch 8 --compile --ema \
    --out out/opd_flux "$@"
