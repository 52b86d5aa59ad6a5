"""Long runs (issue 17): one toy run with --ema, in-loop evaluation and both live loggers, read back by evaluate.py,
TensorBoard's own reader, the offline wandb files and plot.py; bad flags."""
import importlib.util
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
import torch

from conftest import ROOT, in_world_of_one, train_error

TOY = ["--teachers", f"{ROOT}/toy/ocr.safetensors,{ROOT}/toy/geneval.safetensors", "--images_per_iteration", "2",
       "--group_size", "1", "--micro_batch", "1", "--steps", "2", "--train_steps", "1"]
EVAL = ["--eval_every", "2", "--eval_steps", "4", "--eval_max_prompts", "2"]      # 4 ODE steps: nonzero toy rewards
LOGGERS = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name)]


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> Path:
    """4 iterations of 2 optimizer steps (the EMA moves after step 7, in iteration 4), evaluated at 0, 2 and 4."""
    import train
    out = tmp_path_factory.mktemp("long") / "run"
    in_world_of_one(train.main, [*TOY, "--iterations", "4", "--save_every", "2", "--ema", *EVAL, "--log",
                                 ",".join(LOGGERS), "--out", out], env=dict(WANDB_MODE="offline", WANDB_SILENT="true"))
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_in_loop_evaluation_scores_the_ema_export_as_evaluate_py_does(long_run, tmp_path):
    import evaluate
    lines = metrics(long_run)
    assert [m["iteration"] for m in lines] == [0, 1, 2, 3, 4]
    assert "loss" not in lines[0] and all("loss" in m for m in lines[1:])     # line 0: before training
    evaluated = [m for m in lines if "eval/average" in m]
    assert [m["iteration"] for m in evaluated] == [0, 2, 4]                    # the start, every 2, the end
    for m in evaluated:
        assert m["eval_weights"] == "ema" and m["seconds_eval"] > 0 and 0 <= m["eval/ocr"] <= 1
        assert m["eval/average"] == pytest.approx((m["eval/ocr"] + m["eval/geneval"]) / 2)
        assert (long_run / "eval" / f"grid_{m['iteration']:06d}.png").stat().st_size > 1000
    # the export holds the EMA weights, says so, and they are not the live ones
    with safe_open(long_run / "lora.safetensors", "pt") as f:
        assert f.metadata()["weights"] == "ema" and f.metadata()["ema_step"] == "8"
    exported, record = load_file(long_run / "lora.safetensors"), torch.load(long_run / "checkpoints" / "ckpt_000004.pt")
    assert record["ema"]["step"] == 8

    def as_exported(state, adapter):                                           # peft names -> the export's keys
        return {"transformer." + name.replace(f".{adapter}.", "."): tensor for name, tensor in state.items()}
    ema_weights, live = as_exported(record["ema"]["weights"], "student_ema"), as_exported(record["student"], "student")
    assert exported.keys() == ema_weights.keys() == live.keys()
    assert all(torch.equal(exported[k], ema_weights[k]) for k in exported)
    assert max((exported[k] - live[k]).abs().max() for k in exported if "lora_B" in k) > 1e-4
    # evaluate.py on the export: the final in-loop numbers, exactly
    in_world_of_one(evaluate.main, ["--lora", f"ema={long_run / 'lora.safetensors'}", "--skip_base", "--tasks",
                                    "ocr,geneval", "--max_prompts", "2", "--steps", "4", "--out", tmp_path / "eval"])
    table = json.loads((tmp_path / "eval" / "results.json").read_text())["table"]["ema"]
    assert table == {"ocr": lines[4]["eval/ocr"], "geneval": lines[4]["eval/geneval"]} and max(table.values()) > 0


@pytest.mark.skipif("tensorboard" not in LOGGERS, reason="tensorboard not installed (requirements-logging.txt)")
def test_tensorboard_events_hold_every_metric_and_the_grids(long_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(long_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for line in metrics(long_run):
        for key, value in line.items():
            if key == "iteration" or not isinstance(value, (int, float)):
                continue
            assert key in tags, key
            found = {e.step: e.value for e in events.Scalars(key)}
            assert found[line["iteration"]] == pytest.approx(value, rel=1e-6), key
    assert [e.step for e in events.Images("eval/grid")] == [0, 2, 4]


@pytest.mark.skipif("wandb" not in LOGGERS, reason="wandb not installed (requirements-logging.txt)")
def test_offline_wandb_run_holds_every_metric_and_the_grids(long_run):
    run_id = (long_run / "wandb_run_id").read_text().strip()
    folder, = (long_run / "wandb").glob(f"offline-run-*-{run_id}")
    log = (folder / f"run-{run_id}.wandb").read_bytes()                        # protobuf records: keys as plain bytes
    keys = {k for line in metrics(long_run) for k, v in line.items() if isinstance(v, (int, float)) and k != "iteration"}
    assert all(key.encode() in log for key in keys), [k for k in keys if k.encode() not in log]
    assert len(list((folder / "files" / "media" / "images").rglob("*.png"))) == 3


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_draws_every_curve_of_the_run(long_run, tmp_path):
    import plot
    lines = metrics(long_run)
    titles = [title for title, _, _ in plot.panels(lines)]
    curves = {title: curves for title, curves, _ in plot.panels(lines)}
    assert titles == ["loss", "KL to each task's teacher", "KL to the anchor", "held-out reward (in-loop evaluation)",
                      "images/s (training)", "reward of the rollouts (training)"]
    assert set(curves["KL to each task's teacher"]) == {"kl_teacher/ocr", "kl_teacher/geneval"}
    assert curves["held-out reward (in-loop evaluation)"]["eval/ocr"] == ([0, 2, 4], [m["eval/ocr"] for m in lines[::2]])
    assert curves["loss"]["loss"] == ([1, 2, 3, 4], [m["loss"] for m in lines[1:]])
    assert plot.main([str(long_run), "--out", str(tmp_path / "curves.png")]).stat().st_size > 10_000
    grpo = [{"iteration": i, "reward": 0.5 + i, "reward/ocr": 0.4 + i, "kl_base": 0.1} for i in (1, 2)]   # a teacher
    curves = {title: curves for title, curves, _ in plot.panels(grpo)}
    assert curves["reward of the rollouts (training)"] == {"reward/ocr": ([1, 2], [1.4, 2.4])}
    assert curves["KL to the base"] == {"kl_base": ([1, 2], [0.1, 0.1])}


@pytest.mark.parametrize("flags, message", [
    (["--log", "neptune"], "--log: unknown logger 'neptune'; use tensorboard, wandb or both"),
    (["--eval_every", "-1"], "--eval_every -1: must be >= 0"),
    (["--eval_every", "1", "--eval_rewards", "quality=toy_quality"], "--eval_rewards: give one reward for each task"),
    (["--eval_every", "1", "--eval_prompts", "ocr=missing.txt"], "missing.txt"),
])
def test_bad_long_run_flags_fail_before_loading(flags, message, tmp_path):
    assert message in train_error([*TOY, *flags, "--out", tmp_path / "run"])
    assert not (tmp_path / "run").exists()


def test_eval_needs_prompts_and_rewards_with_a_real_base():
    from train import Config, resolve_evaluation
    with pytest.raises(ValueError, match="--eval_every needs --eval_prompts with --base"):
        resolve_evaluation(Config(base="sd3.5-medium", eval_every=10), ["ocr"])
    with pytest.raises(ValueError, match=r"give one reward for each task of --eval_prompts \['ocr'\] \(got \[\]\)"):
        resolve_evaluation(Config(base="sd3.5-medium", eval_every=10, eval_prompts=f"ocr={ROOT}/toy/ocr_test.txt"), ["ocr"])
