#!/usr/bin/env bash
# The paper's table in the toy world (issue 7), from the shipped base: stage-1 Flow-GRPO teachers, the
# GRPO-Mix baseline, Flow-OPD (merge init + MAR against the quality teacher; without MAR; from a fresh LoRA;
# from an SFT init), all evaluated on the held-out prompts in one table (+ grid) in $OUT/eval.
# Independent runs go side by side on the one GPU (the toy model is launch-bound). Two stages, each under
# 10 minutes on one H100: STAGE=teachers (3 teachers + GRPO-Mix), STAGE=students (merge, OPD rows, eval);
# STAGE=all (default) runs both. GRPO-Mix and every Flow-OPD row train on the same number of student images
# (STUDENT_ITERS x 128); the SFT row's cold start adds SFT_ITERS x 128 teacher samples before it.
# Usage: bash runs/toy_paper_table.sh      knobs: OUT STAGE LIMIT TEACHER_ITERS STUDENT_ITERS SFT_ITERS SMOKE EVAL_FLAGS
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy_table}
STAGE=${STAGE:-all}
TEACHER_ITERS=${TEACHER_ITERS:-300}
STUDENT_ITERS=${STUDENT_ITERS:-150}
SFT_ITERS=${SFT_ITERS:-10}
LIMIT=${LIMIT:-0}                # seconds after which a run gets SIGTERM (it checkpoints, exports its LoRA, exits 0); 0 = none
SMOKE=${SMOKE:-}                 # extra train.py flags for every run, e.g. a tiny batch for a CPU smoke test
EVAL_FLAGS=${EVAL_FLAGS:-}       # extra evaluate.py flags, e.g. --max_prompts 4 --steps 4
BATCH="--images_per_iteration 128 --micro_batch 64 --eval_every 0"    # evaluate.py scores every row at the end
# chosen by runs/toy_grpo_sweep.sh on train prompts: clip 1e-4, beta 0.04; lr 1e-3 (quality, the MAR anchor: 3e-4)
GRPO="--algo grpo $BATCH --group_size 16 --lr 1e-3 --clip_range 1e-4 --beta 0.04"
T=$OUT/teacher
mkdir -p "$OUT" "$T"
# one training run in the background, its output in $OUT/<name>.log; `wait_all` fails if any run failed
train() { name=$1; shift; timeout --preserve-status -s TERM "$LIMIT" python train.py --overwrite "$@" $SMOKE --out "$OUT/$name" >"$OUT/$name.log" 2>&1 & pids+=($!); }
wait_all() { for pid in "${pids[@]}"; do wait "$pid" || { echo "a run failed: see $OUT/*.log" >&2; exit 1; }; done; pids=(); }
pids=()
SECONDS=0

if [[ $STAGE == all || $STAGE == teachers ]]; then
    # stage 1: one teacher per task, single-reward Flow-GRPO from the base
    for task in geneval ocr; do
        train teacher/$task $GRPO --reward toy_$task --iterations "$TEACHER_ITERS"
    done
    train teacher/quality $GRPO --reward toy_quality --lr 3e-4 --iterations "$TEACHER_ITERS"
    # baseline: GRPO-Mix, each prompt scored by its own task's reward, plus quality at 0.2 (the paper's DeQA)
    train grpo_mix $GRPO --task_rewards geneval=toy_geneval,ocr=toy_ocr --reward toy_quality=0.2 \
        --iterations "$STUDENT_ITERS"
    wait_all
    echo "stage teachers: ${SECONDS} s"
fi

if [[ $STAGE == all || $STAGE == students ]]; then
    teachers="geneval=$T/geneval/lora.safetensors,ocr=$T/ocr/lora.safetensors"
    anchor="$T/quality/lora.safetensors"
    python merge_lora.py "$T/geneval/lora.safetensors" "$T/ocr/lora.safetensors" --method ab-mean \
        --out "$OUT/merge_init.safetensors"
    opd="--teachers $teachers $BATCH --iterations $STUDENT_ITERS"
    train opd_merge_mar $opd --init_lora "$OUT/merge_init.safetensors" --anchor "$anchor"
    train opd_merge_no_mar $opd --init_lora "$OUT/merge_init.safetensors" --beta 0
    train opd_fresh_mar $opd --anchor "$anchor"
    (python train.py --overwrite --algo sft --teachers "$teachers" $BATCH --iterations "$SFT_ITERS" $SMOKE \
         --out "$OUT/sft_init" >"$OUT/sft_init.log" 2>&1 &&
     python train.py --overwrite $opd --init_lora "$OUT/sft_init/lora.safetensors" --anchor "$anchor" $SMOKE \
         --out "$OUT/opd_sft_mar" >"$OUT/opd_sft_mar.log" 2>&1) & pids+=($!)
    wait_all
    echo "stage students (training): ${SECONDS} s"

    rows="teacher_geneval=$T/geneval/lora.safetensors,teacher_ocr=$T/ocr/lora.safetensors"
    rows="$rows,teacher_quality=$anchor,grpo_mix=$OUT/grpo_mix/lora.safetensors"
    for run in opd_merge_mar opd_merge_no_mar opd_fresh_mar opd_sft_mar; do rows="$rows,$run=$OUT/$run/lora.safetensors"; done
    python evaluate.py --lora "$rows" --out "$OUT/eval" $EVAL_FLAGS
    echo "stage students (with eval): ${SECONDS} s"
fi
