"""Live curves and sample grids while a run goes: TensorBoard and/or wandb, beside metrics.jsonl.

metrics.jsonl stays the source of truth (every line, written first); `--log tensorboard,wandb` sends the
same numbers, with the iteration as the step, and each in-loop evaluation's grid image. Rank 0 only (train.py
opens a `LiveLog` on rank 0 and an empty one elsewhere). The packages are optional
(requirements-logging.txt) and imported when a logger opens; a named logger whose package is missing is
refused before anything loads.

- tensorboard: event files in <out>/tensorboard (`tensorboard --logdir <out>/tensorboard`). On --resume the
  writer purges the steps from the resumed iteration on, as train.py drops those lines of metrics.jsonl.
- wandb: project $WANDB_PROJECT (default "flow-opd"), run name = the --out folder's name, files in <out>/wandb.
  No network: WANDB_MODE=offline (then `wandb sync <out>/wandb/offline-run-*`). The run id is kept in
  <out>/wandb_run_id, so --resume continues the same wandb run; wandb ignores steps it already has, so
  the iterations redone after a resume keep their first values there.

Demo: python train.py --teachers toy/ocr.safetensors,toy/geneval.safetensors --log tensorboard --out out/opd
      tensorboard --logdir out/opd/tensorboard
"""
import importlib.util
import numbers
import os
from pathlib import Path
import secrets

LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb"}    # logger -> the package it needs


def parse(spec: str) -> list[str]:
    """'tensorboard,wandb' -> names; an unknown name or a missing package is a one-line error."""
    names = [n for n in spec.split(",") if n]
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"--log: unknown logger {name!r}; use tensorboard, wandb or both (comma list)")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise ValueError(f"--log {name} needs the {LOGGERS[name]} package: pip install -r requirements-logging.txt")
    return names


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics line, without the step ("iteration"); None and strings are left out."""
    return {k: float(v) for k, v in metrics.items()
            if k != "iteration" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, out: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events at steps >= it (from an earlier attempt) are hidden; 0 on a fresh start
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start if start > 1 else 0)

    def scalars(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, name: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, out: Path, start: int, config: dict):
        import wandb
        id_file = out / "wandb_run_id"
        if start == 1 or not id_file.is_file():                # a fresh run (or --overwrite) gets a new wandb run
            id_file.write_text(secrets.token_hex(4))
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flow-opd"), name=out.name, dir=str(out),
                              id=id_file.read_text().strip(), resume="allow", config=config)

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class LiveLog:
    """The loggers named in --log (none: every call does nothing, e.g. on ranks other than 0)."""

    def __init__(self, names: list[str] = (), out: Path | None = None, config: dict | None = None, start: int = 1):
        opened = {"tensorboard": lambda: TensorBoard(out, start), "wandb": lambda: Wandb(out, start, config or {})}
        self.backends = [opened[name]() for name in names]

    def metrics(self, line: dict) -> None:
        """One metrics.jsonl line (its "iteration" is the step)."""
        values = scalars(line)
        for backend in self.backends:
            backend.scalars(values, line["iteration"])

    def image(self, name: str, path: Path, step: int) -> None:
        for backend in self.backends:
            backend.image(name, path, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
