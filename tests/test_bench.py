"""bench.py's CPU smoke path (tiny shapes): it runs train.opd_iteration dense and with sampled steps, counts FLOPs
per phase, measures the sampled gradient's agreement with the dense one, and (--ratio) the first-step PPO ratio;
--model flux-dev through models.py's FLUX seam, its FLOPs against a closed form."""
import json
from pathlib import Path
import socket
import sys

import torch
import torch.distributed as dist

import models


def bench_here(monkeypatch, *argv) -> None:
    """`python bench.py *argv` in this process (no interpreter start-up): bench.main in a world of one, undone after."""
    import bench
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name, value in world.items():
        monkeypatch.setenv(name, value)                                        # bench.main's world of one, undone after
    monkeypatch.setattr(sys, "argv", ["bench.py", *map(str, argv)])
    try:
        bench.main()
    finally:
        dist.destroy_process_group()


def test_bench_tiny_runs_dense_and_sampled_iterations_and_counts_flops(tmp_path, monkeypatch):
    bench_here(monkeypatch, "--tiny", "--configs", "eager b8,eager b8 k2", "--iterations", "1", "--images", "8",
               "--draws", "2", "--skip_precision", "--out", tmp_path)
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


def flux_row_flops(c: dict, image_tokens: int, text_tokens: int, rank: int) -> tuple[int, int]:
    """Closed-form matmul FLOPs of one FluxTransformer2DModel row with one rank-`rank` LoRA on models.FLUX_TARGETS
    (the attention projections and the double blocks' MLPs) active (FLOPs = 2 x multiply-adds; elementwise ops are
    not counted). -> (forward, backward of the student's loss: base frozen, LoRA trained, latents and text
    embeddings without grad)
    Per row: timestep, guidance and pooled-text embedders (256 -> D -> D, P -> D -> D), adaLN modulations (double
    blocks 2 x 6D, single 3D, final 2D). Per token: x_embedder / context_embedder, then every block 12 D^2
    multiply-adds (double: q, k, v, out + 4x MLP of the token's own stream; single: q, k, v, 4x MLP, 5D -> D out),
    proj_out; joint attention 2 L^2 D per block; LoRA r (in + out) per adapted layer: D -> D attention layers, 8 per
    double block (4 per stream) and 3 per single block; the double blocks' MLPs, D -> 4D and 4D -> D per stream.
    Backward: the gradient of every layer's input and of the LoRA weights, nothing of the embedders and adaLN (no
    input needs a gradient there), nor the input gradient of the first block's q, k, v projections; attention twice
    its forward."""
    D, n, m = c["num_attention_heads"] * c["attention_head_dim"], image_tokens, text_tokens
    L, blocks = n + m, c["num_layers"] + c["num_single_layers"]
    per_row = 2 * ((256 * D + D * D) * (1 + c["guidance_embeds"]) + c["pooled_projection_dim"] * D + D * D
                   + D * (12 * D * c["num_layers"] + 3 * D * c["num_single_layers"] + 2 * D))
    embed = 2 * (n * c["in_channels"] * D + m * c["joint_attention_dim"] * D)
    out = 2 * n * D * c["in_channels"]
    linear, attention = 2 * blocks * 12 * D * D * L, blocks * 4 * L * L * D
    lora = (2 * rank * 2 * D * L * (4 * c["num_layers"] + 3 * c["num_single_layers"])    # D -> D attention layers
            + 2 * rank * 10 * D * L * c["num_layers"])                                  # double-stream MLPs (5D each)
    forward = per_row + embed + out + linear + attention + lora
    first_qkv = 2 * 3 * D * L * (D + rank)         # block 0's q, k, v (both streams): no input gradient (base, LoRA A)
    return forward, linear + out + 2 * lora + 2 * attention - first_qkv


def test_bench_tiny_flux_goes_through_the_flux_seam_and_counts_closed_form_flops(tmp_path, monkeypatch):
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):           # CPU's fused attention kernel is not in torch's FLOP registry
        bench_here(monkeypatch, "--tiny", "--model", "flux-dev", "--configs", "eager b8", "--iterations", "1",
                   "--images", "8", "--skip_precision", "--out", tmp_path)
    record = json.loads((tmp_path / "bench.json").read_text())
    row, = record["configs"]
    model = bench.TINY_MODELS["flux"]
    assert record["model"] == "flux-dev (tiny)" and row["images_per_s"] > 0 and row["compiled_blocks"] == "0/2"
    base = bench.random_base(model, "cpu", torch.float32)
    assert base.family_velocity is models.flux_velocity and base.latent_shape == (4, 8, 8)
    forward, backward = flux_row_flops(model.config, (model.latent // 2) ** 2, model.tokens, 32)
    # rollout: 10 forwards (guidance embedded, no CFG pair); targets: 9 rows x (teacher + anchor); train: 9 rows
    expected = {"rollout": 10 * forward, "targets": 18 * forward, "train": 9 * (forward + backward)}
    for phase, flops in expected.items():                                       # exact today; 0.1% tolerance
        assert abs(row["flops"][phase] / flops - 1) < 1e-3, (phase, row["flops"][phase], flops)


def test_ratio_study_reports_the_noise_before_and_exact_ratios_after(tmp_path):
    import bench
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = bench.TINY_MODELS["sd3"]
        inputs = bench.write_inputs(tmp_path, bench.random_base(model, "meta", torch.float32).transformer, model.targets)
        row, = bench.ratio_study(model, inputs, torch.device("cpu"), 16, ["eager b8"])
    finally:
        dist.destroy_process_group()
    # eager fp32 on CPU: the training forward's log-probs equal the rollout's up to batch-layout rounding
    assert row["config"] == "eager b8" and 0 <= row["first_step_ratio_noise"] < 1e-5
    assert row["clip_fraction"] == 0 and row["log_ratio_max"] == 0                # lr 0: every ratio exactly 1
    assert "| eager b8 |" in bench.ratio_table({"device": "cpu", "torch": "x", "ratio": [row]})
    assert Path(inputs["anchor"]).exists()
