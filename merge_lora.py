"""LoRA files, and the cold-start merge of several teacher LoRAs into one student initialisation.

A LoRA on module m adds  dW_m = (alpha_m / r_m) * B_m @ A_m  to its weight (A_m: [r_m, in], B_m: [out, r_m]);
s_m = alpha_m / r_m is its scale. Rank and alpha may differ per module (peft's rank_pattern / alpha_pattern);
most files have one r and one alpha. Teachers k = 1..K, weights w_k >= 0, normalised to sum 1 by `merge`.

Cold start (Flow-OPD "merge init", docs/method.md section 9), three methods:
    ab-mean     the authors' merge: A = sum_k w_k A_k, B = sum_k w_k B_k, separately, module by module; each
                module needs the same r_m and alpha_m in every input (else refused, naming the module).
                dW = s (sum_k w_k B_k)(sum_l w_l A_l) = sum_k w_k^2 dW_k + s sum_{k != l} w_k w_l B_k A_l:
                NOT the mean of the deltas. The own terms get w_k^2 (1/4 each for two equal weights) and the
                cross terms B_k A_l pair factors of unrelated LoRAs (noise). It equals peft's
                add_weighted_adapter(combination_type="linear") with weights v_k = w_k^2: for v_k s_k >= 0 peft
                builds A' = sum_k sqrt(v_k s_k) A_k, B' = sum_k sqrt(v_k s_k) B_k with alpha' = r' = r (scale 1),
                so with one scale s: A' = sqrt(s) A, B' = sqrt(s) B and B'A' = s B A, the same dW (tested).
    delta-mean  exact task arithmetic dW = sum_k w_k dW_k, written exactly by concatenating ranks:
                A = cat_k(w_k (s_k / s) A_k) [sum r_k, in], B = cat_k(B_k) [out, sum r_k], alpha = s * sum r_k
                per module, s = the first input's scale (of its first module; inputs and modules may differ in
                rank and alpha, so module ranks sum_k r_km may differ too). `rank` compresses it to the
                best rank-r approximation (Eckart-Young), via the factors: B = Q_b R_b, A^T = Q_a R_a (QR),
                R_b R_a^T = U S V^T (SVD of a [sum r_k]^2 core), dW_r = s (Q_b U_r sqrt S_r)(sqrt S_r V_r^T Q_a^T).
    ties        TIES-Merging (Yadav et al. 2023) of the deltas dW_k, per module: trim each to its top `density`
                fraction by magnitude (default 0.2, the paper's top-20%), elect the sign
                gamma = sign(sum_k w_k trim(dW_k)), disjoint mean over the teachers that agree with gamma:
                dW = sum_{k agrees} w_k trim(dW_k) / sum_{k agrees} w_k (equal weights: the paper's mean).
                The result is dense, so it is compressed to `rank` (default: the largest input rank) by an SVD.
    Compressed outputs (delta-mean with `rank`, ties) have one rank and one alpha = s * rank for every module.
    Compression reports the relative Frobenius error ||dW - dW_r|| / ||dW|| per module and overall
    (sqrt of summed squared residuals over summed squared norms). All math in float32; SVDs on the GPU if present.

Deviations: the authors' merge script averages A and B separately (our `ab-mean`, kept to reproduce the
paper; the default); `delta-mean` and `ties` are ours. Our TIES trims per module (the TIES paper trims the
whole flattened task vector at once) and its weighted disjoint mean divides by the agreeing weights (peft's
`ties` divides the weighted sum by the agreeing count: with weights 1/K it is ours / K).

Formats read (all return the same `LoRA` record, module names as in the transformer):
    peft:      `base_model.model.<module>.lora_A.weight`, a .safetensors file or a folder holding
               adapter_model.safetensors + adapter_config.json (the published Flow-GRPO LoRAs)
    diffusers: `transformer.<module>.lora_A.weight`, alpha from the `lora_adapter_metadata` header (what
               `StableDiffusion3Pipeline.save_lora_weights` writes when given the adapter's LoraConfig)
Ranks come from the shapes. Alphas come from the first config found: adapter_config.json (beside the file or in
the folder), else the `lora_adapter_metadata` header ('transformer.' fields), else flat `lora_alpha` (and `r`)
header entries, else the caller's `lora_alpha`, else a clear error (never a silent alpha = r). A config's
rank_pattern / alpha_pattern are matched to modules by peft's own rule (peft.utils.other.get_pattern_key), and
every rank it implies must be the rank of the weights. use_rslora and DoRA files are refused.
Not read: kohya-style SD3 keys (`lora_unet_<module>.lora_down.weight`, `lora_up`, `.alpha`). diffusers 0.42.1 has
no converter for them (lora_conversion_utils converts kohya keys for SD 1.x/XL, Flux and others, and
`StableDiffusion3Pipeline.lora_state_dict` converts nothing), so they are refused with that reason; convert such
a file to diffusers or peft keys with the tool that made it.
Families: the files carry no base; `lora_family` tells SD3 from FLUX by module names (teachers.check_fits refuses a
LoRA of one family on a base of the other, naming both). The merge takes no base: inputs of two families target
different modules and are refused as such (check_inputs).
Format written (our checkpoints): diffusers keys + `lora_adapter_metadata` (peft LoraConfig fields: r, lora_alpha,
target modules, and rank_pattern / alpha_pattern keyed '^<module>' where modules differ), so
`StableDiffusion3Pipeline.load_lora_weights` loads them at the right scale; written to a temporary file, synced and
renamed, with the umask's mode (0644 under umask 022; safetensors' own save_file gives 0600).
`train.py --init_lora merged.safetensors` starts the student from it.

Demo: python merge_lora.py ocr.safetensors geneval.safetensors --method delta-mean --rank 32 --out merged.safetensors
"""
import argparse
from collections import Counter
from dataclasses import dataclass
import json
import os
from pathlib import Path
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

METADATA_KEY = "lora_adapter_metadata"   # diffusers' header key for the LoraConfig of a LoRA file
PREFIXES = ("base_model.model.", "transformer.")
METHODS = ("ab-mean", "delta-mean", "ties")
DENSITY = 0.2                            # TIES: fraction of each delta kept (the paper's top-20%)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoRA:
    """One LoRA: per module m, A_m [r_m, in] and B_m [out, r_m] (the rank r_m from the shapes) and alpha_m, one float
    for every module or a {module: alpha_m} dict (peft's alpha_pattern, resolved); scale s_m = alpha_m / r_m."""
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    alpha: float | dict[str, float]

    def rank_of(self, module: str) -> int:
        return self.A[module].shape[0]

    def alpha_of(self, module: str) -> float:
        return self.alpha[module] if isinstance(self.alpha, dict) else self.alpha

    def scale_of(self, module: str) -> float:
        return self.alpha_of(module) / self.rank_of(module)                    # s_m = alpha_m / r_m

    @property
    def ranks(self) -> dict[str, int]:
        return {m: self.rank_of(m) for m in self.A}

    @property
    def alphas(self) -> dict[str, float]:
        return {m: self.alpha_of(m) for m in self.A}

    @property
    def scales(self) -> dict[str, float]:
        return {m: self.scale_of(m) for m in self.A}

    @property
    def rank(self) -> int:
        """peft's `r`: the most common rank (the others go to rank_pattern); THE rank when all modules share one."""
        return Counter(self.ranks.values()).most_common(1)[0][0]

    def delta(self, module: str) -> torch.Tensor:
        """dW = (alpha_m / r_m) B_m A_m, in float32.  [out, in]"""
        return self.scale_of(module) * self.B[module].float() @ self.A[module].float()


def one_or_per_module(values: dict[str, float]) -> float | dict[str, float]:
    """{module: alpha_m} -> the one alpha when all are equal, else the dict (LoRA.alpha's two forms)."""
    return next(iter(values.values())) if len(set(values.values())) == 1 else values


def lora_config(lora: LoRA) -> dict:
    """peft LoraConfig fields of `lora`: r, lora_alpha the most common rank and alpha; rank_pattern, alpha_pattern
    the modules that differ, keyed '^<module>' (anchored at the start, as diffusers writes them)."""
    r, alpha = lora.rank, Counter(lora.alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(lora.A),
            "rank_pattern": {f"^{m}": r_m for m, r_m in lora.ranks.items() if r_m != r},
            "alpha_pattern": {f"^{m}": a_m for m, a_m in lora.alphas.items() if a_m != alpha}}


TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "SD3", "FluxTransformer2DModel": "FLUX"}   # diffusers class -> family


def lora_family(modules) -> str | None:
    """The model family a LoRA's module names point to: FLUX when it adapts a single-stream block
    (`single_transformer_blocks.*`: FLUX alone has them, and Flow-GRPO's FLUX targets attn.to_q/k/v reach them); SD3
    when it adapts joint blocks only (`transformer_blocks.*`, SD3's MMDiT blocks; FLUX's double-stream blocks share
    those names, so a FLUX LoRA on them alone reads as SD3: teachers.check_fits uses this only to word the refusal of
    a LoRA that does not fit the base); None for anything else (another model)."""
    modules = list(modules)
    if any(m.startswith("single_transformer_blocks.") for m in modules):
        return "FLUX"
    if modules and all(m.startswith("transformer_blocks.") for m in modules):
        return "SD3"
    return None


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the fix."""


def load_lora(path, lora_alpha: float | None = None) -> LoRA:
    """Read a peft or diffusers LoRA (file or folder) into a LoRA record, with per-module ranks and alphas."""
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
    ranks = {m: a.shape[0] for m, a in A.items()}
    config, source = _read_config(weights_file, header)
    if config is None or config.get("lora_alpha") is None:
        if lora_alpha is None:
            raise LoRAFileError(f"{weights_file}: no lora_alpha in adapter_config.json or metadata; pass --lora_alpha")
        config, source = (config or {}) | {"lora_alpha": lora_alpha}, f"{source or weights_file} and --lora_alpha"
    return LoRA(A, B, one_or_per_module(_module_alphas(config, ranks, source)))


def _split_lora_keys(tensors: dict, source) -> tuple[dict, dict]:
    """`<prefix><module>.lora_{A,B}.weight` -> ({module: A}, {module: B})."""
    A, B = {}, {}
    for key, tensor in tensors.items():
        if key.startswith(("lora_unet_", "lora_te")) or ".lora_down." in key or ".lora_up." in key:
            raise LoRAFileError(f"{source}: kohya-style key {key!r} is not supported (diffusers 0.42.1 has no "
                                "converter for kohya SD3 LoRAs); convert the file to peft or diffusers keys")
        name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), None)
        if name is None or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LoRAFileError(f"{source}: unexpected key {key!r} (expected peft 'base_model.model.<module>.lora_A.weight' "
                                "or diffusers 'transformer.<module>.lora_A.weight')")
        module, part = name[: -len(".lora_A.weight")], name[-len("A.weight")]
        (A if part == "A" else B)[module] = tensor
    if not A or A.keys() != B.keys():
        raise LoRAFileError(f"{source}: lora_A and lora_B keys do not pair up ({len(A)} A, {len(B)} B)")
    for module, a in A.items():
        if a.ndim != 2 or B[module].ndim != 2 or B[module].shape[1] != a.shape[0]:
            raise LoRAFileError(f"{source}: {module} has lora_A {list(a.shape)} and lora_B {list(B[module].shape)}, "
                                "not [r, in] and [out, r]")
    return A, B


def _read_config(weights_file: Path, header: dict) -> tuple[dict | None, str]:
    """The peft LoraConfig fields of a LoRA file and where they were read: adapter_config.json beside the weights,
    else the diffusers header (`lora_adapter_metadata`, keys 'transformer.<field>'), else flat header entries
    `lora_alpha` (and `r`)."""
    config_file = weights_file.parent / "adapter_config.json"
    try:
        if config_file.is_file():
            return json.loads(config_file.read_text()), str(config_file)
        if METADATA_KEY in header:
            fields = json.loads(header[METADATA_KEY])
            return ({k[len("transformer."):]: v for k, v in fields.items() if k.startswith("transformer.")},
                    f"{weights_file} metadata {METADATA_KEY}")
        if "lora_alpha" in header:
            return ({"lora_alpha": float(header["lora_alpha"])} | ({"r": int(header["r"])} if "r" in header else {}),
                    f"{weights_file} metadata")
    except ValueError as error:                                                 # bad JSON or number
        raise LoRAFileError(f"{weights_file}: cannot read its LoRA config: {error}") from None
    return None, ""


def _module_alphas(config: dict, ranks: dict[str, int], source: str) -> dict[str, float]:
    """alpha_m of every module from peft LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern); each r_m the
    config implies must be the one the weights have."""
    if config.get("use_rslora") or config.get("use_dora"):
        raise LoRAFileError(f"{source}: use_rslora / use_dora LoRAs are not supported; give a plain LoRA")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    alphas = {}
    for m, r_m in ranks.items():
        expected = _pattern_value(rank_pattern, m, config.get("r", r_m))
        if expected != r_m:
            raise LoRAFileError(f"{source}: module {m} has rank {r_m} in the weights but r = {expected} in the config "
                                "(a config of another LoRA?)")
        alphas[m] = float(_pattern_value(alpha_pattern, m, config["lora_alpha"]))
    return alphas


def _pattern_value(pattern: dict, module: str, default):
    """The value a peft rank_pattern / alpha_pattern gives `module`, by peft's own rule (get_pattern_key: the first
    key that matches the name's end at a dot); peft is imported only for a pattern (it takes seconds)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key
    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def save_lora(lora: LoRA, path, note: dict[str, str] | None = None) -> None:
    """Write diffusers keys + lora_adapter_metadata (the peft LoraConfig fields, patterns included) + `note`'s string
    entries, atomically (temporary file, fsync, rename), with the mode any file gets under the umask (safetensors'
    save_file gives 0600)."""
    path = Path(path)
    tensors = {}
    for module in sorted(lora.A):
        tensors[f"transformer.{module}.lora_A.weight"] = lora.A[module].detach().float().cpu().contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = lora.B[module].detach().float().cpu().contiguous()
    config = {f"transformer.{k}": v for k, v in lora_config(lora).items()}
    data = save(tensors, metadata=(note or {}) | {"format": "pt", METADATA_KEY: json.dumps(config)})
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def lora_from_adapter(transformer, adapter: str) -> LoRA:
    """Read adapter `adapter` of a peft-injected transformer back into a LoRA record (fp32 copies)."""
    A, B, alphas = {}, {}, {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            A[name] = module.lora_A[adapter].weight.detach().float().cpu().clone()
            B[name] = module.lora_B[adapter].weight.detach().float().cpu().clone()
            alphas[name] = float(module.lora_alpha[adapter])
    assert A, f"adapter {adapter!r}: no modules"
    return LoRA(A, B, one_or_per_module(alphas))


# ----------------------------------------------------------------------------------------- merges

def ab_mean(loras: list[LoRA], weights: list[float]) -> LoRA:
    """The authors' merge: A = sum_k w_k A_k, B = sum_k w_k B_k (one r_m, alpha_m per module).  A [r, in], B [out, r]"""
    A = {m: sum(w * lora.A[m].float() for lora, w in zip(loras, weights)) for m in loras[0].A}   # sum_k w_k A_k
    B = {m: sum(w * lora.B[m].float() for lora, w in zip(loras, weights)) for m in loras[0].B}   # sum_k w_k B_k
    return LoRA(A, B, loras[0].alpha)


def reference_scale(loras: list[LoRA]) -> float:
    """s, the one scale of a merge's output: the first input's scale (of its first module)."""
    return loras[0].scale_of(next(iter(loras[0].A)))


def delta_mean(loras: list[LoRA], weights: list[float]) -> LoRA:
    """dW = sum_k w_k dW_k exactly, by rank concatenation at one scale s.  module m: rank sum_k r_km"""
    s = reference_scale(loras)
    A = {m: torch.cat([w * lora.scale_of(m) / s * lora.A[m].float() for lora, w in zip(loras, weights)])
         for m in loras[0].A}                                                 # cat_k(w_k s_km / s A_km)  [sum r_km, in]
    B = {m: torch.cat([lora.B[m].float() for lora in loras], dim=1) for m in loras[0].B}  # cat_k(B_km) [out, sum r_km]
    return LoRA(A, B, one_or_per_module({m: s * a.shape[0] for m, a in A.items()}))       # alpha_m / sum_k r_km = s


def truncate(U, S, Vh, rank: int, scale: float):
    """dW = scale U diag(S) Vh -> (B, A) with scale B A its best rank-`rank` approximation, (||dW - dW_r||, ||dW||).

    U: [out, m], S: [m] (descending), Vh: [m, in] -> B [out, rank], A [rank, in] (sqrt S on each side), 2 floats
    """
    root = S[:rank].sqrt()                                                       # [rank]
    B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]                         # U_r sqrt(S_r), sqrt(S_r) Vh_r
    return B.cpu(), A.cpu(), (scale * S[rank:].norm().item(), scale * S.norm().item())  # Frobenius norms


def compress(lora: LoRA, rank: int) -> tuple[LoRA, dict]:
    """Best rank-`rank` LoRA at one scale s via QR of the factors and SVD of the small core.  -> (LoRA, residuals)"""
    s, A, B, residuals = reference_scale([lora]), {}, {}, {}
    for m in lora.A:
        Q_b, R_b = torch.linalg.qr(lora.B[m].float().to(DEVICE))                # B = Q_b R_b      [out, R], [R, R]
        Q_a, R_a = torch.linalg.qr(lora.A[m].float().to(DEVICE).T)              # A^T = Q_a R_a    [in, R], [R, R]
        U, S, Vh = torch.linalg.svd(R_b @ R_a.T)                                 # core = U S Vh    [R, R]
        S = S * (lora.scale_of(m) / s)                                           # dW_m = s (Q_b U) S' (Vh Q_a^T)
        B[m], A[m], residuals[m] = truncate(Q_b @ U, S, Vh @ Q_a.T, rank, s)
    return LoRA(A, B, s * rank), residuals


def ties_delta(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-Merging: trim, elect sign, weighted disjoint mean.  deltas: [K, out, in], weights: [K] -> [out, in]"""
    flat = deltas.abs().flatten(1)                                               # [K, N]
    keep = max(1, int(density * flat.shape[1]))                                  # entries kept per delta
    threshold = flat.kthvalue(flat.shape[1] - keep + 1, dim=1).values            # [K] keep-th largest |dW_k|
    trimmed = deltas * (deltas.abs() >= threshold[:, None, None])                # trim(dW_k), threshold ties kept
    w = weights[:, None, None]                                                   # [K, 1, 1]
    gamma = (w * trimmed).sum(0).sign()                                          # sign(sum_k w_k trim(dW_k))  [out, in]
    agree = trimmed.sign() == gamma                                              # [K, out, in] (gamma = 0: result 0)
    return (w * trimmed * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-30)    # sum_agree w_k trim / sum_agree w_k


def ties(loras: list[LoRA], weights: list[float], rank: int, density: float = DENSITY) -> tuple[LoRA, dict]:
    """TIES-Merging of the deltas, each module's result compressed to `rank` by SVD.  -> (LoRA, residuals)"""
    scale, w = reference_scale(loras), torch.tensor(weights, device=DEVICE)
    A, B, residuals = {}, {}, {}
    for m in loras[0].A:
        deltas = torch.stack([lora.delta(m) for lora in loras]).to(DEVICE)      # [K, out, in]
        U, S, Vh = torch.linalg.svd(ties_delta(deltas, w, density) / scale, full_matrices=False)
        B[m], A[m], residuals[m] = truncate(U, S, Vh, rank, scale)
    return LoRA(A, B, scale * rank), residuals


def relative_error(residuals: dict) -> float:
    """Overall ||dW - dW_r||_F / ||dW||_F over all modules.  residuals: {module: (residual, norm)}"""
    residual = sum(r ** 2 for r, _ in residuals.values()) ** 0.5                # sqrt(sum_m ||dW_m - dW_m,r||^2)
    norm = sum(n ** 2 for _, n in residuals.values()) ** 0.5                    # sqrt(sum_m ||dW_m||^2)
    return residual / max(norm, 1e-30)


def check_inputs(loras: list[LoRA], names: list[str], weights: list[float], method: str, rank: int | None,
                 density: float) -> None:
    """Refuse, with a one-line reason, inputs that `method` cannot merge."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if not 0 < density <= 1:
        raise ValueError(f"--density {density} must be in (0, 1]")
    if len(weights) != len(loras) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"give {len(loras)} non-negative weights with a positive sum, one per input (got {weights})")
    first = {m: (loras[0].B[m].shape[0], a.shape[1]) for m, a in loras[0].A.items()}        # {module: (out, in)}
    for lora, name in zip(loras[1:], names[1:]):
        if lora.A.keys() != first.keys():
            odd = sorted(lora.A.keys() ^ first.keys())
            raise ValueError(f"{name} and {names[0]} target different modules ({len(odd)} differ, e.g. {odd[0]}); "
                             "inputs must share target modules")
        for m, shape in first.items():
            if (lora.B[m].shape[0], lora.A[m].shape[1]) != shape:
                raise ValueError(f"{name}: module {m} is [out, in] = {[lora.B[m].shape[0], lora.A[m].shape[1]]}, "
                                 f"{names[0]} has {list(shape)} (LoRAs for different models?)")
    if method == "ab-mean":
        for lora, name in zip(loras[1:], names[1:]):
            for m in first:
                want, got = (loras[0].rank_of(m), loras[0].alpha_of(m)), (lora.rank_of(m), lora.alpha_of(m))
                if got != want:
                    raise ValueError(f"ab-mean needs one rank and alpha per module in all inputs: {m} has r, alpha = "
                                     f"{want[0]}, {want[1]:g} in {names[0]} but {got[0]}, {got[1]:g} in {name}; "
                                     "use --method delta-mean or ties")
    if rank is not None and method == "ab-mean":
        raise ValueError("--rank applies to delta-mean and ties; ab-mean keeps the inputs' rank")
    limit = min(min(shape) for shape in first.values())
    if method == "delta-mean":
        limit = min(limit, min(sum(lora.rank_of(m) for lora in loras) for m in first))   # min_m sum_k r_km
    if rank is not None and not 1 <= rank <= limit:
        raise ValueError(f"--rank {rank} is outside 1..{limit}, the ranks this {method} merge can hold")


def merge(loras: list[LoRA], weights: list[float] | None = None, method: str = "ab-mean", rank: int | None = None,
          density: float = DENSITY, names: list[str] | None = None) -> tuple[LoRA, dict]:
    """Check, normalise the weights to sum 1 (default: equal), merge.  -> (LoRA, residuals; {} when exact)"""
    weights = [1.0] * len(loras) if weights is None else weights
    rank = max(max(lora.ranks.values()) for lora in loras) if method == "ties" and rank is None else rank
    check_inputs(loras, names or [f"input {k}" for k in range(len(loras))], weights, method, rank, density)
    weights = [w / sum(weights) for w in weights]                               # sum_k w_k = 1
    if method == "ab-mean":
        return ab_mean(loras, weights), {}
    if method == "ties":
        return ties(loras, weights, rank, density)
    merged = delta_mean(loras, weights)
    return compress(merged, rank) if rank else (merged, {})


# ----------------------------------------------------------------------------------------- CLI

class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `merge_lora.py: error: ...` on stderr, exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="merge_lora.py", description="Merge teacher LoRAs into one cold-start LoRA.")
    parser.add_argument("inputs", nargs="+", help="LoRA files (.safetensors, peft or diffusers keys) or peft folders")
    parser.add_argument("--method", choices=METHODS, default="ab-mean", help="(default %(default)s)")
    parser.add_argument("--weights", default="", help="comma-separated, one per input, normalised to sum 1 "
                        "(default equal)")
    parser.add_argument("--rank", type=int, default=None, help="delta-mean: SVD-compress to this rank; ties: output "
                        "rank (default the largest input rank)")
    parser.add_argument("--density", type=float, default=DENSITY, help="ties: fraction of each delta kept "
                        "(default %(default)s)")
    parser.add_argument("--lora_alpha", type=float, default=None, help="alpha for inputs that carry none")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        parser.error(f"--weights {args.weights!r}: give comma-separated numbers")
    for path in map(Path, args.inputs):
        if out.resolve() in (path.resolve(), (path / "adapter_model.safetensors").resolve()):
            parser.error(f"--out {out} is an input; write the merge to a new file")
    if not out.parent.is_dir():
        parser.error(f"--out {out}: folder {out.parent} does not exist")
    # Many small ops: on 2 cores one thread is about as fast as two, and ~100x faster while other jobs hold the cores
    # (OpenMP threads spin-wait for a descheduled peer); see bench_merge.py.
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        loras = [load_lora(path, args.lora_alpha) for path in args.inputs]
        merged, residuals = merge(loras, weights, args.method, args.rank, args.density, names=args.inputs)
    except ValueError as error:                                                  # LoRAFileError is a ValueError
        parser.error(str(error))
    for m, (residual, norm) in residuals.items():
        print(f"{m:48s} relative error {residual / max(norm, 1e-30):.4f}")
    if residuals:
        print(f"overall relative Frobenius error {relative_error(residuals):.4f}")
    save_lora(merged, out)
    config = lora_config(merged)
    odd = len(config["rank_pattern"] | config["alpha_pattern"])                # modules of another rank or alpha
    print(f"{out}: {args.method} of {len(loras)} LoRAs, {len(merged.A)} modules, r={config['r']}, "
          f"alpha={config['lora_alpha']:g}{f' ({odd} modules differ: rank/alpha_pattern)' if odd else ''} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
