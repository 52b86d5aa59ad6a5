"""The shipped toy base and the default commands on it: loading, checksums, determinism, train and evaluate."""
import json
import shutil

import pytest
import torch

from conftest import ROOT, in_world_of_one
import evaluate
from evaluate import generate
from models import load_toy
import train
import toy_model
import toy_tasks

TINY = ["--iterations", "2", "--images_per_iteration", "4", "--group_size", "2", "--micro_batch", "2", "--steps", "4",
        "--train_steps", "2"]


@pytest.fixture(scope="module")
def toy_base():
    return load_toy("cpu")


def test_shipped_base_samples_deterministically_for_a_seed(toy_base):
    prompts = ['a sign that says "K7"', "a photo of a red square"]
    first = generate(toy_base, prompts, [3, 4], steps=6, guidance=4.5, batch=2)
    again = generate(toy_base, prompts, [3, 4], steps=6, guidance=4.5, batch=1)
    other = generate(toy_base, prompts, [5, 6], steps=6, guidance=4.5, batch=2)
    assert first.shape == (2, 3, toy_model.IMAGE_SIZE, toy_model.IMAGE_SIZE) and 0 <= first.min() and first.max() <= 1
    assert torch.allclose(first, again, atol=1e-3) and not torch.allclose(first, other, atol=1e-2)


def test_corrupted_or_missing_assets_are_named(tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(ROOT / "toy", folder)
    data = bytearray((folder / "base.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "base.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="toy asset corrupted: .*base.safetensors .*SHA256SUMS"):
        load_toy("cpu", folder=folder)
    (folder / "base.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="toy asset missing: .*base.safetensors"):
        load_toy("cpu", folder=folder)


def test_tokenizer_truncates_long_prompts_once_and_marks_unknown_words(capsys):
    long = "a photo of " + " ".join(["a red square"] * 8)
    ids = toy_model.tokenize([long, long, "a zebra"])
    assert ids.shape == (3, toy_model.MAX_TOKENS) and ids[0, 0] == 1
    assert capsys.readouterr().err.count("truncated") == 1
    assert ids[2, 2].item() == toy_model.vocabulary().index("<unk>")


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'pickscore'"):
        toy_tasks.prompt_file("pickscore", "train")


def test_default_main_command_runs_on_the_toy_world(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)                                                    # in-process: no interpreter start-up
    in_world_of_one(train.main, ["--teachers", "toy/ocr.safetensors,toy/geneval.safetensors", "--out", out, *TINY,
                                 "--eval_max_prompts", "1", "--eval_steps", "2"],   # the default evaluation, cut short
                    threads=1)                                                 # as run_train: OMP_NUM_THREADS=1
    record = json.loads((out / "config.json").read_text())
    assert record["base"].startswith("toy:") and record["config"]["rank"] == toy_model.TRAIN_DEFAULTS["rank"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2] and all(m["loss"] > 0 for m in metrics[1:])
    # held-out reward at the start and the end, on the test prompts of the run's tasks
    assert [m["iteration"] for m in metrics if {"eval/ocr", "eval/geneval"} <= m.keys()] == [0, 2]
    assert (out / "lora.safetensors").is_file() and (out / "eval" / "grid_000002.png").is_file()


def test_evaluate_writes_one_comparison_table(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    lora = f"ocr_teacher={ROOT / 'toy/ocr.safetensors'},geneval_teacher={ROOT / 'toy/geneval.safetensors'}"
    monkeypatch.chdir(ROOT)                                                    # in-process: no interpreter start-up
    in_world_of_one(evaluate.main, ["--lora", lora, "--max_prompts", "3", "--steps", "4", "--out", out])
    record = json.loads((out / "results.json").read_text())
    assert list(record["table"]) == ["base", "ocr_teacher", "geneval_teacher"]
    assert record["prompts"] == {"geneval": 3, "ocr": 3, "quality": 3}
    for row in record["table"].values():
        assert set(row) == {"geneval", "ocr", "quality"} and all(0 <= v <= 1 for v in row.values())
        assert abs(record["average"][next(iter(record["table"]))] - sum(record["table"]["base"].values()) / 3) < 1e-9
    assert (out / "table.md").read_text().startswith("| model | geneval | ocr | quality | average |")
    assert (out / "grid.png").stat().st_size > 1000
