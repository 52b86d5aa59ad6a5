#!/usr/bin/env bash
# The paper's table in the toy world (issue 7), from the shipped base: stage-1 Flow-GRPO teachers, the
# GRPO-Mix baseline, Flow-OPD (merge init + MAR against the quality teacher; without MAR; from a fresh LoRA;
# from an SFT init), all evaluated on the held-out prompts in one table (+ grid) in $OUT/eval.
# GRPO-Mix and every Flow-OPD row train on the same number of student images (STUDENT_ITERS x 16); the SFT
# row's cold start adds SFT_ITERS x 16 teacher samples before it.
# STATUS: written and smoke-tested on CPU at tiny sizes only; the default iteration counts are untuned
# guesses, not yet run at full size (needs ~20 GPU minutes).
# Usage: bash runs/toy_paper_table.sh            knobs: OUT TEACHER_ITERS STUDENT_ITERS SFT_ITERS SMOKE EVAL_FLAGS
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy_table}
TEACHER_ITERS=${TEACHER_ITERS:-100}
STUDENT_ITERS=${STUDENT_ITERS:-40}
SFT_ITERS=${SFT_ITERS:-10}
SMOKE=${SMOKE:-}                 # extra train.py flags for every run, e.g. a tiny batch for a CPU smoke test
EVAL_FLAGS=${EVAL_FLAGS:-}       # extra evaluate.py flags, e.g. --max_prompts 4 --steps 4
train() { torchrun --standalone --nproc_per_node=1 train.py --overwrite $SMOKE "$@"; }
T=$OUT/teacher

# stage 1: one teacher per task, single-reward Flow-GRPO from the base
for task in geneval ocr quality; do
    train --algo grpo --reward toy_$task --iterations "$TEACHER_ITERS" --out "$T/$task"
done
teachers="geneval=$T/geneval/lora.safetensors,ocr=$T/ocr/lora.safetensors"

# baseline: GRPO-Mix, each prompt scored by its own task's reward, plus quality at 0.2 (the paper's DeQA)
train --algo grpo --task_rewards geneval=toy_geneval,ocr=toy_ocr --reward toy_quality=0.2 \
    --iterations "$STUDENT_ITERS" --out "$OUT/grpo_mix"

# Flow-OPD rows
python merge_lora.py "$T/geneval/lora.safetensors" "$T/ocr/lora.safetensors" --method ab-mean \
    --out "$OUT/merge_init.safetensors"
train --teachers "$teachers" --init_lora "$OUT/merge_init.safetensors" --anchor "$T/quality/lora.safetensors" \
    --iterations "$STUDENT_ITERS" --out "$OUT/opd_merge_mar"
train --teachers "$teachers" --init_lora "$OUT/merge_init.safetensors" --beta 0 \
    --iterations "$STUDENT_ITERS" --out "$OUT/opd_merge_no_mar"
train --teachers "$teachers" --anchor "$T/quality/lora.safetensors" \
    --iterations "$STUDENT_ITERS" --out "$OUT/opd_fresh_mar"
train --algo sft --teachers "$teachers" --iterations "$SFT_ITERS" --out "$OUT/sft_init"
train --teachers "$teachers" --init_lora "$OUT/sft_init/lora.safetensors" --anchor "$T/quality/lora.safetensors" \
    --iterations "$STUDENT_ITERS" --out "$OUT/opd_sft_mar"

rows="teacher_geneval=$T/geneval/lora.safetensors,teacher_ocr=$T/ocr/lora.safetensors"
rows="$rows,teacher_quality=$T/quality/lora.safetensors,grpo_mix=$OUT/grpo_mix/lora.safetensors"
for run in opd_merge_mar opd_merge_no_mar opd_fresh_mar opd_sft_mar; do rows="$rows,$run=$OUT/$run/lora.safetensors"; done
python evaluate.py --lora "$rows" --out "$OUT/eval" $EVAL_FLAGS
