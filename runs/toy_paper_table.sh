#!/usr/bin/env bash
# The paper's table in the toy world (issues 7 and 18), from the shipped base, with error bars: stage-1 Flow-GRPO
# teachers; then, for each of SEEDS, GRPO-Mix and Flow-OPD (merge init + MAR against the quality teacher; without
# MAR; from a fresh LoRA; from an SFT init) and Flow-OPD (merge + MAR) with k sampled trained steps (--sampled_steps,
# k in SAMPLED_STEPS) at the same number of student images as the dense row and at its wall-clock; all evaluated on
# the held-out prompts with EVAL_IMAGES images per prompt; `python toyworld.py table $OUT` prints mean +- standard
# error over seeds ($OUT/table.md). Independent runs go side by side on the one GPU (the toy model is launch-bound).
# Stages, one call each, each stopped at LIMIT seconds (runs still going get SIGTERM: they checkpoint, export their
# LoRA and exit 0, and the table's iterations column shows it):
#   STAGE=teachers   one Flow-GRPO teacher per task and per lr in GENEVAL_LRS / OCR_LRS / QUALITY_LRS, side by side,
#                    TEACHER_ITERS iterations each (or until LIMIT); where a task has several candidates, the one with
#                    the best ODE score on the first 128 TRAIN prompts of its task becomes $OUT/teacher/<task>
#                    ($OUT/eval_<task>_pick); TEACHERS_GO_ON=1 trains the same candidates on in a second call (more
#                    than one call's LIMIT). Ship them with `python toyworld.py teachers $OUT/teacher`.
#   STAGE=students   from the teachers in TEACHERS (toy/, the shipped ones, or $OUT/teacher; above): merge init;
#                    per seed: GRPO-Mix, the 4 Flow-OPD rows, SFT init, the k-step rows. Every row trains the same
#                    number of iterations (x 128 student images), as many as fit in LIMIT, at most STUDENT_ITERS:
#                    all rows first train CALIBRATE_ITERS iterations side by side; the slowest row's
#                    seconds per iteration there sets the number ($OUT/student_iterations), and all go on to it
#                    with --resume. (The SFT row's cold start adds SFT_ITERS x 128 teacher samples before it.)
#   STAGE=wallclock  each k-step row goes on (--resume, a copy) to the iterations that cost the dense row's time,
#                    at the seconds per iteration both measured side by side in the students stage
#   STAGE=eval       evaluate.py, one process per seed (+ one for base and teachers) side by side; the table
#   STAGE=all        (default) all four in order; or a list, e.g. STAGE="wallclock eval"
# Hyper-parameters were chosen by runs/toy_grpo_sweep.sh on train prompts, never on the held-out ones.
# Usage: STAGE=teachers LIMIT=500 bash runs/toy_paper_table.sh
#        knobs: OUT STAGE LIMIT SEEDS TEACHERS TEACHER_ITERS TEACHERS_GO_ON GENEVAL_LRS OCR_LRS QUALITY_LRS
#               STUDENT_ITERS CALIBRATE_ITERS SFT_ITERS SAMPLED_STEPS EVAL_IMAGES SMOKE EVAL_FLAGS
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy_table}
STAGE=${STAGE:-all}
LIMIT=${LIMIT:-0}                # seconds after which a stage's runs still going get SIGTERM; 0 = none
SEEDS=${SEEDS:-0 1 2}            # student seeds: every student row is trained once per seed
TEACHERS=${TEACHERS:-}          # the students' teachers: toy (shipped: toy/<task>.safetensors) or $OUT/teacher;
                                 # default: $OUT/teacher when this call trains them (STAGE all/teachers), else toy
TEACHER_ITERS=${TEACHER_ITERS:-2000}
TEACHERS_GO_ON=${TEACHERS_GO_ON:-}  # 1: the teachers stage goes on from its teachers' checkpoints (--resume)
GENEVAL_LRS=${GENEVAL_LRS:-1e-3 2e-3}  # teacher candidates per task, picked on train prompts (above); the quality
OCR_LRS=${OCR_LRS:-1e-3}               # pick of the H200 table of c1b1881: lr 1e-3 0.772 vs 3e-4 0.676
QUALITY_LRS=${QUALITY_LRS:-1e-3}
STUDENT_ITERS=${STUDENT_ITERS:-300}      # the most iterations a student row trains (fewer when LIMIT is short)
CALIBRATE_ITERS=${CALIBRATE_ITERS:-8}    # the first iterations, side by side, that time the rows
SFT_ITERS=${SFT_ITERS:-10}
SAMPLED_STEPS=${SAMPLED_STEPS:-1 2}   # k of the --sampled_steps rows; "" = no such rows
EVAL_IMAGES=${EVAL_IMAGES:-4}    # images per held-out prompt
SMOKE=${SMOKE:-}                 # extra train.py flags for every run, e.g. a tiny batch for a CPU smoke test
EVAL_FLAGS=${EVAL_FLAGS:-}       # extra evaluate.py flags, e.g. --max_prompts 4 --steps 4
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # many processes share the CPU: one thread each for the rewards
BATCH="--images_per_iteration 128 --micro_batch 64 --eval_every 0"    # evaluate.py scores every row at the end
# chosen by runs/toy_grpo_sweep.sh on train prompts: clip 1e-4, beta 0.04, lr 1e-3 (each teacher's lr is picked
# among its task's *_LRS by the teachers stage, on train prompts)
GRPO="--algo grpo $BATCH --group_size 16 --lr 1e-3 --clip_range 1e-4 --beta 0.04"
T=$OUT/teacher
if [[ -z $TEACHERS ]]; then
    if [[ " $STAGE " == *" all "* || " $STAGE " == *" teachers "* ]]; then TEACHERS=$T; else TEACHERS=toy; fi
fi
# a teacher's LoRA in TEACHERS: toy/<task>.safetensors (shipped) or <folder>/<task>/lora.safetensors (a teachers stage)
lora() { if [[ -f $TEACHERS/$1.safetensors ]]; then echo "$TEACHERS/$1.safetensors"
         else echo "$TEACHERS/$1/lora.safetensors"; fi; }
teachers="geneval=$(lora geneval),ocr=$(lora ocr)"
anchor=$(lora quality)
OPD="--teachers $teachers $BATCH --init_lora $OUT/merge_init.safetensors --anchor $anchor"   # Flow-OPD, merge + MAR
mkdir -p "$OUT" "$T"
pids=(); names=()
# seconds a run may still take: what is left of this stage's LIMIT (0: no limit)
left() { if (( LIMIT == 0 )); then echo 0; else echo $(( LIMIT - SECONDS > 1 ? LIMIT - SECONDS : 1 )); fi; }
# one training run in the background, its output in $OUT/<name>.log (appended to when it goes on with --resume);
# `wait_all` fails, naming the run, if any run failed. A run killed by the stage's SIGTERM (exit 143; most likely the
# signal came as train.py was exiting, after Python had restored the default handler) counts as stopped when its
# LoRA is there (the H200 table's students stage reported one unnamed failed run after every LoRA was written).
train() { name=$1; shift; [[ $1 == --resume ]] || : >"$OUT/$name.log"
          timeout --preserve-status -s TERM "$(left)" python train.py "$@" $SMOKE --out "$OUT/$name" \
            >>"$OUT/$name.log" 2>&1 & pids+=($!); names+=("$name"); }
wait_all() {
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" && continue
        status=$?
        if (( status == 143 )) && [[ -f $OUT/${names[$i]}/lora.safetensors ]]; then
            echo "run ${names[$i]}: SIGTERM as it ended (exit 143), its LoRA written"; continue
        fi
        echo "run ${names[$i]} failed (exit $status): see $OUT/${names[$i]}.log" >&2; exit 1
    done
    pids=(); names=()
}
stage() { [[ " $STAGE " == *" all "* || " $STAGE " == *" $1 "* ]] && SECONDS=0; }   # STAGE: one or more, in order

if stage teachers; then
    # stage 1: one teacher per task and lr, single-reward Flow-GRPO from the base
    start=--overwrite; [[ -n $TEACHERS_GO_ON ]] && start=--resume   # a second call trains the same teachers on
    lrs() { case $1 in geneval) echo "$GENEVAL_LRS";; ocr) echo "$OCR_LRS";; quality) echo "$QUALITY_LRS";; esac; }
    for task in geneval ocr quality; do
        for lr in $(lrs $task); do
            train teacher/${task}_lr$lr $start $GRPO --reward toy_$task --lr "$lr" --iterations "$TEACHER_ITERS"
        done
    done
    wait_all
    # each task's teacher: its candidate with the best ODE score on TRAIN prompts (never the held-out ones)
    for task in geneval ocr quality; do
        set -- $(lrs $task); best=${task}_lr$1
        if (( $# > 1 )); then
            candidates=$(for lr in "$@"; do printf '%s_lr%s=%s,' "$task" "$lr" "$T/${task}_lr$lr/lora.safetensors"; done)
            python evaluate.py --skip_base --lora "${candidates%,}" --prompts "$task=$(ls toy/${task}_train.*)" \
                --max_prompts 128 --out "$OUT/eval_${task}_pick" $EVAL_FLAGS >"$OUT/eval_${task}_pick.log" 2>&1
            best=$(python -c 'import json, sys; t = json.load(open(sys.argv[1]))["table"]; print(max(t, key=lambda r: t[r][sys.argv[2]]))' \
                "$OUT/eval_${task}_pick/results.json" "$task")
        fi
        rm -rf "${T:?}/$task" && cp -r "$T/$best" "$T/$task"
        echo "teacher $task: $best"
    done
    echo "stage teachers: ${SECONDS} s; ship with: python toyworld.py teachers $T"
fi

if stage students; then
    python merge_lora.py "$(lora geneval)" "$(lora ocr)" --method ab-mean \
        --out "$OUT/merge_init.safetensors"
    # every student row to --iterations $1, with the flags after it (--overwrite: start; --resume: go on)
    students() {
        n=$1; shift
        for s in $SEEDS; do
            # baseline: GRPO-Mix, each prompt scored by its own task's reward, plus quality at 0.2 (the paper's DeQA)
            train grpo_mix_s$s "$@" --seed "$s" $GRPO --task_rewards geneval=toy_geneval,ocr=toy_ocr \
                --reward toy_quality=0.2 --iterations "$n"
            train opd_merge_mar_s$s "$@" --seed "$s" $OPD --iterations "$n"
            train opd_merge_no_mar_s$s "$@" --seed "$s" $OPD --beta 0 --iterations "$n"
            train opd_fresh_mar_s$s "$@" --seed "$s" --teachers "$teachers" $BATCH --anchor "$anchor" --iterations "$n"
            for k in $SAMPLED_STEPS; do
                train opd_merge_mar_k${k}_s$s "$@" --seed "$s" $OPD --sampled_steps "$k" --iterations "$n"
            done
            if [[ $1 == --overwrite ]]; then   # the SFT init first, once, then its Flow-OPD row
                (python train.py --overwrite --seed "$s" --algo sft --teachers "$teachers" $BATCH --iterations "$SFT_ITERS" \
                     $SMOKE --out "$OUT/sft_init_s$s" >"$OUT/sft_init_s$s.log" 2>&1 &&
                 timeout --preserve-status -s TERM "$(left)" python train.py --overwrite --seed "$s" --teachers "$teachers" \
                     $BATCH --init_lora "$OUT/sft_init_s$s/lora.safetensors" --anchor "$anchor" --iterations "$n" \
                     $SMOKE --out "$OUT/opd_sft_mar_s$s" >"$OUT/opd_sft_mar_s$s.log" 2>&1) & pids+=($!); names+=("opd_sft_mar_s$s")
            else
                train opd_sft_mar_s$s "$@" --seed "$s" --teachers "$teachers" $BATCH \
                    --init_lora "$OUT/sft_init_s$s/lora.safetensors" --anchor "$anchor" --iterations "$n"
            fi
        done
        wait_all
    }
    students "$CALIBRATE_ITERS" --overwrite
    # as many iterations as the slowest row fits in what is left of LIMIT: 45 s for the restart, 25 % to spare (the
    # H200 run of c1b1881 kept 25 s and 10 %: its rows were stopped at 57-62 of 62 iterations)
    iterations=$(python - "$OUT" "$(left)" "$CALIBRATE_ITERS" "$STUDENT_ITERS" "$LIMIT" <<'EOF'
import json, sys
from pathlib import Path
out, left, done, most, limit = Path(sys.argv[1]), *map(int, sys.argv[2:])
def per_iteration(log):            # median seconds per iteration after the first (which warms up)
    lines = log.read_text().splitlines()
    seconds = sorted(json.loads(line)["seconds"] for line in lines[1:] or lines)
    return seconds[len(seconds) // 2]
runs = [log for log in out.glob("*_s[0-9]*/metrics.jsonl") if not log.parent.name.startswith("sft_init")]
fit = done + int((left - 45) / (1.25 * max(map(per_iteration, runs)))) if limit else most
print(max(done, min(most, fit)))
EOF
)
    echo "$iterations" > "$OUT/student_iterations"
    echo "students: $CALIBRATE_ITERS iterations in ${SECONDS} s; every row goes on to $iterations"
    students "$iterations" --resume
    echo "stage students: ${SECONDS} s"
fi

if stage wallclock; then
    for k in $SAMPLED_STEPS; do
        for s in $SEEDS; do
            dense=$OUT/opd_merge_mar_s$s sampled=$OUT/opd_merge_mar_k${k}_s$s timed=opd_merge_mar_k${k}_time_s$s
            iterations=$(python - "$dense" "$sampled" <<'EOF'
import json, sys
dense, sampled = ([json.loads(line)["seconds"] for line in open(f"{run}/metrics.jsonl")] for run in sys.argv[1:])
print(max(len(sampled), int(sum(dense) / (sum(sampled) / len(sampled)))))  # dense row's seconds / k row's s per it
EOF
)
            echo "$timed: $iterations iterations (the dense row's wall-clock)"
            rm -rf "${OUT:?}/$timed" && cp -r "$sampled" "$OUT/$timed"
            train "$timed" --resume --seed "$s" $OPD --sampled_steps "$k" --iterations "$iterations"
        done
    done
    wait_all
    echo "stage wallclock: ${SECONDS} s"
fi

if stage eval; then
    rows="teacher_geneval=$(lora geneval),teacher_ocr=$(lora ocr),teacher_quality=$anchor"
    python evaluate.py --lora "$rows" --images_per_prompt "$EVAL_IMAGES" \
        --batch 512 --out "$OUT/eval/base" $EVAL_FLAGS >"$OUT/eval_base.log" 2>&1 & pids+=($!); names+=(eval_base)
    for s in $SEEDS; do
        runs="grpo_mix opd_merge_mar opd_merge_no_mar opd_fresh_mar opd_sft_mar"
        for k in $SAMPLED_STEPS; do runs="$runs opd_merge_mar_k$k opd_merge_mar_k${k}_time"; done
        rows=$(for run in $runs; do printf '%s=%s,' "${run}_s$s" "$OUT/${run}_s$s/lora.safetensors"; done)
        python evaluate.py --skip_base --lora "${rows%,}" --images_per_prompt "$EVAL_IMAGES" --batch 512 \
            --out "$OUT/eval/s$s" $EVAL_FLAGS >"$OUT/eval_s$s.log" 2>&1 & pids+=($!); names+=(eval_s$s)
    done
    wait_all
    echo "stage eval: ${SECONDS} s"
    python toyworld.py table "$OUT"
fi
