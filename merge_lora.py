"""LoRA files, and the cold-start merge of several teacher LoRAs into one student initialisation.

A LoRA on module m adds  dW_m = (alpha / r) * B_m @ A_m  to its weight (A_m: [r, in], B_m: [out, r]).

Formats read (all return the same `LoRA` record, module names as in the transformer):
    peft:      `base_model.model.<module>.lora_A.weight`, a .safetensors file or a folder holding
               adapter_model.safetensors + adapter_config.json (the published Flow-GRPO LoRAs)
    diffusers: `transformer.<module>.lora_A.weight`, alpha from the `lora_adapter_metadata` header
Rank comes from the shapes; alpha from adapter_config.json (beside the file or in the folder), else the
safetensors metadata, else the caller's `lora_alpha`, else a clear error (never a silent alpha = r).
Format written (our checkpoints): diffusers keys + `lora_adapter_metadata` (r, lora_alpha, target
modules), so `StableDiffusion3Pipeline.load_lora_weights` loads them at the right scale; written to a
temporary file and renamed.

Demo: python -c "import merge_lora as m; l = m.load_lora('toy/ocr.safetensors'); print(l.rank, l.alpha, len(l.A))"
"""
from dataclasses import dataclass
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

METADATA_KEY = "lora_adapter_metadata"   # diffusers' header key for the LoraConfig of a LoRA file
PREFIXES = ("base_model.model.", "transformer.")


@dataclass
class LoRA:
    """One LoRA: per module A [r, in] and B [out, r], one rank r and one alpha (scale = alpha / r)."""
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    alpha: float

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> torch.Tensor:
        """dW = (alpha / r) B A, in float32.  [out, in]"""
        return self.scale * self.B[module].float() @ self.A[module].float()


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the fix."""


def load_lora(path, lora_alpha: float | None = None) -> LoRA:
    """Read a peft or diffusers LoRA (file or folder) into a LoRA record."""
    path = Path(path)
    weights_file = path / "adapter_model.safetensors" if path.is_dir() else path
    if not weights_file.is_file():
        raise LoRAFileError(f"LoRA not found: {weights_file} (give a .safetensors file or a peft folder)")
    try:
        tensors = load_file(weights_file)
        with safe_open(weights_file, "pt") as f:
            header = f.metadata() or {}
    except Exception as error:                                                  # truncated, not safetensors
        raise LoRAFileError(f"cannot read LoRA {weights_file}: {error}") from None
    A, B = _split_lora_keys(tensors, weights_file)
    ranks = {a.shape[0] for a in A.values()}
    if len(ranks) != 1:
        raise LoRAFileError(f"{weights_file}: modules have different ranks {sorted(ranks)}; one rank per file is supported")
    alpha = _read_alpha(weights_file, header) or lora_alpha
    if alpha is None:
        raise LoRAFileError(f"{weights_file}: no lora_alpha in adapter_config.json or metadata; pass --lora_alpha")
    return LoRA(A, B, float(alpha))


def _split_lora_keys(tensors: dict, source) -> tuple[dict, dict]:
    """`<prefix><module>.lora_{A,B}.weight` -> ({module: A}, {module: B})."""
    A, B = {}, {}
    for key, tensor in tensors.items():
        name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), None)
        if name is None or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LoRAFileError(f"{source}: unexpected key {key!r} (expected peft 'base_model.model.<module>.lora_A.weight' "
                                "or diffusers 'transformer.<module>.lora_A.weight')")
        module, part = name[: -len(".lora_A.weight")], name[-len("A.weight")]
        (A if part == "A" else B)[module] = tensor
    if not A or A.keys() != B.keys():
        raise LoRAFileError(f"{source}: lora_A and lora_B keys do not pair up ({len(A)} A, {len(B)} B)")
    return A, B


def _read_alpha(weights_file: Path, header: dict) -> float | None:
    """lora_alpha from adapter_config.json beside the weights, else the diffusers metadata header."""
    config_file = weights_file.parent / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_rslora"):
            raise LoRAFileError(f"{config_file}: alpha_pattern/rank_pattern/use_rslora are not supported")
        return config["lora_alpha"]
    if METADATA_KEY in header:
        return json.loads(header[METADATA_KEY])["transformer.lora_alpha"]
    return None


def save_lora(lora: LoRA, path) -> None:
    """Write diffusers keys + lora_adapter_metadata, atomically (temporary file, then rename)."""
    path = Path(path)
    modules = sorted(lora.A)
    tensors = {}
    for module in modules:
        tensors[f"transformer.{module}.lora_A.weight"] = lora.A[module].detach().float().cpu().contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = lora.B[module].detach().float().cpu().contiguous()
    config = {"transformer.r": lora.rank, "transformer.lora_alpha": lora.alpha,
              "transformer.target_modules": modules}
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, temporary, metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
    os.replace(temporary, path)


def lora_from_adapter(transformer, adapter: str) -> LoRA:
    """Read adapter `adapter` of a peft-injected transformer back into a LoRA record (fp32 copies)."""
    A, B, alphas = {}, {}, set()
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            A[name] = module.lora_A[adapter].weight.detach().float().cpu().clone()
            B[name] = module.lora_B[adapter].weight.detach().float().cpu().clone()
            alphas.add(module.lora_alpha[adapter])
    assert A and len(alphas) == 1, f"adapter {adapter!r}: {len(A)} modules, alphas {alphas}"
    return LoRA(A, B, float(alphas.pop()))
