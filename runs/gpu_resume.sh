#!/usr/bin/env bash
# Resume on the GPU (issue 17; docs/long_runs.md): a toy run under torchrun, killed three ways mid-way between two
# checkpoints, each time resumed with --resume to the end and compared with an uninterrupted run. The tolerance is
# what two uninterrupted runs differ by, measured in the same call (0 = bit for bit). All runs use --ema, so both
# the live student (checkpoint) and the EMA export (lora.safetensors) are compared.
#   term : SIGTERM to the torchrun agent only. The agent forwards it to the worker and SIGKILLs the worker after
#          its shutdown timeout (30 s, fixed before torch 2.12; --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT
#          from 2.12). train.py writes its last finished iteration's snapshot at once, then finishes the iteration
#          under way and checkpoints it.
#   short: SIGTERM to the worker, SIGKILL to everything GRACE seconds later: a grace period shorter than an
#          iteration (an eager SD3.5-M iteration of ~34 s under torch 2.11's fixed 30 s). Only the snapshot lands.
#   kill : SIGKILL to the agent and the worker (a lost node, an OOM kill): back to the last regular checkpoint.
# Writes $OUT/summary.json, $OUT/summary.md and a log per run. One H200 (toy iteration ~1.5 s): about 5 min.
# Usage: OUT=out/gpu_resume bash runs/gpu_resume.sh     CPU smoke (tiny sizes): SMOKE=1 OUT=/tmp/r bash runs/gpu_resume.sh
# knobs: OUT ITERS KILL_AT SAVE_EVERY GRACE SMOKE
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_resume}
GRACE=${GRACE:-0.5}
if [[ -n ${SMOKE:-} ]]; then
    ITERS=${ITERS:-6}; KILL_AT=${KILL_AT:-4}; SAVE_EVERY=${SAVE_EVERY:-3}
    SIZE="--images_per_iteration 4 --group_size 2 --micro_batch 2 --target_batch 0 --steps 4 --train_steps 2"
else
    ITERS=${ITERS:-30}; KILL_AT=${KILL_AT:-17}; SAVE_EVERY=${SAVE_EVERY:-10}; SIZE=""
fi
FLAGS="--teachers toy/ocr.safetensors,toy/geneval.safetensors --iterations $ITERS --save_every $SAVE_EVERY --keep 0
       --ema --eval_every 0 --overwrite $SIZE"
mkdir -p "$OUT"
SECONDS=0
# start NAME [flags]: torchrun in the background, in a subshell that notes its exit code and end time
declare -A GROUP
start() { local name=$1; shift
    ( rc=0; torchrun --standalone --nproc_per_node=1 train.py $FLAGS "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1 || rc=$?
      echo $rc >"$OUT/$name.rc"; date +%s%N >"$OUT/$name.end" ) &
    GROUP[$name]=$!; }
lines() { if [[ -f $OUT/$1/metrics.jsonl ]]; then wc -l <"$OUT/$1/metrics.jsonl"; else echo 0; fi; }
# kill_at NAME HOW: once NAME has logged KILL_AT iterations, kill it (by pid: the torchrun agent is the subshell's
# child, the worker the agent's child), noting the time and the lines logged
kill_at() { local name=$1 how=$2 agent worker
    until (( $(lines "$name") >= KILL_AT )); do
        [[ -f $OUT/$name.rc ]] && { echo "$name ended before iteration $KILL_AT: see $OUT/$name.log" >&2; return 1; }
        sleep 0.05
    done
    agent=$(pgrep -P "${GROUP[$name]}" | head -1); worker=$(pgrep -P "$agent" | head -1)
    date +%s%N >"$OUT/$name.t0"; lines "$name" >"$OUT/$name.lines"
    case $how in
        term)  kill -TERM "$agent" ;;                                              # torchrun forwards it
        short) kill -TERM "$worker"; sleep "$GRACE"; kill -KILL "$agent" "$worker" 2>/dev/null || true ;;
        kill)  kill -KILL "$agent" "$worker" ;;
    esac; }

if torchrun --help 2>/dev/null | grep -- "--shutdown-timeout" >/dev/null; then SHUTDOWN=settable; else SHUTDOWN="fixed at 30 s"; fi
echo "torch $(python -c 'import torch; print(torch.__version__)'), torchrun shutdown timeout: $SHUTDOWN"
# phase 1, side by side on the one device: two uninterrupted runs and the three that get killed
for name in straight_a straight_b term short kill; do start $name; done
kill_at term term & k1=$!
kill_at short short & k2=$!
kill_at kill kill & k3=$!
for k in "$k1" "$k2" "$k3"; do wait "$k"; done
wait
for name in straight_a straight_b; do
    [[ $(cat "$OUT/$name.rc") == 0 ]] || { echo "$name failed: see $OUT/$name.log" >&2; exit 1; }
done
echo "phase 1 (uninterrupted runs, kills): ${SECONDS} s"
for name in term short kill; do ls "$OUT/$name/checkpoints" >"$OUT/$name.after_kill"; done
# phase 2: resume each to the end
declare -A PID
for name in term short kill; do
    torchrun --standalone --nproc_per_node=1 train.py $FLAGS --resume --out "$OUT/$name" >"$OUT/$name.resume.log" 2>&1 &
    PID[$name]=$!
done
for name in term short kill; do wait "${PID[$name]}" || { echo "$name resume failed: see $OUT/$name.resume.log" >&2; exit 1; }; done
echo "phase 2 (resumes): ${SECONDS} s"

python - "$OUT" "$ITERS" "$SHUTDOWN" "$GRACE" "$SECONDS" <<'EOF'
import json, re, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out, iters, shutdown, grace, seconds = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])

def weights(run):
    """(EMA export, live student of the last checkpoint) of a run."""
    ckpt = torch.load(run / "checkpoints" / f"ckpt_{iters:06d}.pt", map_location="cpu", weights_only=True)
    return load_file(run / "lora.safetensors"), ckpt["student"]

def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

ref, other = weights(out / "straight_a"), weights(out / "straight_b")
tolerance = {"ema_export": max_diff(ref[0], other[0]), "live": max_diff(ref[1], other[1])}
cases = {}
for name in ("term", "short", "kill"):
    read = lambda suffix: (out / f"{name}.{suffix}").read_text().strip()
    kill = {"how": name, "lines_at_kill": int(read("lines")), "exit_code": int(read("rc")),
            "seconds_to_exit": (int(read("end")) - int(read("t0"))) / 1e9}
    log, resumed = (out / f"{name}.log").read_text(), (out / f"{name}.resume.log").read_text()
    at_once = re.search(r"signal \d+: (ckpt_\d+\.pt) written in ([\d.]+) s", log)
    mine = weights(out / name)
    diff = {"ema_export": max_diff(ref[0], mine[0]), "live": max_diff(ref[1], mine[1])}
    cases[name] = kill | {
        "checkpoints_after_kill": [f for f in (out / f"{name}.after_kill").read_text().split() if f.startswith("ckpt_")],
        "snapshot_written_on_signal": at_once.group(1) if at_once else None,
        "snapshot_seconds": float(at_once.group(2)) if at_once else None,
        "iteration_finished_after_signal": bool(re.search(r"stopped by signal", log)),
        "resumed_from": (re.search(r"--resume: (ckpt_\d+\.pt)", resumed) or [None, None])[1],
        "max_abs_diff": diff, "within_tolerance": all(diff[k] <= tolerance[k] for k in diff)}
summary = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torchrun_shutdown_timeout": shutdown, "short_grace_s": float(grace), "iterations": iters,
           "tolerance_two_uninterrupted_runs": tolerance, "cases": cases, "wall_seconds": seconds}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
rows = ["| case | lines at kill | kill -> exit | exit code | checkpoints after kill | written on the signal | "
        "resumed from | max abs diff EMA / live | within tolerance |", "|---" * 9 + "|"]
for name, c in cases.items():
    snap = f"{c['snapshot_written_on_signal']} ({c['snapshot_seconds']:.2f} s)" if c["snapshot_written_on_signal"] else "-"
    rows.append(f"| {name} | {c['lines_at_kill']} | {c['seconds_to_exit']:.2f} s | {c['exit_code']} | "
                f"{', '.join(c['checkpoints_after_kill'])} | {snap} | {c['resumed_from']} | "
                f"{c['max_abs_diff']['ema_export']:.2e} / {c['max_abs_diff']['live']:.2e} | {c['within_tolerance']} |")
text = (f"{summary['device']}, torch {summary['torch']}, torchrun shutdown timeout {shutdown}; {iters} iterations; "
        f"tolerance (two uninterrupted runs, max abs diff) EMA {tolerance['ema_export']:.2e} / live "
        f"{tolerance['live']:.2e}; {seconds} s wall\n\n" + "\n".join(rows) + "\n")
(out / "summary.md").write_text(text)
print(text)
sys.exit(0 if all(c["within_tolerance"] for c in cases.values()) else 1)
EOF
