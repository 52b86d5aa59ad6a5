"""Multi-teacher routing: teacher and anchor LoRAs as frozen adapters on ONE shared base transformer.

Flow-OPD (sec. 3) distils several single-task teachers into one student. Each prompt carries a task
tag; the teacher of that task labels every state the student visits on that prompt (hard routing).
Teacher and anchor velocities need no gradient and depend only on the stored state (x_j, sigma_j,
prompt), so after a rollout they are computed once at the rows that will be trained (every (image, step),
or the drawn ones with --sampled_steps), grouped by adapter: one `set_adapter` and batched CFG forwards
per adapter present (on an H100 with SD3.5-M, switching adapters per group was 1.45x faster than peft's
mixed `adapter_names` batch).

Deviations from the authors' code: they load a full fp32 SD3.5-M per teacher and alternate whole epochs
per dataset (OCR 1 : GenEval 3); we keep every teacher as a LoRA adapter on the one base (in the base's
dtype) and route per sample inside mixed batches, sampling tasks by `task_weights` (same expected mix).

Adapter names: "student" (trainable), "teacher_<task>", "anchor"; BASE (None) = all adapters disabled.
Demo: see train.py (`load_teachers`, `target_velocities`).
"""
from contextlib import contextmanager
from functools import partial
from pathlib import Path
import warnings

import torch
from peft import LoraConfig

from merge_lora import TRANSFORMER_FAMILIES, LoRA, load_lora, lora_config, lora_family
from sde_sampler import Condition, sample_ode

BASE = None   # adapter "name" of the bare base model


def add_adapter(transformer, lora: LoRA, name: str, source: str = "") -> None:
    """Inject `lora` as adapter `name` (frozen, in the transformer's dtype), checking every module and shape."""
    check_fits(transformer, lora, name, source)
    config = LoraConfig(**lora_config(lora))                                     # per-module ranks / alphas as patterns
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(config, adapter_name=name)
    with torch.no_grad():
        for module, a in lora.A.items():
            layer = transformer.get_submodule(module)                             # now peft's LoRA layer
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(lora.B[module])
    for parameter in _adapter_parameters(transformer, name):
        parameter.data = parameter.data.to(transformer.dtype)
        parameter.requires_grad_(False)


def check_fits(transformer, lora: LoRA, name: str, source: str) -> None:
    """Every module of `lora` a linear layer of the base, of the base's shape; else one line naming the file and the
    first module that does not fit, and both families when the LoRA's module names tell another family than the
    base's (merge_lora.lora_family: an SD3 LoRA on a FLUX base, a FLUX LoRA on an SD3 base)."""
    modules = dict(transformer.named_modules())
    for module, a in lora.A.items():
        base, misfit = modules.get(module), None
        if base is None or not hasattr(base, "in_features"):
            misfit = f"module {module!r} is not a linear layer of this base"
        else:
            base = getattr(base, "base_layer", base)
            if (a.shape[1], lora.B[module].shape[0]) != (base.in_features, base.out_features):
                misfit = (f"{module} has shape in={a.shape[1]}, out={lora.B[module].shape[0]}, the base has "
                          f"in={base.in_features}, out={base.out_features}")
        if misfit is None:
            continue
        family, base_family = lora_family(lora.A), TRANSFORMER_FAMILIES.get(type(transformer).__name__)
        if None not in (family, base_family) and family != base_family:
            raise ValueError(f"{role(name)} {source} targets {family} modules ({misfit}) but the base is "
                             f"{base_family}: give LoRAs trained on this base")
        raise ValueError(f"LoRA {source}: {misfit} (a LoRA for another model?)")


def role(name: str) -> str:
    """What the user gave as adapter `name`, for errors: teacher <task>, --anchor, --init_lora, or LoRA <name>."""
    if name.startswith("teacher_"):
        return f"teacher {name.removeprefix('teacher_')}"
    return {"anchor": "--anchor", "student": "--init_lora"}.get(name, f"LoRA {name}")


def _adapter_parameters(transformer, name: str):
    return [p for n, p in transformer.named_parameters() if f".{name}." in n]


@contextmanager
def use_adapter(transformer, name: str | None):
    """Run the transformer with only adapter `name` active (BASE: none), then restore the active adapters."""
    if not getattr(transformer, "_hf_peft_config_loaded", False):               # a bare base: nothing to switch
        assert name is BASE, f"no adapters loaded, cannot use {name!r}"
        yield
        return
    previous = transformer.active_adapters()
    if name is BASE:
        transformer.disable_adapters()
    else:
        transformer.set_adapter(name)
    try:
        yield
    finally:
        transformer.enable_adapters()
        transformer.set_adapter(previous)


def parse_teachers(spec: str) -> dict[str, Path]:
    """'ocr=a.safetensors,geneval.safetensors' -> {task: path}; a bare path's file stem is its task."""
    teachers = {}
    for item in filter(None, spec.split(",")):
        task, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
        if task in teachers:
            raise ValueError(f"--teachers: task {task!r} given twice")
        teachers[task] = Path(path)
    return teachers


def load_teachers(transformer, teachers: dict[str, Path], lora_alpha: float | None = None) -> dict[str, str]:
    """Load each task's teacher LoRA as frozen adapter 'teacher_<task>'.  -> {task: adapter name}"""
    routes = {}
    for task, path in teachers.items():
        add_adapter(transformer, load_lora(path, lora_alpha), f"teacher_{task}", str(path))
        routes[task] = f"teacher_{task}"
    return routes


def route(tasks: list[str], routes: dict[str, str]) -> list[str]:
    """Hard routing: the adapter that labels each sample.  tasks: [B] -> adapter names [B]"""
    return [routes[task] for task in tasks]


@torch.no_grad()
def target_velocities(base, adapters: list, x, sigma, cond: Condition, image, guidance: float,
                      chunk: int) -> torch.Tensor:
    """Guided velocity (base.velocity) of each row's adapter at the row's state, one pass per adapter present,
    `chunk` rows a forward.
    A row is one image at one stored state (rows may mix states and images).

    adapters: [R] adapter names (or BASE); x: [R, C, H, W]; sigma: [R]; cond: [B] prompts; image: [R] long, the
    row's prompt in cond  -> float32 [R, C, H, W]
    """
    velocity = torch.empty_like(x, dtype=torch.float32)
    for name in dict.fromkeys(adapters):                                       # each adapter once, in order
        rows = torch.tensor([r for r, a in enumerate(adapters) if a == name], device=x.device)
        with use_adapter(base.transformer, name):
            for part in rows.split(chunk):
                velocity[part] = base.velocity(x[part], sigma[part], cond[image[part]], guidance)
    return velocity


@torch.no_grad()
def teacher_samples(base, adapters: list, x0, sigmas, cond: Condition, guidance: float) -> torch.Tensor:
    """ODE samples of each sample's adapter (the SFT cold start's data), one pass per adapter present.
    adapters: [B]; x0: [B, C, H, W] noise at sigma = 1 -> float32 [B, C, H, W] at sigma = 0"""
    samples = torch.empty_like(x0, dtype=torch.float32)
    for name in dict.fromkeys(adapters):
        rows = torch.tensor([i for i, a in enumerate(adapters) if a == name], device=x0.device)
        with use_adapter(base.transformer, name):
            samples[rows] = sample_ode(partial(base.velocity, guidance=guidance), cond[rows], x0[rows], sigmas)
    return samples
