"""Checkpoints: what a killed run needs to go on exactly, written so that none is ever half-written.

`<out>/checkpoints/ckpt_<iteration>.pt` holds the student LoRA (fp32, by parameter name), the AdamW state,
the EMA weights and step counter (--ema, ema.py), the iteration, every rank's RNG states, the data position
and the run's identity (config, base, and the sha256 of every teacher / anchor / init LoRA file). The data
position is the next iteration: each iteration's prompts and seeds are a pure function of (--seed, iteration)
(train.local_batch), so nothing else about the data stream needs saving. Beside it,
`lora_<iteration>.safetensors` and `<out>/lora.safetensors` (the latest) hold the student alone in the
diffusers-loadable format (merge_lora.save_lora): the EMA weights under --ema, else the live ones; the
safetensors metadata says which ("weights": "ema" or "live", with the iteration and the EMA step).
`snapshot` builds a checkpoint's record with its own tensor copies (collective) and `write` writes it (rank 0):
train.py takes a snapshot after every iteration, writes it when a checkpoint is due and, on SIGTERM, writes the
last one at once (no exports), so a launcher that SIGKILLs after a grace period shorter than an iteration still
leaves a checkpoint (docs/long_runs.md).

Atomic: every file is written under a temporary name in the same folder, flushed to disk, then renamed, so a
kill at any instant leaves the previous file or the new one under the final name, never a partial one. The
last `--keep` checkpoints are kept. Only rank 0 writes; every rank sends it its RNG states.

Resume (`train.py --resume`): the newest checkpoint of --out is loaded into the freshly built run. It is
refused, naming each difference, when the base, a LoRA file, the student's shapes or a config field that
changes the math differ; the fields in RESUMABLE may change (e.g. more --iterations).

Demo: python -c "import checkpoint; print(checkpoint.latest(__import__('pathlib').Path('out/opd')))"
"""
from dataclasses import asdict
import hashlib
import os
from pathlib import Path
import shutil
import tempfile

import torch
import torch.distributed as dist

import ema
from merge_lora import lora_from_adapter, save_lora

# config fields that change neither the math nor the data stream: free to differ on --resume
RESUMABLE = {"iterations", "out", "overwrite", "resume", "resume_or_start", "save_every", "keep", "max_bad_steps",
             "grad_checkpointing", "compile", "target_batch", "log", "eval_every", "eval_prompts", "eval_rewards",
             "eval_max_prompts", "eval_steps"}
PATHS = {"base", "teachers", "anchor", "init_lora", "prompts"}      # compared by content instead (identity)


def write_atomic(path: Path, write) -> None:
    """write(file object) into a temporary file beside `path`, fsync, rename over `path`, fsync the folder."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def file_sha256(path: str) -> str:
    path = Path(path)
    path = path / "adapter_model.safetensors" if path.is_dir() else path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(cfg, base_name: str, teachers: dict, prompts: dict) -> dict:
    """What must be equal for a checkpoint to continue this run: the base, the content (not the paths) of
    every LoRA file and prompt list, and the config fields outside RESUMABLE."""
    files = {f"teacher {task}": str(path) for task, path in teachers.items()}
    files |= {flag: getattr(cfg, flag) for flag in ("anchor", "init_lora") if getattr(cfg, flag)}
    digests = {name: file_sha256(path) for name, path in files.items()}
    digests |= {f"prompts {task}": hashlib.sha256("\n".join(p).encode()).hexdigest() for task, p in prompts.items()}
    return {"base": base_name, "files": digests,
            "config": {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE | PATHS}}


def differences(saved: dict, now: dict, renamed: dict[str, str] | None = None) -> list[str]:
    """Human-readable differences between two identities (empty: compatible). renamed: config fields renamed
    since `saved` was written, old name -> new (train.RENAMED)."""
    saved = saved | {"config": {(renamed or {}).get(k, k): v for k, v in saved["config"].items()}}
    found = [f"base {saved['base']} -> {now['base']}"] if saved["base"] != now["base"] else []
    for name in sorted(saved["files"].keys() | now["files"].keys()):
        if saved["files"].get(name) != now["files"].get(name):
            found.append(f"{name} file {'changed' if name in saved['files'] and name in now['files'] else 'added or removed'}")
    for key in sorted(saved["config"].keys() | now["config"].keys()):
        if saved["config"].get(key) != now["config"].get(key):
            found.append(f"--{key} {saved['config'].get(key)!r} -> {now['config'].get(key)!r}")
    return found


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def student_state(transformer) -> dict[str, torch.Tensor]:
    """Copies of the student's LoRA tensors, on their device: no blocking device-to-host copy per tensor (a snapshot
    is taken every iteration; torch.save moves them to the host only when one is written; load maps to the CPU)."""
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if ".student." in n}


def snapshot(run, iteration: int) -> dict | None:
    """The record of checkpoint `iteration` with its own copies of every tensor (rank 0; None on the others), so
    it stays valid while training goes on: train.py keeps the last one and writes it at once on SIGTERM.
    Collective (gathers every rank's RNG states): call on all ranks."""
    states = [None] * run.world
    dist.all_gather_object(states, rng_state())
    if run.rank != 0:
        return None
    ema_state = None
    if run.ema is not None:
        ema_state = {"step": run.ema.step, "weights": {n: w.detach().clone() for n, w in
                                                       zip(ema.names(run.base.transformer), run.ema.weights)}}
    return {"iteration": iteration, "next_iteration": iteration + 1, "seed": run.cfg.seed,
            "student": student_state(run.base.transformer), "optimizer": copy_tensors(run.optimizer.state_dict()),
            "rng": states, "world_size": run.world, "identity": run.identity, "ema": ema_state}


def copy_tensors(value):
    """A copy of nested dicts/lists whose tensors are cloned (on their own device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: copy_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_tensors(v) for v in value)
    return value


def write(run, record: dict, exports: bool = True) -> Path:
    """Rank 0: write `record` atomically; with `exports`, the LoRA exports (EMA weights under --ema, the metadata
    says which) and prune to --keep."""
    folder = Path(run.cfg.out) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, Path(run.cfg.out))
    path = folder / f"ckpt_{record['iteration']:06d}.pt"
    write_atomic(path, lambda f: torch.save(record, f))
    if exports:
        adapter = ema.ADAPTER if run.ema is not None else "student"
        lora = lora_from_adapter(run.base.transformer, adapter)
        note = {"weights": "ema" if run.ema is not None else "live", "iteration": str(record["iteration"])}
        if run.ema is not None:
            note["ema_step"] = str(record["ema"]["step"])
        save_lora(lora, folder / f"lora_{record['iteration']:06d}.safetensors", note)
        save_lora(lora, Path(run.cfg.out) / "lora.safetensors", note)
        prune(folder, run.cfg.keep)
    return path


def remove_stale_temporaries(*folders: Path) -> None:
    """Delete the temporary files (write_atomic, merge_lora.save_lora: `.<name>.tmp<pid>`) that a killed writer left;
    only rank 0 of one run writes here, so another process's temporary is never in use."""
    for folder in folders:
        for stale in folder.glob(".*.tmp*"):
            if not stale.name.endswith(f".tmp{os.getpid()}"):
                stale.unlink(missing_ok=True)


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (and their LoRA exports); keep <= 0 keeps all."""
    if keep <= 0:
        return
    for old in sorted(folder.glob("ckpt_*.pt"))[:-keep]:
        old.unlink()
        old.with_name(old.name.replace("ckpt_", "lora_").replace(".pt", ".safetensors")).unlink(missing_ok=True)


def latest(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    return found[-1] if found else None


def load(run, path: Path, renamed: dict[str, str] | None = None) -> int:
    """Restore the student, AdamW and this rank's RNG from `path`; refuse an incompatible one (`renamed`: see
    differences). -> next iteration"""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:                                                           # truncated or not a checkpoint
        before = [p for p in sorted(path.parent.glob("ckpt_*.pt")) if p.name < path.name]
        then = f"resume from {before[-1].name}" if before else "start afresh (--overwrite)"
        raise ValueError(f"--resume: {path} cannot be read (cut short or damaged); delete it to {then}") from None
    found = differences(record["identity"], run.identity, renamed)
    if found:
        raise ValueError(f"--resume: {path} was made by a different run: {'; '.join(found)}")
    params = dict(run.base.transformer.named_parameters())
    for name, tensor in record["student"].items():
        if name not in params or params[name].shape != tensor.shape:
            raise ValueError(f"--resume: {path}: student parameter {name} {tuple(tensor.shape)} does not fit this run")
    with torch.no_grad():
        for name, tensor in record["student"].items():
            params[name].copy_(tensor)
    run.optimizer.load_state_dict(record["optimizer"])
    if run.ema is not None:                                                     # --ema is part of the identity
        weights = record["ema"]["weights"]
        with torch.no_grad():
            for name, w in zip(ema.names(run.base.transformer), run.ema.weights):
                w.copy_(weights[name])
        run.ema.step = record["ema"]["step"]
    if record["world_size"] == run.world:
        set_rng_state(record["rng"][run.rank])
    return record["next_iteration"]


def check_out(out: Path, need_bytes: int = 0) -> None:
    """Fail before training when --out cannot be written or lacks `need_bytes`; creates nothing that stays."""
    existing = next(p for p in [out, *out.parents] if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as error:
        raise ValueError(f"--out {out} is not writable ({error.strerror} in {existing}); choose another --out") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ValueError(f"--out {out}: {free / 1e9:.2f} GB free, checkpoints need {need_bytes / 1e9:.2f} GB; "
                         "free space or choose another --out")
