#!/usr/bin/env bash
# Issue 14: dense Flow-OPD vs --sampled_steps K in the toy world, at the same number of student images. The toy
# main command's recipe (runs/toy_opd.sh: the shipped OCR + GenEval teachers, fresh student LoRA, the toy
# defaults) for ITERS iterations, SEEDS seeds per arm. The toy is launch-bound, so the seeds of one arm train side
# by side on the one GPU; the two arms run one after the other, so each arm's wall time is measured under the
# same load. Then one evaluate.py call scores the base and every student on the held-out geneval and ocr prompts
# (the toy quality reward is saturated near 0.997 for every model), and
# $OUT/summary.{md,json} gives each arm's mean +- standard error over seeds per task, and its wall times.
# Usage: OUT=out/toy_sampled bash runs/toy_sampled.sh     knobs: OUT ITERS SEEDS K SMOKE EVAL_FLAGS
#   SMOKE=1: tiny sizes, a CPU check of this script (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy_sampled}
ITERS=${ITERS:-100}
SEEDS=${SEEDS:-"0 1 2"}
K=${K:-2}
EVAL_FLAGS=${EVAL_FLAGS:-}
TINY=""
if [[ -n ${SMOKE:-} ]]; then
    TINY="--images_per_iteration 4 --group_size 2 --micro_batch 2 --steps 4 --train_steps 3"
    ITERS=2; EVAL_FLAGS="--max_prompts 2 --steps 4 $EVAL_FLAGS"
fi
mkdir -p "$OUT"
arm() {   # arm NAME FLAGS...: every seed side by side; its wall seconds in $OUT/NAME.seconds
    local name=$1; shift
    local start=$SECONDS pids=()
    for seed in $SEEDS; do
        python train.py --teachers toy/ocr.safetensors,toy/geneval.safetensors --iterations "$ITERS" --seed "$seed" \
            --eval_every 0 --overwrite $TINY "$@" --out "$OUT/$name/seed$seed" >"$OUT/$name.seed$seed.log" 2>&1 & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || { echo "a $name run failed: see $OUT/$name.seed*.log" >&2; exit 1; }; done
    echo $((SECONDS - start)) >"$OUT/$name.seconds"
    echo "$name: $(cat "$OUT/$name.seconds") s"
}
arm dense
arm "sampled_k$K" --sampled_steps "$K"

rows=""
for name in dense "sampled_k$K"; do
    for seed in $SEEDS; do rows="$rows${rows:+,}${name}_seed$seed=$OUT/$name/seed$seed/lora.safetensors"; done
done
start=$SECONDS
python evaluate.py --lora "$rows" --tasks geneval,ocr --out "$OUT/eval" $EVAL_FLAGS >"$OUT/eval.log" 2>&1 ||
    { echo "evaluate.py failed: see $OUT/eval.log" >&2; exit 1; }
echo $((SECONDS - start)) >"$OUT/eval.seconds"

python - "$OUT" "$K" <<'EOF'
import json, math, sys
from pathlib import Path
out, k = Path(sys.argv[1]), sys.argv[2]
results = json.loads((out / "eval" / "results.json").read_text())
table, tasks = results["table"], list(results["table"]["base"])
summary = {"base": table["base"], "eval_seconds": int((out / "eval.seconds").read_text())}
lines = ["| arm | " + " | ".join(tasks) + " | average | wall s (seeds in parallel) | train s per run |",
         "|---|" + "---|" * (len(tasks) + 3),
         "| base | " + " | ".join(f"{table['base'][t]:.3f}" for t in tasks) + f" | {results['average']['base']:.3f} | | |"]
for arm in ("dense", f"sampled_k{k}"):
    rows = [name for name in table if name.startswith(arm + "_seed")]
    def stat(values):
        mean = sum(values) / len(values)
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) if len(values) > 1 else float("nan")
        return mean, se
    scores = {t: stat([table[r][t] for r in rows]) for t in tasks} | {"average": stat([results["average"][r] for r in rows])}
    runs = sorted((out / arm).glob("seed*/metrics.jsonl"))
    train = stat([sum(json.loads(line)["seconds"] for line in run.read_text().splitlines()) for run in runs])
    images = [json.loads((run.parent / "config.json").read_text())["config"]["images_per_iteration"]
              * len(run.read_text().splitlines()) for run in runs]
    wall = int((out / f"{arm}.seconds").read_text())
    summary[arm] = {"seeds": len(rows), "student_images_per_run": images[0], "wall_seconds": wall,
                    "train_seconds_per_run": train, **{t: {"mean": m, "se": s} for t, (m, s) in scores.items()}}
    lines.append(f"| {arm} ({len(rows)} seeds, {images[0]} images each) | "
                 + " | ".join(f"{m:.3f} +- {s:.3f}" for m, s in scores.values()) + f" | {wall} | {train[0]:.1f} +- {train[1]:.1f} |")
text = "\n".join(lines) + f"\n\nevaluate.py: {summary['eval_seconds']} s; mean +- standard error over seeds\n"
(out / "summary.md").write_text(text)
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(text)
EOF
