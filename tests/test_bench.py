"""bench.py's CPU smoke path (tiny shapes): it runs train.opd_iteration and counts FLOPs per phase."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_tiny_runs_the_training_iteration_and_counts_flops(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--tiny", "--configs", "eager b8", "--iterations", "1",
                             "--skip_precision", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    config, = record["configs"]
    assert config["config"] == "eager b8" and config["images_per_s"] > 0
    phases = record["tflop_per_image"]
    assert set(phases) == {"rollout", "targets", "train", "total"} and all(v > 0 for v in phases.values())
    # rollout: 10 CFG forwards; targets: 9 states x 2 CFG rows x (teacher + anchor); train: 9 forward+backward
    assert 1.5 < phases["targets"] / phases["rollout"] < 2.0 and 1.5 < phases["train"] / phases["rollout"] < 2.5
    assert "| eager b8 |" in (tmp_path / "bench.md").read_text()
