"""evaluate.py end to end on a tiny SD3 folder: the scored table, the T2I-CompBench layout (names, resume,
determinism, 1 vs 2 processes) and bad input."""
from contextlib import redirect_stdout
import io
import json
import os
import re
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT, in_world_of_one
from evaluate import EvalConfig, main, resolve_jobs

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SMALL = ["--steps", "2", "--resolution", "16"]            # the tiny SD3: 16 px = an 8x8 latent
PROMPTS = ["a red sign", "a photo of a cat"]
NAMES = sorted(f"{p}_{k:05d}.png" for p in PROMPTS for k in range(3))


def run_eval(args, nproc: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """torchrun with `nproc` processes; nproc=0 runs plain `python evaluate.py` (a world of one)."""
    launcher = [*TORCHRUN, f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    result = subprocess.run([*launcher, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def eval_here(args) -> str:
    """`python evaluate.py` as run_eval runs it (one thread), but in this process (no interpreter start-up); raises
    on failure.  -> what it printed"""
    printed = io.StringIO()
    with redirect_stdout(printed):
        in_world_of_one(main, args, threads=1)                 # run_eval's OMP_NUM_THREADS=1: the same arithmetic
    return printed.getvalue()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "color.txt"
    path.write_text("\n".join(PROMPTS) + "\n" + PROMPTS[0] + "\n")   # a repeated prompt: one set of files
    return path


def layout_args(sd3_folder, prompt_file, out) -> list:
    return ["--base", sd3_folder, "--layout", "t2i_compbench", "--prompts", f"color={prompt_file}",
            "--images_per_prompt", "3", "--out", out, *SMALL]


@pytest.fixture(scope="module")
def compbench_one(sd3_folder, prompt_file, tmp_path_factory) -> Path:
    """The layout written by one process."""
    out = tmp_path_factory.mktemp("compbench") / "one"
    printed = eval_here(layout_args(sd3_folder, prompt_file, out))
    assert "6 images generated, 0 kept" in printed, printed
    return out


def snapshot(out: Path) -> dict:
    """{file name: (bytes, mtime_ns)} of the color samples."""
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in (out / "color" / "samples").iterdir()}


def test_scored_mode_writes_table_results_and_grid(sd3_folder, prompt_file, tmp_path):
    out = tmp_path / "eval"
    eval_here(["--base", sd3_folder, "--prompts", f"color={prompt_file},shape={prompt_file}",
              "--rewards", "color=brightness,shape=brightness", "--max_prompts", "2", "--out", out, *SMALL])
    record = json.loads((out / "results.json").read_text())
    means = record["table"]["base"]
    assert set(means) == {"color", "shape"} and all(0 < m < 1 for m in means.values())
    assert record["average"]["base"] == pytest.approx((means["color"] + means["shape"]) / 2)
    assert record["prompts"] == {"color": 2, "shape": 2} and record["config"]["steps"] == 2
    table = (out / "table.md").read_text()
    assert table.startswith("| model | color | shape | average |") and f"| base | {means['color']:.3f}" in table
    assert Image.open(out / "grid.png").size[0] > 0


def test_resolve_jobs_seeds_per_prompt_and_image(tmp_path):
    (tmp_path / "color.txt").write_text("a red sign\na blue dog\na red sign\ntwo cats\nthe left dog\n")

    def jobs(n):
        return resolve_jobs(EvalConfig(layout="t2i_compbench", prompts=f"color={tmp_path / 'color.txt'}",
                                       images_per_prompt=n, max_prompts=3))
    (prompts2, seeds2), rewards = jobs(2)[0]["color"], jobs(2)[1]
    prompts5, seeds5 = jobs(5)[0]["color"]
    assert rewards == {} and prompts5[::5] == ["a red sign", "a blue dog", "two cats"]    # repeats dropped, then 3
    assert len(prompts5) == len(seeds5) == 15 and len(set(seeds5)) == 15
    assert [seeds5[p * 5 + k] for p in range(3) for k in range(2)] == seeds2               # (prompt, k) -> one seed


def test_t2i_compbench_layout_names_and_sizes(compbench_one):
    files = sorted((compbench_one / "color" / "samples").iterdir())
    assert [f.name for f in files] == NAMES
    assert all(Image.open(f).size == (16, 16) and Image.open(f).mode == "RGB" for f in files)
    assert sorted(p.name for p in (compbench_one / "color").iterdir()) == ["samples"]    # no temp file left
    assert json.loads((compbench_one / "layout.json").read_text())["images"] == {"color": 6}
    assert not (compbench_one / "table.md").exists()                                    # no rewards, no table


def test_t2i_compbench_rerun_keeps_files_and_regenerates_only_the_missing_one(sd3_folder, prompt_file, compbench_one,
                                                                               tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(compbench_one, out)
    before = snapshot(out)
    printed = eval_here(layout_args(sd3_folder, prompt_file, out) + ["--rewards", "color=brightness"])
    assert "0 images generated, 6 kept" in printed and snapshot(out) == before
    pixels = [np.asarray(Image.open(out / "color" / "samples" / n)) for n in NAMES]
    mean = json.loads((out / "results.json").read_text())["table"]["base"]["color"]
    assert mean == pytest.approx(np.mean([p.mean() / 255 for p in pixels]), abs=1e-6)  # the files were scored

    gone = out / "color" / "samples" / "a photo of a cat_00001.png"
    gone.unlink()
    printed = eval_here(layout_args(sd3_folder, prompt_file, out))
    assert "1 images generated, 5 kept" in printed
    after = snapshot(out)
    assert after.keys() == before.keys() and after[gone.name][0] == before[gone.name][0]     # same bytes again
    assert all(after[n] == before[n] for n in before if n != gone.name)                      # others untouched


def test_t2i_compbench_two_processes_write_the_same_files_as_one(sd3_folder, prompt_file, compbench_one, tmp_path):
    out = tmp_path / "two"
    result = run_eval(layout_args(sd3_folder, prompt_file, out), nproc=2)
    assert "6 images generated, 0 kept" in result.stdout
    assert json.loads((out / "layout.json").read_text())["world_size"] == 2
    one, two = snapshot(compbench_one), snapshot(out)
    assert sorted(two) == NAMES and all(two[n][0] == one[n][0] for n in NAMES)


BAD_INPUTS = {
    "prompt with a slash": (lambda t, f: ["--layout", "t2i_compbench", "--prompts", f"color={bad_prompts(t)}"],
                            "prompt 'a cat and/or a dog' cannot name a T2I-CompBench file"),
    "base without prompts": (lambda t, f: ["--layout", "t2i_compbench"], "--prompts is required with --base"),
}


def bad_prompts(tmp_path: Path, prompt: str = "a cat and/or a dog") -> Path:
    (tmp_path / "bad.txt").write_text(f"a red sign\n{prompt}\n")
    return tmp_path / "bad.txt"


def bad_args(case: str, sd3_folder, prompt_file, tmp_path) -> tuple[list, Path, str]:
    make, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    return ["--base", sd3_folder, *make(tmp_path, prompt_file), "--out", out, *SMALL], out, message


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_and_writes_nothing(case, sd3_folder, prompt_file, tmp_path):
    """In-process (no interpreter start-up): a one-line ValueError, which the CLI prints as its one error line and
    exit (the test below runs the CLI itself)."""
    args, out, message = bad_args(case, sd3_folder, prompt_file, tmp_path)
    with pytest.raises(ValueError) as error:
        in_world_of_one(main, args)
    assert "\n" not in str(error.value) and re.search(message, str(error.value)), error.value
    assert not out.exists()


def test_bad_input_on_the_command_line_is_one_error_line_and_a_failed_exit(sd3_folder, prompt_file, tmp_path):
    args, out, message = bad_args("base without prompts", sd3_folder, prompt_file, tmp_path)
    result = run_eval(args, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("evaluate.py: error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert re.search(message, errors[0]), errors[0]
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (lambda t, f: ["--prompts", f"color={bad_prompts(t, 'a_cat')}"], "cannot name a T2I-CompBench file"),
    (lambda t, f: ["--prompts", f"color={bad_prompts(t, 'cat ' * 51)}"], "longer than 200 bytes"),
    (lambda t, f: ["--prompts", f"color={f}", "--lora", f"a={t / 'a.safetensors'}"], "one model per --out"),
    (lambda t, f: ["--prompts", f"color={f}", "--layout", "compbench"], "--layout 'compbench': expected one of"),
    (lambda t, f: ["--prompts", f"color={f}", "--skip_base"], "--skip_base with no --lora leaves nothing to evaluate"),
])
def test_layout_refuses_before_loading_anything(flags, message, sd3_folder, prompt_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        main(["--base", str(sd3_folder), "--layout", "t2i_compbench", *map(str, flags(tmp_path, prompt_file)),
              "--out", str(out)])
    assert not out.exists()


def test_rerun_with_other_generation_settings_is_refused(sd3_folder, prompt_file, compbench_one):
    before = snapshot(compbench_one)
    with pytest.raises(ValueError, match="was written with another --steps; choose another --out"):
        main(list(map(str, layout_args(sd3_folder, prompt_file, compbench_one))) + ["--steps", "3"])
    assert snapshot(compbench_one) == before
