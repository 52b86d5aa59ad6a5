"""bench.py's CPU smoke path (tiny shapes): it runs train.opd_iteration dense and with sampled steps, counts FLOPs
per phase, measures the sampled gradient's agreement with the dense one, and (--ratio) the first-step PPO ratio."""
import json
from pathlib import Path
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from conftest import ROOT


def test_bench_tiny_runs_dense_and_sampled_iterations_and_counts_flops(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--tiny", "--configs", "eager b8,eager b8 k2",
                             "--iterations", "1", "--images", "8", "--draws", "2", "--skip_precision", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    dense, sampled = record["configs"]
    assert dense["config"] == "eager b8" and dense["images_per_s"] > 0 and dense["rows_per_image"] == 9
    assert sampled["rows_per_image"] == 2 and dense["grad_cosine"] is None
    assert 0.5 < sampled["grad_cosine"] <= 1 and len(sampled["grad_cosines"]) == 2
    flops = dense["flops"]                                                     # counted on one image: 9 rows
    # rollout: 10 CFG forwards; targets: 9 states x 2 CFG rows x (teacher + anchor); train: 9 forward+backward
    assert 1.5 < flops["targets"] / flops["rollout"] < 2.0 and 1.5 < flops["train"] / flops["rollout"] < 2.5
    t = record["tflop"]
    assert abs(t["targets_per_row"] * 9e12 / flops["targets"] - 1) < 1e-9 and abs(t["rollout"] * 1e12 / flops["rollout"] - 1) < 1e-9
    table = (tmp_path / "bench.md").read_text()
    assert "| eager b8 |" in table and f"| {sampled['grad_cosine']:.3f} |" in table


def test_ratio_study_reports_the_noise_before_and_exact_ratios_after(tmp_path):
    import bench
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        inputs = bench.write_inputs(tmp_path, bench.random_base(bench.TINY, "meta", torch.float32, 8).transformer)
        row, = bench.ratio_study(bench.TINY, 8, inputs, torch.device("cpu"), 16, ["eager b8"])
    finally:
        dist.destroy_process_group()
    # eager fp32 on CPU: the training forward's log-probs equal the rollout's up to batch-layout rounding
    assert row["config"] == "eager b8" and 0 <= row["first_step_ratio_noise"] < 1e-5
    assert row["clip_fraction"] == 0 and row["log_ratio_max"] == 0                # lr 0: every ratio exactly 1
    assert "| eager b8 |" in bench.ratio_table({"device": "cpu", "torch": "x", "ratio": [row]})
    assert Path(inputs["anchor"]).exists()
