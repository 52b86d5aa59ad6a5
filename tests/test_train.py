"""train.py end to end on a tiny SD3 folder: torchrun, checkpoints diffusers can load, 1 vs 2 processes, bad input;
the training rows in-process: sampled steps unbiased over every draw, only drawn states at the teachers, k = J is the
dense path, first-step PPO ratios exactly 1."""
import copy
import json
import os
from pathlib import Path
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, in_world_of_one, random_lora, train_error
from merge_lora import load_lora, save_lora
import toy_model
from models import sd3_velocity
from sde_sampler import Condition
from teachers import add_adapter
import train
from train import Config, parse_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SMALL = ["--resolution", "16", "--steps", "4", "--train_steps", "3", "--images_per_iteration", "8", "--group_size", "2",
         "--micro_batch", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, teacher_files) -> dict:
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "ocr.txt").write_text('a sign that says "hello"\na red sign\n')
    (folder / "geneval.jsonl").write_text('{"prompt": "two red cats", "tag": "counting"}\n{"prompt": "a blue dog on the left"}\n')
    (folder / "pick.txt").write_text("a photo of a cat\n")
    return {"teachers": f"ocr={teacher_files['ocr']},geneval={teacher_files['geneval']},{teacher_files['pick']}",
            "prompts": f"ocr={folder / 'ocr.txt'},geneval={folder / 'geneval.jsonl'},pick={folder / 'pick.txt'}",
            "folder": folder}


def run_train(args, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """torchrun with `nproc` processes; nproc=0 runs plain `python train.py` (a world of one)."""
    launcher = [*TORCHRUN, f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    result = subprocess.run([*launcher, str(ROOT / "train.py"), *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def common(sd3_folder, data, out) -> list:
    return ["--base", sd3_folder, "--teachers", data["teachers"], "--prompts", data["prompts"], "--out", out, *SMALL]


def test_parse_config_types_bools_and_unknown_flags():
    cfg = parse_config(["--beta", "0.1", "--iterations", "3", "--detach_advantage", "--loss", "kl_only"])
    assert cfg.beta == 0.1 and cfg.iterations == 3 and cfg.detach_advantage is True and cfg.loss == "kl_only"
    assert Config().group_size == 16 and Config().guidance == 4.5 and Config().noise_level == 0.7
    sd3 = parse_config(["--base", "sd3"])
    assert sd3.images_per_iteration == 256 and sd3.lr == 1e-4                 # the paper's recipe for SD3 folders
    toy = parse_config(["--lr", "0.5"])                                        # no --base: the toy recipe, flags win
    assert toy.images_per_iteration == toy_model.TRAIN_DEFAULTS["images_per_iteration"] and toy.lr == 0.5
    with pytest.raises(ValueError, match="unknown flag '--betta'"):
        parse_config(["--betta", "0.1"])
    with pytest.raises(ValueError, match="--iterations takes a int"):
        parse_config(["--iterations", "many"])


def test_torchrun_trains_and_writes_a_checkpoint_diffusers_loads(sd3_folder, data, tmp_path):
    """Also: a prompt beyond the text encoders (the pick task's two prompts) is truncated with one warning a run."""
    out = tmp_path / "run"
    long = " ".join(["a photo of a red cat on the left"] * 20)               # > 77 CLIP tokens
    (tmp_path / "long.txt").write_text(f"{long}\n{long} dog\n")
    prompts = data["prompts"].replace(str(data["folder"] / "pick.txt"), str(tmp_path / "long.txt"))
    result = run_train([*common(sd3_folder, data, out), "--prompts", prompts, "--iterations", "3",
                        "--anchor", data["teachers"].split(",")[-1]])
    assert result.stderr.count("are truncated") == 1 and "Token indices sequence length" not in result.stderr
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["iterations"] == 3 and record["world_size"] == 1 and len(record["git_sha"]) > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["kl_anchor"] > 0 and m["grad_norm"] > 0 and m["images_per_s"] > 0 for m in metrics)
    assert any(m["kl_teacher/ocr"] for m in metrics)

    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    base = copy.deepcopy(pipe.transformer)
    ours = copy.deepcopy(pipe.transformer)
    lora = load_lora(out / "lora.safetensors")
    assert lora.alpha == 64.0 and lora.rank == 32
    add_adapter(ours, lora, "student")
    pipe.load_lora_weights(out / "lora.safetensors")
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(1, 5, 32, generator=g),
                     torch.randn(1, 32, generator=g))
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.9, 0.5])
    with torch.no_grad():
        v_diffusers, v_ours, v_base = (sd3_velocity(t, x, sigma, cond, 4.5) for t in (pipe.transformer, ours, base))
    assert torch.allclose(v_diffusers, v_ours, atol=1e-5)
    assert (v_ours - v_base).abs().max() > 1e-4


def test_only_student_lora_parameters_receive_gradients(sd3_folder, data, tmp_path):
    from models import load_base
    from teachers import load_teachers
    from train import add_student, resolve_data
    base = load_base(str(sd3_folder), "cpu", torch.float32, 16)
    cfg = parse_config(common(sd3_folder, data, tmp_path / "g"))
    teachers, _, _ = resolve_data(cfg)
    load_teachers(base.transformer, teachers)
    params = add_student(base.transformer, cfg)
    cond = base.condition(["a red sign", "two red cats"])
    x = torch.randn(2, 4, 8, 8)
    v = base.velocity(x, torch.tensor([0.9, 0.4]), cond, 4.5)
    v.pow(2).mean().backward()
    with_grad = {n for n, p in base.transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    student = {n for n, p in base.transformer.named_parameters() if ".student." in n}
    assert with_grad <= student and len(params) == len(student)
    zero = student - with_grad                                    # allowed: the structural zero of the last block
    assert all(".lora_A." in n or "transformer_blocks.1.attn.add_q_proj" in n for n in zero), zero


def test_two_processes_give_the_same_lora_as_one(sd3_folder, data, tmp_path):
    # with --sampled_steps on: each image draws its steps from its own seed (the dense path: test_grpo.py's twin)
    args = ["--iterations", "2", "--updates", "1", "--lr", "1e-3", "--sampled_steps", "2"]
    in_world_of_one(train.main, [*common(sd3_folder, data, tmp_path / "one"), *args], threads=1)   # run_train's 1
    run_train([*common(sd3_folder, data, tmp_path / "two"), *args], nproc=2)
    one, two = load_lora(tmp_path / "one" / "lora.safetensors"), load_lora(tmp_path / "two" / "lora.safetensors")
    moved = max((one.B[m]).abs().max().item() for m in one.B)
    assert moved > 1e-4                                          # training moved the LoRA
    for m in one.A:
        assert torch.allclose(one.A[m], two.A[m], atol=1e-6) and torch.allclose(one.B[m], two.B[m], atol=1e-6), m
    metrics = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("one", "two")]
    assert abs(metrics[0]["loss"] - metrics[1]["loss"]) < 1e-6 * max(1.0, metrics[0]["loss"])


def _bad_flags(tmp_path, sd3_folder, data, **changes) -> tuple[list[str], Path]:
    flags = {"base": sd3_folder, "teachers": data["teachers"], "prompts": data["prompts"], "out": tmp_path / "out"}
    flags.update(changes)
    return SMALL[:-2] + [str(x) for k, v in flags.items() for x in (f"--{k}", v)], flags["out"]   # later flags win


def _bad(tmp_path, sd3_folder, data, **changes) -> tuple[str, Path]:
    args, out = _bad_flags(tmp_path, sd3_folder, data, **changes)
    return train_error(args), out


def _wrong_shape_lora(tmp_path, sd3_folder):
    from diffusers import SD3Transformer2DModel
    lora = random_lora(SD3Transformer2DModel.from_pretrained(sd3_folder, subfolder="transformer"), 4)
    module = next(iter(lora.A))
    lora.A[module] = torch.zeros(4, 3)
    save_lora(lora, tmp_path / "wrong.safetensors")
    return tmp_path / "wrong.safetensors"


BAD_INPUTS = {
    "missing teacher": (lambda t, f, d: {"teachers": d["teachers"].replace("ocr=", f"ocr={t}/nope", 1)},
                        "LoRA not found: .*nope"),
    "missing base": (lambda t, f, d: {"base": t / "no_base"}, "not a diffusers SD3 folder"),
    "foreign lora": (lambda t, f, d: {"anchor": write_foreign(t)}, "not a linear layer of this base"),
    "shape mismatch": (lambda t, f, d: {"anchor": _wrong_shape_lora(t, f)}, "has shape in=3"),
    "prompts without teacher": (lambda t, f, d: {"prompts": d["prompts"] + f",extra={d['folder'] / 'pick.txt'}"},
                                "tasks with a teacher .* and tasks with prompts .* differ"),
    "empty prompt file": (lambda t, f, d: {"prompts": d["prompts"].replace(str(d["folder"] / "pick.txt"), str(empty(t)))},
                          "holds no prompts"),
    "batch not divisible": (lambda t, f, d: {"images_per_iteration": 6}, "not divisible by world size 1 x --group_size 4"),
    "truncated safetensors": (lambda t, f, d: {"anchor": truncated(t, d)}, "cannot read LoRA .*truncated.safetensors"),
    "unknown flag": (lambda t, f, d: {"learning_rate": 0.1}, "unknown flag '--learning_rate'"),
    "zero iterations": (lambda t, f, d: {"iterations": 0}, "--iterations 0: must be >= 1"),
    "read-only out": (lambda t, f, d: {"out": "/sys/flow_opd_out"}, "--out /sys/flow_opd_out is not writable"),
}


def truncated(tmp_path: Path, data) -> Path:
    teacher = Path(data["teachers"].split(",")[0].split("=")[1])                 # a peft folder or a file
    whole = (teacher / "adapter_model.safetensors" if teacher.is_dir() else teacher).read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    return tmp_path / "truncated.safetensors"


def write_foreign(tmp_path: Path) -> Path:
    save_lora(load_lora_like({"down_blocks.0.attn.to_q": (2, 8, 8)}), tmp_path / "foreign.safetensors")
    return tmp_path / "foreign.safetensors"


def load_lora_like(shapes):
    from merge_lora import LoRA
    return LoRA({m: torch.zeros(r, i) for m, (r, i, o) in shapes.items()}, {m: torch.zeros(o, r) for m, (r, i, o) in shapes.items()}, 2.0)


def empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("\n")
    return tmp_path / "empty.txt"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_and_writes_nothing(case, sd3_folder, data, tmp_path):
    make, message = BAD_INPUTS[case]
    changes = make(tmp_path, sd3_folder, data)
    if case == "batch not divisible":
        changes["group_size"] = 4
    error, out = _bad(tmp_path, sd3_folder, data, **changes)
    assert "\n" not in error and __import__("re").search(message, error), error
    assert not Path(out).exists()


def test_out_holding_another_run_is_refused_and_untouched(sd3_folder, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"config": "earlier run"}')
    args, _ = _bad_flags(tmp_path, sd3_folder, data, out=out)
    result = run_train(args, nproc=0, check=False)                              # the CLI: one line on stderr, exit 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "holds another run; choose another --out, or pass --resume or --overwrite" in errors[0]
    assert (out / "config.json").read_text() == '{"config": "earlier run"}'


def test_world_size_not_dividing_the_batch_is_refused_on_every_rank(sd3_folder, data, tmp_path):
    out = tmp_path / "out"
    args = [*common(sd3_folder, data, out), "--images_per_iteration", "4", "--group_size", "4"]   # later flags win
    result = run_train(args, nproc=2, check=False)                           # fine for 1 process, not for 2
    message = "train.py: error: --images_per_iteration 4 is not divisible by world size 2 x --group_size 4"
    assert result.returncode != 0 and not out.exists()
    lines = result.stderr.splitlines()
    assert lines.count(message) == 1                                          # printed once, by rank 0
    assert lines.count(f"  traceback : {message}") == 2                       # and in torchrun's summary, each rank
    assert lines[-2] == f"  traceback : {message}"                            # the last line but torchrun's ====


# ----------------------------------------------------------------------------------------- training rows, in-process

@pytest.fixture
def world_of_one():
    """A gloo process group of one in this process (Stats and the optimizer step all-reduce)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _run(sd3_folder, data, out, *flags):
    """A run on the tiny SD3 in this process: 4 images, T = 4, J = 3 trained steps."""
    from train import setup
    cfg = parse_config([*common(sd3_folder, data, out), "--images_per_iteration", "4", *map(str, flags)])
    return setup(cfg, 0, 1, torch.device("cpu"))


def _with_targets(run, batch, rows):
    from train import route, velocities_at_rows
    rows.targets["teacher"] = velocities_at_rows(run, route([batch.tasks[i] for i in rows.image.tolist()], run.routes), batch, rows)
    rows.targets["anchor"] = velocities_at_rows(run, [run.anchor] * len(rows), batch, rows)
    return rows


@pytest.mark.parametrize("loss, k", [("gkd", 1), ("kl_only", 2)])
def test_sampled_rows_give_the_dense_loss_and_gradient_over_every_draw(loss, k, sd3_folder, data, teacher_files, tmp_path):
    """E over all draws of the weighted row loss (and its LoRA gradient) = the dense one. Every image draws with its
    own u, but the expectation of a sum over images is the sum of per-image expectations, so one u for all images,
    enumerated over opd_loss.systematic_designs, gives it exactly."""
    from opd_loss import systematic_designs
    from train import local_batch, rows_at, step_loss, student_rollout
    run = _run(sd3_folder, data, tmp_path / "out", "--loss", loss, "--sampled_steps", k,
               "--init_lora", teacher_files["geneval"])                          # a student away from B = 0
    mine, seeds = local_batch(run, 1)
    batch = student_rollout(run, mine, seeds)

    def loss_and_gradient(inclusion, u):
        rows = _with_targets(run, batch, rows_at(inclusion, [u] * len(seeds), run.device))
        total = 0.0
        for part in rows.split(3):                                           # micro-batches that mix steps
            value = (part.weight * step_loss(run, batch, part)[0]).sum() / len(seeds)
            value.backward()
            total += value.item()
        gradient = torch.cat([p.grad.flatten() for p in run.params if p.grad is not None]).double()
        run.optimizer.zero_grad(set_to_none=True)
        return total, gradient

    dense_loss, dense_gradient = loss_and_gradient(torch.ones(3, dtype=torch.float64), 0.0)
    designs = systematic_designs(run.inclusion)
    assert len(designs) > 1 and 0 < run.inclusion.min() < 1                   # a real draw, not the dense set
    draws = [(probability, *loss_and_gradient(run.inclusion, u)) for probability, u, _ in designs]
    expected_loss = sum(p * value for p, value, _ in draws)
    expected_gradient = sum(p * gradient for p, _, gradient in draws)
    assert dense_loss > 0 and abs(expected_loss - dense_loss) < 1e-5 * dense_loss
    assert (expected_gradient - dense_gradient).norm() < 1e-4 * dense_gradient.norm()
    assert min((gradient - dense_gradient).norm() for _, _, gradient in draws) > 1e-3 * dense_gradient.norm()


def test_only_the_drawn_states_reach_the_teachers_and_the_anchor(world_of_one, sd3_folder, data, teacher_files, tmp_path):
    from train import draw_rows, local_batch, opd_iteration, student_rollout
    run = _run(sd3_folder, data, tmp_path / "out", "--sampled_steps", 1, "--anchor", teacher_files["pick"])
    transformer, calls = run.base.transformer, []
    mine, seeds = local_batch(run, 1)
    batch, rows = student_rollout(run, mine, seeds), draw_rows(run, seeds)     # what the iteration will draw
    forward = transformer.forward

    def counting(*args, **kwargs):
        adapter = transformer.active_adapters()[0]
        calls.append((adapter, torch.is_grad_enabled(), kwargs["hidden_states"].detach().clone(), kwargs["timestep"]))
        return forward(*args, **kwargs)

    transformer.forward = counting
    opd_iteration(run, 1)
    rows_of = lambda adapter, grad=False: [(x, t) for a, g, xs, ts in calls if a == adapter and g == grad   # noqa: E731
                                           for x, t in zip(xs[len(xs) // 2:], ts[len(ts) // 2:])]   # cond half of CFG
    assert len(rows) == 4 and len(rows_of("student")) == 4 * 4                # 4 images x 1 drawn step; rollout 4 x T
    drawn = sorted((batch.x[j, i].sum().item(), 1000 * run.sigmas[j].item()) for i, j in zip(rows.image, rows.step))
    for adapters in (["teacher_ocr", "teacher_geneval", "teacher_pick"], ["anchor"], ["student"]):
        seen = sorted((x.sum().item(), t.item()) for a in adapters for x, t in rows_of(a, grad=a == "student"))
        assert len(seen) == len(drawn) and all(abs(a - b) < 1e-4 and abs(s - t) < 1e-3 for (a, s), (b, t) in zip(seen, drawn))


def test_drawing_every_step_is_the_dense_path_exactly(world_of_one, sd3_folder, data, tmp_path):
    from opd_loss import inclusion_probabilities
    from train import opd_iteration
    assert torch.equal(inclusion_probabilities(torch.ones(3), 3), torch.ones(3, dtype=torch.float64))   # uniform p, k = J
    results = []
    for k in (0, 3):                                                          # --sampled_steps 3 = J vs dense
        run = _run(sd3_folder, data, tmp_path / f"k{k}", "--sampled_steps", k, "--loss", "kl_only")
        metrics = opd_iteration(run, 1)
        results.append((run.inclusion, metrics, [p.detach().clone() for p in run.params]))
    (pi0, m0, p0), (pi3, m3, p3) = results
    assert torch.equal(pi0, torch.ones(3, dtype=torch.float64)) and torch.equal(pi0, pi3)
    assert {k: v for k, v in m0.items() if not k.startswith("seconds")} == {k: v for k, v in m3.items() if not k.startswith("seconds")}
    assert all(torch.equal(a, b) for a, b in zip(p0, p3)) and m0["loss"] > 0


def test_first_step_ratios_are_exactly_one_and_later_steps_compare_like_with_like(world_of_one, sd3_folder, data,
                                                                                    tmp_path, monkeypatch):
    """Rounding noise of 1e-3 (10x the clip range) put on the rollout's log-probs: the first optimizer step's ratios
    are still exactly 1, and (lr 0: the policy does not move) so are the second step's, whose old log-probs the
    training forward recomputed. The noise is logged, and so is the fraction of rows it would have clipped."""
    import train
    run = _run(sd3_folder, data, tmp_path / "out", "--loss", "kl_only", "--updates", 2, "--lr", 1e-30)
    rollout = train.student_rollout

    def noisy(run, mine, seeds):
        batch = rollout(run, mine, seeds)
        batch.log_prob += 1e-3 * (-1.0) ** torch.arange(batch.log_prob.numel()).view_as(batch.log_prob)   # +-1e-3
        return batch

    monkeypatch.setattr(train, "student_rollout", noisy)
    metrics = train.opd_iteration(run, 1)
    assert metrics["clip_fraction"] == 0 and metrics["log_ratio_max"] == 0
    assert abs(metrics["first_step_ratio_noise"] - 1e-3) < 1e-5 and metrics["first_step_noise_clip_fraction"] == 1

    mine, seeds = train.local_batch(run, 1)                                   # the ratio itself, in float32
    batch = noisy(run, mine, seeds)
    rows = train.draw_rows(run, seeds)
    _, log_prob = train.student_step(run, batch, rows)
    log_prob_old, logged, _ = train.ratio_terms(run, batch, rows, log_prob)
    assert log_prob.dtype == torch.float32 and torch.equal(torch.exp(log_prob - log_prob_old), torch.ones(len(rows)))
    assert logged["clip_fraction"].sum() == 0 and logged["first_step_noise_clip_fraction"].min() == 1
