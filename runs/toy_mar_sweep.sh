#!/usr/bin/env bash
# Choosing MAR's beta for the toy table (issue 18) on TRAIN prompts: Flow-OPD students (merge init, the table's
# recipe) with beta in BETAS against the quality anchor, trained side by side on one GPU for ITERS iterations (or
# until LIMIT: SIGTERM, the run checkpoints and exports), then scored with the ODE sampler on the first 128 train
# prompts of every task (quality included). The table's run at beta 0.04 showed quality +0.006 +- 0.005 over no MAR.
# Teachers in TEACHERS: toy (the shipped toy/<task>.safetensors) or a teachers stage of runs/toy_paper_table.sh
# (<folder>/<task>/lora.safetensors).
# Usage: TEACHERS=out/toy_table/teacher OUT=out/mar_sweep LIMIT=300 bash runs/toy_mar_sweep.sh
#        knobs: TEACHERS OUT LIMIT ITERS BETAS SEED SMOKE EVAL_FLAGS
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHERS=${TEACHERS:-out/toy_table/teacher}
OUT=${OUT:-out/mar_sweep}
LIMIT=${LIMIT:-300}
ITERS=${ITERS:-62}               # the table's students ran 62 iterations
BETAS=${BETAS:-0 0.04 0.2 1}
SEED=${SEED:-0}
SMOKE=${SMOKE:-}                 # extra train.py flags for every run (a CPU smoke test)
EVAL_FLAGS=${EVAL_FLAGS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
lora() { if [[ -f $TEACHERS/$1.safetensors ]]; then echo "$TEACHERS/$1.safetensors"
         else echo "$TEACHERS/$1/lora.safetensors"; fi; }
teachers="geneval=$(lora geneval),ocr=$(lora ocr)"
python merge_lora.py "$(lora geneval)" "$(lora ocr)" --method ab-mean \
    --out "$OUT/merge_init.safetensors"
pids=()
for beta in $BETAS; do
    timeout --preserve-status -s TERM "$LIMIT" python train.py --overwrite --seed "$SEED" --teachers "$teachers" \
        --images_per_iteration 128 --micro_batch 64 --eval_every 0 --init_lora "$OUT/merge_init.safetensors" \
        --anchor "$(lora quality)" --beta "$beta" --iterations "$ITERS" $SMOKE \
        --out "$OUT/beta$beta" >"$OUT/beta$beta.log" 2>&1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "a run failed: see $OUT/*.log" >&2; exit 1; }; done
# row names without dots (adapter names): beta0p04
loras=$(for beta in $BETAS; do printf 'beta%s=%s,' "${beta//./p}" "$OUT/beta$beta/lora.safetensors"; done)
python evaluate.py --lora "${loras%,}" --max_prompts 128 --out "$OUT/eval_train_prompts" $EVAL_FLAGS \
    --prompts geneval=toy/geneval_train.jsonl,ocr=toy/ocr_train.txt,quality=toy/quality_train.txt
