"""LoRA files, and the cold-start merge of several teacher LoRAs into one student initialisation.

A LoRA on module m adds  dW_m = (alpha / r) * B_m @ A_m  to its weight (A_m: [r, in], B_m: [out, r]);
s = alpha / r is its scale. Teachers k = 1..K, weights w_k >= 0, normalised to sum 1 by `merge`.

Cold start (Flow-OPD "merge init", DESIGN 3.6), three methods:
    ab-mean     the authors' merge: A = sum_k w_k A_k, B = sum_k w_k B_k, separately (same r and alpha).
                dW = s (sum_k w_k B_k)(sum_l w_l A_l) = sum_k w_k^2 dW_k + s sum_{k != l} w_k w_l B_k A_l:
                NOT the mean of the deltas. The own terms get w_k^2 (1/4 each for two equal weights) and the
                cross terms B_k A_l pair factors of unrelated LoRAs (noise). It equals peft's
                add_weighted_adapter(combination_type="linear") with weights v_k = w_k^2: for v_k s_k >= 0 peft
                builds A' = sum_k sqrt(v_k s_k) A_k, B' = sum_k sqrt(v_k s_k) B_k with alpha' = r' = r (scale 1),
                so with one scale s: A' = sqrt(s) A, B' = sqrt(s) B and B'A' = s B A, the same dW (tested).
    delta-mean  exact task arithmetic dW = sum_k w_k dW_k, written exactly by concatenating ranks:
                A = cat_k(w_k (s_k / s) A_k) [sum r_k, in], B = cat_k(B_k) [out, sum r_k], alpha = s * sum r_k,
                s = the first input's scale (inputs may differ in rank and alpha). `rank` compresses it to the
                best rank-r approximation (Eckart-Young), via the factors: B = Q_b R_b, A^T = Q_a R_a (QR),
                R_b R_a^T = U S V^T (SVD of a [sum r_k]^2 core), dW_r = s (Q_b U_r sqrt S_r)(sqrt S_r V_r^T Q_a^T).
    ties        TIES-Merging (Yadav et al. 2023) of the deltas dW_k, per module: trim each to its top `density`
                fraction by magnitude (default 0.2, the paper's top-20%), elect the sign
                gamma = sign(sum_k w_k trim(dW_k)), disjoint mean over the teachers that agree with gamma:
                dW = sum_{k agrees} w_k trim(dW_k) / sum_{k agrees} w_k (equal weights: the paper's mean).
                The result is dense, so it is compressed to `rank` (default: the largest input rank) by an SVD.
    Compression reports the relative Frobenius error ||dW - dW_r|| / ||dW|| per module and overall
    (sqrt of summed squared residuals over summed squared norms). All math in float32; SVDs on the GPU if present.

Deviations: the authors' merge script averages A and B separately (our `ab-mean`, kept to reproduce the
paper; the default); `delta-mean` and `ties` are ours. Our TIES trims per module (the TIES paper trims the
whole flattened task vector at once) and its weighted disjoint mean divides by the agreeing weights (peft's
`ties` divides the weighted sum by the agreeing count: with weights 1/K it is ours / K).

Formats read (all return the same `LoRA` record, module names as in the transformer):
    peft:      `base_model.model.<module>.lora_A.weight`, a .safetensors file or a folder holding
               adapter_model.safetensors + adapter_config.json (the published Flow-GRPO LoRAs)
    diffusers: `transformer.<module>.lora_A.weight`, alpha from the `lora_adapter_metadata` header
Rank comes from the shapes; alpha from adapter_config.json (beside the file or in the folder), else the
safetensors metadata, else the caller's `lora_alpha`, else a clear error (never a silent alpha = r).
Format written (our checkpoints): diffusers keys + `lora_adapter_metadata` (r, lora_alpha, target
modules), so `StableDiffusion3Pipeline.load_lora_weights` loads them at the right scale; written to a
temporary file and renamed. `train.py --init_lora merged.safetensors` starts the student from it.

Demo: python merge_lora.py ocr.safetensors geneval.safetensors --method delta-mean --rank 32 --out merged.safetensors
"""
import argparse
from dataclasses import dataclass
import json
import os
from pathlib import Path
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

METADATA_KEY = "lora_adapter_metadata"   # diffusers' header key for the LoraConfig of a LoRA file
PREFIXES = ("base_model.model.", "transformer.")
METHODS = ("ab-mean", "delta-mean", "ties")
DENSITY = 0.2                            # TIES: fraction of each delta kept (the paper's top-20%)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def save_lora(lora: LoRA, path, note: dict[str, str] | None = None) -> None:
    """Write diffusers keys + lora_adapter_metadata (+ `note`'s string entries), atomically (temporary file, then
    rename)."""
    path = Path(path)
    modules = sorted(lora.A)
    tensors = {}
    for module in modules:
        tensors[f"transformer.{module}.lora_A.weight"] = lora.A[module].detach().float().cpu().contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = lora.B[module].detach().float().cpu().contiguous()
    config = {"transformer.r": lora.rank, "transformer.lora_alpha": lora.alpha,
              "transformer.target_modules": modules}
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, temporary, metadata=(note or {}) | {"format": "pt", METADATA_KEY: json.dumps(config)})
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


# ----------------------------------------------------------------------------------------- merges

def ab_mean(loras: list[LoRA], weights: list[float]) -> LoRA:
    """The authors' merge: A = sum_k w_k A_k, B = sum_k w_k B_k (one r and alpha).  A [r, in], B [out, r]"""
    A = {m: sum(w * lora.A[m].float() for lora, w in zip(loras, weights)) for m in loras[0].A}   # sum_k w_k A_k
    B = {m: sum(w * lora.B[m].float() for lora, w in zip(loras, weights)) for m in loras[0].B}   # sum_k w_k B_k
    return LoRA(A, B, loras[0].alpha)


def delta_mean(loras: list[LoRA], weights: list[float]) -> LoRA:
    """dW = sum_k w_k dW_k exactly, by rank concatenation at the first input's scale s.  rank sum_k r_k"""
    scale = loras[0].scale
    A = {m: torch.cat([w * lora.scale / scale * lora.A[m].float() for lora, w in zip(loras, weights)])
         for m in loras[0].A}                                                    # cat_k(w_k s_k / s A_k)  [sum r_k, in]
    B = {m: torch.cat([lora.B[m].float() for lora in loras], dim=1) for m in loras[0].B}   # cat_k(B_k)  [out, sum r_k]
    return LoRA(A, B, scale * sum(lora.rank for lora in loras))                             # alpha / sum r_k = s


def truncate(U, S, Vh, rank: int, scale: float):
    """dW = scale U diag(S) Vh -> (B, A) with scale B A its best rank-`rank` approximation, (||dW - dW_r||, ||dW||).

    U: [out, m], S: [m] (descending), Vh: [m, in] -> B [out, rank], A [rank, in] (sqrt S on each side), 2 floats
    """
    root = S[:rank].sqrt()                                                       # [rank]
    B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]                         # U_r sqrt(S_r), sqrt(S_r) Vh_r
    return B.cpu(), A.cpu(), (scale * S[rank:].norm().item(), scale * S.norm().item())  # Frobenius norms


def compress(lora: LoRA, rank: int) -> tuple[LoRA, dict]:
    """Best rank-`rank` LoRA (same scale) via QR of the factors and SVD of the small core.  -> (LoRA, residuals)"""
    A, B, residuals = {}, {}, {}
    for m in lora.A:
        Q_b, R_b = torch.linalg.qr(lora.B[m].float().to(DEVICE))                # B = Q_b R_b      [out, R], [R, R]
        Q_a, R_a = torch.linalg.qr(lora.A[m].float().to(DEVICE).T)              # A^T = Q_a R_a    [in, R], [R, R]
        U, S, Vh = torch.linalg.svd(R_b @ R_a.T)                                 # core = U S Vh    [R, R]
        B[m], A[m], residuals[m] = truncate(Q_b @ U, S, Vh @ Q_a.T, rank, lora.scale)    # B A = (Q_b U) S (Vh Q_a^T)
    return LoRA(A, B, lora.scale * rank), residuals


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
    scale, w = loras[0].scale, torch.tensor(weights, device=DEVICE)
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
    if method == "ab-mean" and len({(lora.rank, lora.alpha) for lora in loras}) > 1:
        raise ValueError(f"ab-mean needs one rank and alpha for all inputs (got r, alpha = "
                         f"{[(lora.rank, lora.alpha) for lora in loras]}); use --method delta-mean or ties")
    if rank is not None and method == "ab-mean":
        raise ValueError("--rank applies to delta-mean and ties; ab-mean keeps the inputs' rank")
    limit = min(min(shape) for shape in first.values())
    limit = min(limit, sum(lora.rank for lora in loras)) if method == "delta-mean" else limit
    if rank is not None and not 1 <= rank <= limit:
        raise ValueError(f"--rank {rank} is outside 1..{limit}, the ranks this {method} merge can hold")


def merge(loras: list[LoRA], weights: list[float] | None = None, method: str = "ab-mean", rank: int | None = None,
          density: float = DENSITY, names: list[str] | None = None) -> tuple[LoRA, dict]:
    """Check, normalise the weights to sum 1 (default: equal), merge.  -> (LoRA, residuals; {} when exact)"""
    weights = [1.0] * len(loras) if weights is None else weights
    rank = max(lora.rank for lora in loras) if method == "ties" and rank is None else rank
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
    print(f"{out}: {args.method} of {len(loras)} LoRAs, {len(merged.A)} modules, r={merged.rank}, "
          f"alpha={merged.alpha:g} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
