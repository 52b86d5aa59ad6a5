"""Reliability: kill-and-resume identity, SIGTERM (also under torchrun), atomic checkpoints, --keep, resume refusals,
the numerical guard; the command line (--help, --flag=value, suggestions, renamed flags) and a battery of bad inputs,
each refused in one line before anything is written."""
from dataclasses import fields, replace
import json
import math
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
from conftest import ROOT, in_world_of_one, train_error

TOY = ["--teachers", f"{ROOT}/toy/ocr.safetensors,{ROOT}/toy/geneval.safetensors", "--images_per_iteration", "4", "--group_size", "2",
       "--micro_batch", "2", "--steps", "4", "--train_steps", "2", "--save_every", "1", "--eval_every", "0"]
EMA = ["--ema", "--optimizer_steps", "4", "--micro_batch", "1", "--group_size", "1"]   # the EMA moves in iterations 2, 4


def train(*flags, wait=True):
    """`python train.py` (a world of one) in the repository root."""
    command = [sys.executable, str(ROOT / "train.py"), *TOY, *map(str, flags)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def train_here(*flags) -> None:
    """train.main with the same flags as `train`, in this process (no interpreter start-up); raises on failure."""
    import train as train_py
    in_world_of_one(train_py.main, [*TOY, *flags])


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
    train_here(*EMA, "--iterations", 4, "--out", straight)                     # the reference, uninterrupted
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


def test_sigterm_to_the_workers_under_torchrun_writes_the_last_snapshot_then_checkpoints_and_exits_zero(tmp_path):
    """The worker is the `python train.py` of a world of one, under torchrun: the signal sent to it (not to
    torchrun, test below) writes the last finished iteration's snapshot at once, ends the iteration, writes a
    checkpoint, exits 0, and so does torchrun."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(ROOT / "train.py"), *TOY, "--iterations", "200", "--save_every", "100", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "metrics.jsonl", process)
    while len((out / "metrics.jsonl").read_text().splitlines()) < 2:           # iteration 1's snapshot is pending
        time.sleep(0.05)
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert f"stopped by signal {int(signal.SIGTERM)} after iteration {done}" in stdout
    assert checkpoint.latest(out).name == f"ckpt_{done:06d}.pt" and done < 200
    # at the signal, the newest finished iteration's snapshot: written before the iteration under way ended
    at_once = int(re.search(rf"signal {int(signal.SIGTERM)}: ckpt_(\d+)\.pt written in", stderr).group(1))
    assert done - 2 <= at_once < done and (out / "checkpoints" / f"ckpt_{at_once:06d}.pt").is_file()


def test_sigterm_to_torchrun_reaches_the_workers_but_torchrun_exits_one(tmp_path):
    """What the README states for a signal sent to torchrun itself (kill, Ctrl-C, a scheduler): torchrun sends it
    on to every worker and waits for them (up to its --shutdown_timeout), the workers stop as above and exit 0,
    and torchrun then exits 1 with its own SignalException traceback. A stand-in worker keeps this test fast."""
    worker = tmp_path / "worker.py"
    worker.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda *_: (print('worker stopped cleanly', flush=True), sys.exit(0)))\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                str(worker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert "worker stopped cleanly" in stdout
    assert process.returncode == 1 and "SignalException" in stderr.splitlines()[-1]


def test_resume_refuses_a_different_run_and_names_the_difference(tmp_path):
    out = tmp_path / "run"
    train_here("--iterations", 1, "--out", out)
    before = snapshot(out)
    error = train_error([*TOY, "--iterations", 2, "--out", out, "--resume", "--lr", "0.5", "--beta", "0.1"])
    assert "was made by a different run: --beta 0.04 -> 0.1; --lr 0.001 -> 0.5" in error
    other = tmp_path / "geneval.safetensors"
    other.write_bytes((ROOT / "toy/quality.safetensors").read_bytes())
    error = train_error([*TOY, "--iterations", 2, "--out", out, "--resume", "--teachers",
                         f"{ROOT}/toy/ocr.safetensors,geneval={other}"])
    assert error.endswith("was made by a different run: teacher geneval file changed")   # paths may move
    assert snapshot(out) == before                                           # config.json and checkpoints kept


def test_keep_prunes_old_checkpoints_and_exports(tmp_path):
    out = tmp_path / "run"
    train_here("--iterations", 3, "--keep", 2, "--out", out)
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


# ----------------------------------------------------------------------------------------- the command line

def test_help_lists_every_flag_with_its_default_and_description(capsys):
    import evaluate
    import toy_model
    import train
    for cls, main in ((train.Config, train.main), (evaluate.EvalConfig, evaluate.main)):
        helps = train.flag_help(cls)
        for flag in ("--help", "-h"):
            with pytest.raises(SystemExit) as done:
                main(["--lr", "1", flag])                                      # help wins over any other flag
            assert done.value.code == 0
            text = capsys.readouterr().out
            lines = text.splitlines() + [""]
            for f in fields(cls):
                at = next(i for i, line in enumerate(lines) if line.startswith(f"  --{f.name} "))
                _, description = helps[f.name]
                assert description and description in lines[at], f.name
                default = '""' if f.default == "" else str(f.default)
                assert default in lines[at] or default in lines[at + 1], f.name     # a long default: the next line
    text = train.usage(train.Config, toy_model.TRAIN_DEFAULTS)
    assert "  --beta                  0.04                 MAR weight (grpo: weight of the KL to the base) [>= 0]" in text
    assert "  --images_per_iteration  256 (toy 16) " in text and "--optimizer_steps is now --updates" in text
    assert "what to distil:" in text and "the objective:" in text                  # the section comments


def test_flag_equals_value_parses_like_flag_space_value():
    from evaluate import EvalConfig
    from train import parse_config, parse_flags
    joined = parse_config(["--teachers=ocr=a.safetensors", "--beta=0.1", "--resume=true", "--noise-level=0.5"])
    spaced = parse_config(["--teachers", "ocr=a.safetensors", "--beta", "0.1", "--resume", "true",
                           "--noise_level", "0.5"])
    assert joined == spaced and joined.teachers == "ocr=a.safetensors" and joined.resume is True
    assert parse_flags(EvalConfig, ["--lora=opd=out/lora.safetensors", "--skip_base"]) == \
        {"lora": "opd=out/lora.safetensors", "skip_base": True}


@pytest.mark.parametrize("argv, message", [
    (["--betta", "1"], "unknown flag '--betta': did you mean --beta?"),
    (["--teacher", "x"], "unknown flag '--teacher': did you mean --teachers?"),
    (["--noise=0.5"], "unknown flag '--noise': did you mean --noise_level?"),
    (["--zzzz", "1"], "unknown flag '--zzzz': train.py --help lists the flags"),
    (["--teachers", "a.safetensors", "b.safetensors"], "'b.safetensors' is not a flag: give --name value"),
    (["--iterations"], "flag --iterations needs a value"),
])
def test_unknown_flag_names_the_closest_known_one(argv, message):
    from train import parse_config
    with pytest.raises(ValueError) as error:
        parse_config(argv)
    assert str(error.value).startswith(message)


def test_renamed_flag_still_works_with_a_one_line_warning_and_old_checkpoints_still_resume(capsys):
    from train import RENAMED, parse_config
    assert parse_config(["--optimizer_steps", "4"]).updates == 4 == parse_config(["--optimizer_steps=4"]).updates
    warnings = capsys.readouterr().err.splitlines()
    warning = "train.py: warning: --optimizer_steps is now --updates; the old name goes in the next release"
    assert warnings == [warning] * 2
    saved = {"base": "b", "files": {}, "config": {"optimizer_steps": 2, "lr": 1.0}}     # written before the rename
    now = {"base": "b", "files": {}, "config": {"updates": 2, "lr": 1.0}}
    assert checkpoint.differences(saved, now, RENAMED) == []
    assert checkpoint.differences(saved, now | {"config": {"updates": 4, "lr": 1.0}}, RENAMED) == ["--updates 2 -> 4"]


def test_every_numeric_flag_has_a_range_and_values_outside_it_are_refused():
    import evaluate
    import train
    for cls, limits in ((train.Config, train.LIMITS), (evaluate.EvalConfig, evaluate.LIMITS)):
        numeric = {f.name: f.type for f in fields(cls) if f.type in (int, float, "int", "float")}
        assert numeric.keys() == limits.keys()
        train.check_limits(cls(), limits)                                       # the defaults are in range
        for name, limit in limits.items():
            op, bound = limit.split()
            kind = int if numeric[name] in (int, "int") else float
            train.check_limits(replace(cls(), **{name: kind(bound) + (op == ">")}), limits)   # the edge is in
            for bad in [kind(bound) - (op == ">=")] + ([math.nan, math.inf] if kind is float else []):
                with pytest.raises(ValueError, match=f"^--{name} {bad}: must be {limit}$"):
                    train.check_limits(replace(cls(), **{name: bad}), limits)


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def a_run_without_checkpoints(t: Path) -> Path:
    (t / "stopped").mkdir()
    (t / "stopped" / "config.json").write_text("{}")
    return t / "stopped"


def a_file(t: Path, name: str = "results") -> Path:
    (t / name).write_text("keep me")
    return t / name


TRAIN_BAD = {
    "negative beta": (lambda t: ["--beta", "-5"], r"^--beta -5.0: must be >= 0$"),
    "negative noise level": (lambda t: ["--noise_level=-0.7"], r"^--noise_level -0.7: must be >= 0$"),
    "learning rate not a number": (lambda t: ["--lr", "nan"], r"^--lr nan: must be > 0$"),
    "task weight not a number": (lambda t: ["--task_weights", "ocr=one"],
                                 r"^--task_weights ocr=one: the weight must be a number, e.g. ocr=1$"),
    "task weights all zero": (lambda t: ["--task_weights", "ocr=0,geneval=0"],
                              r"^--task_weights ocr=0,geneval=0: give weights >= 0, at least one > 0, for tasks"),
    "negative task weight": (lambda t: ["--task_weights", "ocr=-1"], r"^--task_weights ocr=-1: give weights >= 0"),
    "task given twice": (lambda t: ["--task_weights", "ocr=1,ocr=2"], r"^--task_weights: ocr is given twice"),
    "out looks like a file": (lambda t: ["--out", t / "student.safetensors"],
                              r"student.safetensors looks like a file name; --out names a folder .* "
                              r"e\.g\. --out .*/student$"),
    "out is a file": (lambda t: ["--out", a_file(t)], r"^--out .*/results is a file; --out names a folder"),
    "resume a folder with no run": (lambda t: ["--resume", "--out", t / "misspelt"],
                                    r"^--resume: .*/misspelt holds no run; check --out, or pass --resume_or_start"),
    "resume a run stopped before its first checkpoint": (
        lambda t: ["--resume", "--out", a_run_without_checkpoints(t)],
        r"stopped holds a run stopped before its first checkpoint; check --out, or pass --resume_or_start"),
}


@pytest.mark.parametrize("case", TRAIN_BAD)
def test_train_refuses_bad_input_in_one_line_before_writing_anything(case, tmp_path):
    flags = TRAIN_BAD[case][0](tmp_path)
    before = snapshot(tmp_path)
    error = train_error([*TOY, "--out", tmp_path / "run", *flags])                  # later flags win
    assert "\n" not in error and re.search(TRAIN_BAD[case][1], error), error
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


EVAL_BAD = {
    "lora named base": (lambda t: ["--lora", "base=toy/ocr.safetensors"],
                        r"^--lora base=toy/ocr.safetensors: 'base' names the base model's row; give the LoRA "
                        r"another name$"),
    "lora name twice": (lambda t: ["--lora", "a=toy/ocr.safetensors,a=toy/geneval.safetensors"],
                        r"^--lora: a is given twice"),
    "out is a file": (lambda t: ["--out", a_file(t, "table")], r"^--out .*/table is a file; --out names a folder"),
    "out looks like a file": (lambda t: ["--out", t / "table.json"], r"table.json looks like a file name"),
    "zero steps": (lambda t: ["--steps", "0"], r"^--steps 0: must be >= 1$"),
}


@pytest.mark.parametrize("case", EVAL_BAD)
def test_evaluate_refuses_bad_input_in_one_line_before_generating(case, tmp_path):
    import evaluate
    flags = EVAL_BAD[case][0](tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as error:
        evaluate.main(["--out", str(tmp_path / "eval"), *map(str, flags)])           # raises before any process group
    assert "\n" not in str(error.value) and re.search(EVAL_BAD[case][1], str(error.value)), error.value
    assert snapshot(tmp_path) == before and not (tmp_path / "eval").exists()


def test_a_corrupt_newest_checkpoint_is_one_line_naming_the_one_before(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text('{"config": "earlier run"}')
    (out / "checkpoints" / "ckpt_000001.pt").write_bytes(b"an older checkpoint")
    (out / "checkpoints" / "ckpt_000002.pt").write_bytes(b"cut short")
    before = snapshot(out)
    error = train_error([*TOY, "--out", out, "--resume"])
    assert re.fullmatch(r"--resume: .*ckpt_000002.pt cannot be read \(cut short or damaged\); delete it to resume from "
                        r"ckpt_000001.pt", error), error
    assert snapshot(out) == before                                              # config.json not rewritten


def test_init_lora_records_the_rank_and_alpha_it_trains_and_resume_or_start_starts(tmp_path, capsys):
    from merge_lora import LoRA, load_lora, save_lora
    import train
    teacher = load_lora(ROOT / "toy/ocr.safetensors")
    assert teacher.rank != 4
    save_lora(LoRA({m: a[:4] for m, a in teacher.A.items()}, {m: b[:, :4] for m, b in teacher.B.items()}, 3.0),
              tmp_path / "init.safetensors")
    out = tmp_path / "run"
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        train.main([str(a) for a in [*TOY, "--iterations", 1, "--init_lora", tmp_path / "init.safetensors",
                                     "--resume_or_start", "--out", out]])
    finally:
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(saved)
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["rank"], config["alpha"]) == (4, 3.0) and config["resume"] is True
    assert load_lora(out / "lora.safetensors").rank == 4 and load_lora(out / "lora.safetensors").alpha == 3.0
    printed = capsys.readouterr().out
    assert "rank 4, alpha 3 (not --rank 16, --alpha 32)" in printed
    assert "--resume_or_start: no checkpoint in" in printed


def test_errors_are_one_line_on_rank_zero_and_in_torchruns_failure_summary(tmp_path, monkeypatch, capsys):
    """exit_with_error's error file, read back by torch's own reader (what torchrun prints at the end)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    import train
    files = {rank: tmp_path / f"error_{rank}.json" for rank in (0, 1)}
    for rank, path in files.items():
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
        with pytest.raises(SystemExit) as done:
            train.exit_with_error("train.py", ValueError("--beta -5.0: must be >= 0"), 2)
        assert done.value.code == 2
        assert capsys.readouterr().err == ("train.py: error: --beta -5.0: must be >= 0\n" if rank == 0 else "")
    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=2, error_file=str(path))
                for rank, path in files.items()}
    summary = ChildFailedError("train.py", failures).format_msg()
    assert summary.count("traceback : train.py: error: --beta -5.0: must be >= 0") == 2
    assert "traceback : train.py: error: --beta" in summary.split("Root Cause")[1]
