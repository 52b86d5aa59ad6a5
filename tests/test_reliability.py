"""Reliability: kill-and-resume identity, SIGTERM, atomic checkpoints, --keep, resume refusals, the numerical guard."""
import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
import torch

import checkpoint
from conftest import ROOT, train_error

TOY = ["--teachers", f"{ROOT}/toy/ocr.safetensors,{ROOT}/toy/geneval.safetensors", "--images_per_iteration", "4", "--group_size", "2",
       "--micro_batch", "2", "--steps", "4", "--train_steps", "2", "--save_every", "1", "--eval_every", "0"]
EMA = ["--ema", "--optimizer_steps", "4", "--micro_batch", "1", "--group_size", "1"]   # the EMA moves in iterations 2, 4


def train(*flags, wait=True):
    """`python train.py` (a world of one) in the repository root."""
    command = [sys.executable, str(ROOT / "train.py"), *TOY, *map(str, flags)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def wait_for(path: Path, process, timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


def same_lora(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigkill_mid_iteration_then_resume_gives_the_same_lora_bit_for_bit(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(*EMA, "--iterations", 4, "--out", straight).returncode == 0
    process = train(*EMA, "--iterations", 4, "--out", killed, wait=False)
    wait_for(killed / "checkpoints" / "ckpt_000002.pt", process)
    process.send_signal(signal.SIGKILL)                                         # inside iteration 3
    process.wait()
    assert not (killed / "checkpoints" / "ckpt_000004.pt").exists()
    result = train(*EMA, "--iterations", 4, "--out", killed, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--resume: ckpt_00000" in result.stdout
    assert same_lora(straight / "lora.safetensors", killed / "lora.safetensors")   # the EMA export
    first, second = (torch.load(d / "checkpoints" / "ckpt_000004.pt", weights_only=True) for d in (straight, killed))
    assert first["ema"]["step"] == second["ema"]["step"] == 16                 # 4 optimizer steps x 4 iterations
    for part in ("student", "ema"):
        tensors = (first[part], second[part]) if part == "student" else (first[part]["weights"], second[part]["weights"])
        assert tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert not same_lora(straight / "lora.safetensors", straight / "checkpoints" / "lora_000002.safetensors")
    iterations = [json.loads(line)["iteration"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4]                                          # no line twice, none lost
    assert not list((killed / "checkpoints").glob(".*tmp*"))                   # no temporary file left visible


def test_sigterm_writes_the_last_snapshot_at_once_then_finishes_the_iteration_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    process = train("--iterations", 200, "--save_every", 100, "--out", out, wait=False)
    wait_for(out / "metrics.jsonl", process)
    while len((out / "metrics.jsonl").read_text().splitlines()) < 2:           # iteration 1's snapshot is pending
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert f"stopped by signal {int(signal.SIGTERM)} after iteration {done}" in stdout
    assert checkpoint.latest(out).name == f"ckpt_{done:06d}.pt" and done < 200
    # at the signal, the newest finished iteration's snapshot: written before the iteration under way ended
    at_once = int(re.search(rf"signal {int(signal.SIGTERM)}: ckpt_(\d+)\.pt written in", stderr).group(1))
    assert done - 2 <= at_once < done and (out / "checkpoints" / f"ckpt_{at_once:06d}.pt").is_file()


def test_resume_refuses_a_different_run_and_names_the_difference(tmp_path):
    out = tmp_path / "run"
    assert train("--iterations", 1, "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    error = train_error([*TOY, "--iterations", 2, "--out", out, "--resume", "--lr", "0.5", "--beta", "0.1"])
    assert "was made by a different run: --beta 0.04 -> 0.1; --lr 0.001 -> 0.5" in error
    other = tmp_path / "geneval.safetensors"
    other.write_bytes((ROOT / "toy/quality.safetensors").read_bytes())
    error = train_error([*TOY, "--iterations", 2, "--out", out, "--resume", "--teachers",
                         f"{ROOT}/toy/ocr.safetensors,geneval={other}"])
    assert error.endswith("was made by a different run: teacher geneval file changed")   # paths may move
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_keep_prunes_old_checkpoints_and_exports(tmp_path):
    out = tmp_path / "run"
    assert train("--iterations", 3, "--keep", 2, "--out", out).returncode == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "ckpt_000002.pt", "ckpt_000003.pt", "lora_000002.safetensors", "lora_000003.safetensors"]
    assert same_lora(out / "checkpoints" / "lora_000003.safetensors", out / "lora.safetensors")


def test_atomic_write_leaves_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.write_atomic(path, lambda f: f.write(b"old"))

    def dies(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_atomic(path, dies)
    assert path.read_bytes() == b"old"


def test_non_finite_steps_are_skipped_then_abort_leaving_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train("--iterations", 5, "--lr", "1e30", "--max_bad_steps", 2, "--out", out)
    assert result.returncode == 1
    assert "2 optimizer steps in a row had a non-finite loss or gradient; lower --lr (now 1e+30)" in result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["skipped_steps"] == 1 and metrics[0]["grad_norm"] > 0         # step 1 fine, step 2 skipped
    record = torch.load(checkpoint.latest(out), weights_only=True)
    assert record["iteration"] == 1 and all(torch.isfinite(t).all() for t in record["student"].values())


def test_checkpoint_identity_differences_closed_form():
    saved = {"base": "b", "files": {"teacher ocr": "1"}, "config": {"lr": 1.0, "rank": 4}}
    now = {"base": "c", "files": {"teacher ocr": "2", "anchor": "3"}, "config": {"lr": 1.0, "rank": 8}}
    assert checkpoint.differences(saved, now) == ["base b -> c", "anchor file added or removed",
                                                  "teacher ocr file changed", "--rank 4 -> 8"]
    assert checkpoint.differences(saved, saved) == []


def test_unwritable_out_fails_before_loading_anything():
    error = train_error([*TOY, "--iterations", 1, "--out", "/sys/flow_opd_run"])
    assert error.startswith("--out /sys/flow_opd_run is not writable") and not os.path.exists("/sys/flow_opd_run")
