"""Cold-start merges (ab-mean, delta-mean, ties): parity with peft, closed forms, formats, CLI bad input."""
import copy
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.merge_utils import ties as peft_ties
from safetensors.torch import save_file

from conftest import ROOT, random_lora, write_peft
import merge_lora
from merge_lora import LoRA, compress, load_lora, merge, relative_error, save_lora, ties_delta
from teachers import add_adapter


def _peft_model(transformer, loras: dict):
    """A real peft model over a copy of `transformer`, one adapter per LoRA record."""
    model = None
    for name, lora in loras.items():
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=sorted(lora.A))
        if model is None:
            model = get_peft_model(copy.deepcopy(transformer), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        for module in lora.A:
            layer = model.base_model.model.get_submodule(module)
            layer.lora_A[name].weight.data.copy_(lora.A[module])
            layer.lora_B[name].weight.data.copy_(lora.B[module])
    return model


def _weighted_sum(loras, weights, module):
    return sum(w / sum(weights) * lora.delta(module) for lora, w in zip(loras, weights))   # sum_k w_k dW_k


def test_ab_mean_equals_peft_linear_with_squared_weights(sd3_transformer):
    loras, weights = [random_lora(sd3_transformer, 1), random_lora(sd3_transformer, 2)], [1.0, 3.0]
    ours, residuals = merge(loras, weights, "ab-mean")
    w = [x / sum(weights) for x in weights]
    model = _peft_model(sd3_transformer, {"ocr": loras[0], "geneval": loras[1]})
    model.add_weighted_adapter(["ocr", "geneval"], [x ** 2 for x in w], "merged", combination_type="linear")
    assert residuals == {} and (ours.rank, ours.alpha) == (4, 8.0)
    for module in ours.A:
        root = ours.scale_of(module) ** 0.5
        layer = model.base_model.model.get_submodule(module)
        assert layer.scaling["merged"] == 1.0                                   # peft: alpha' = r' = r
        torch.testing.assert_close(layer.lora_A["merged"].weight, root * ours.A[module])   # A' = sqrt(s) A
        torch.testing.assert_close(layer.lora_B["merged"].weight, root * ours.B[module])   # B' = sqrt(s) B
        torch.testing.assert_close(layer.get_delta_weight("merged"), ours.delta(module))
        assert (ours.delta(module) - _weighted_sum(loras, weights, module)).norm() > 0.1 * ours.delta(module).norm()


def test_delta_mean_reproduces_the_weighted_sum_of_deltas_after_peft_merge(sd3_transformer):
    loras, weights = [random_lora(sd3_transformer, 1), random_lora(sd3_transformer, 3, rank=2, alpha=1.0)], [1.0, 3.0]
    merged, residuals = merge(loras, weights, "delta-mean")
    assert residuals == {} and merged.rank == 6 and merged.scales == loras[0].scales
    fused = _peft_model(sd3_transformer, {"merged": merged}).merge_and_unload()
    for module in merged.A:
        expected = sd3_transformer.get_submodule(module).weight + _weighted_sum(loras, weights, module)
        torch.testing.assert_close(fused.get_submodule(module).weight, expected, rtol=0, atol=1e-5)


def test_svd_compression_reports_the_optimal_error_and_is_exact_when_the_rank_fits(sd3_transformer):
    loras = [random_lora(sd3_transformer, 1), random_lora(sd3_transformer, 2)]
    exact, _ = merge(loras, method="delta-mean")
    fits, residuals = merge(loras, method="delta-mean", rank=8)
    assert fits.rank == 8 and fits.scales == exact.scales and relative_error(residuals) < 1e-6
    for module in exact.A:
        torch.testing.assert_close(fits.delta(module), exact.delta(module), rtol=0, atol=1e-5)
    small, residuals = merge(loras, method="delta-mean", rank=3)
    assert small.rank == 3 and small.scales == exact.scales
    for module, (residual, norm) in residuals.items():
        singular = torch.linalg.svdvals(exact.delta(module))                    # Eckart-Young: tail of the spectrum
        torch.testing.assert_close(torch.tensor([residual, norm]), torch.stack([singular[3:].norm(), singular.norm()]))
        torch.testing.assert_close(torch.tensor(residual), (exact.delta(module) - small.delta(module)).norm())
    total = sum(r ** 2 for r, _ in residuals.values()) / sum(n ** 2 for _, n in residuals.values())
    assert 0.1 < relative_error(residuals) == pytest.approx(total ** 0.5)


def test_ties_on_hand_made_deltas():
    deltas = torch.tensor([[[4.0, -1.0], [0.5, 2.0]],          # trimmed to the top 2 of 4: [[4, 0], [0, 2]]
                           [[-3.0, 2.0], [1.0, -6.0]],         # [[-3, 0], [0, -6]]
                           [[1.0, -5.0], [0.2, 3.0]]])         # [[0, -5], [0, 3]]
    equal = ties_delta(deltas, torch.tensor([1 / 3] * 3), density=0.5)
    assert torch.equal(equal, torch.tensor([[4.0, -5.0], [0.0, -6.0]]))   # signs +, -, none, - (2 - 6 + 3 < 0)
    weighted = ties_delta(deltas, torch.tensor([0.5, 0.25, 0.25]), density=0.5)
    expected = torch.tensor([[4.0, -5.0], [0.0, (0.5 * 2 + 0.25 * 3) / 0.75]])    # (1, 1): 1 - 1.5 + .75 > 0
    torch.testing.assert_close(weighted, expected)
    random = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ties_delta(random, torch.ones(3) / 3, 0.3), peft_ties(list(random), torch.ones(3), 0.3))


def test_ties_merge_of_loras_is_exact_at_full_rank(sd3_transformer):
    loras = [random_lora(sd3_transformer, 1), random_lora(sd3_transformer, 3, rank=2, alpha=1.0)]
    merged, residuals = merge(loras, [1.0, 3.0], "ties", rank=16, density=0.3)   # 16 = min(out, in) here
    assert merged.rank == 16 and relative_error(residuals) < 1e-6
    for module in merged.A:
        expected = ties_delta(torch.stack([l.delta(module) for l in loras]), torch.tensor([0.25, 0.75]), 0.3)
        torch.testing.assert_close(merged.delta(module), expected, rtol=0, atol=1e-5)
    assert merge(loras, method="ties")[0].rank == 4                                  # default: the largest input rank


def _patterned(transformer, seed: int) -> LoRA:
    """random_lora with per-module ranks 1, 2, 3 (3 the most common) and alphas 2, 3, 4 (peft's rank_pattern and
    alpha_pattern give such LoRAs)."""
    lora = random_lora(transformer, seed)
    ranks = {m: 1 if i % 4 == 0 else 2 + i % 2 for i, m in enumerate(lora.A)}
    return LoRA({m: a[:ranks[m]] for m, a in lora.A.items()}, {m: b[:, :ranks[m]] for m, b in lora.B.items()},
                {m: 2.0 + i % 3 for i, m in enumerate(lora.A)})


def test_merges_with_per_module_ranks_and_alphas(sd3_transformer, tmp_path):
    one, two = _patterned(sd3_transformer, 1), _patterned(sd3_transformer, 2)
    uniform = random_lora(sd3_transformer, 3, rank=2, alpha=1.0)
    merged, _ = merge([one, two], [1.0, 3.0], "ab-mean")                      # same pattern in both: allowed
    for m in one.A:                                                             # s_m (sum_k w_k B_k)(sum_k w_k A_k)
        expected = one.scale_of(m) * (0.25 * one.B[m] + 0.75 * two.B[m]) @ (0.25 * one.A[m] + 0.75 * two.A[m])
        torch.testing.assert_close(merged.delta(m), expected)
    with pytest.raises(ValueError, match=r"^ab-mean needs one rank and alpha per module in all inputs: "
                                         r"transformer_blocks.0.attn.to_q has r, alpha = 1, 2 in p but 2, 1 in u; "
                                         r"use --method delta-mean or ties$"):
        merge([one, uniform], method="ab-mean", names=["p", "u"])

    exact, residuals = merge([one, uniform], [1.0, 3.0], "delta-mean")         # ranks r_m + 2, through a file
    save_lora(exact, tmp_path / "exact.safetensors")
    loaded = load_lora(tmp_path / "exact.safetensors")
    assert residuals == {} and loaded.ranks == {m: r + 2 for m, r in one.ranks.items()} and loaded.alpha == exact.alpha
    for m in one.A:
        torch.testing.assert_close(loaded.delta(m), _weighted_sum([one, uniform], [1.0, 3.0], m), rtol=0, atol=1e-6)
    small, residuals = merge([one, uniform], [1.0, 3.0], "delta-mean", rank=3)  # 3 = min_m (r_m + 2)
    assert set(small.ranks.values()) == {3} and small.alpha == 3 * one.scale_of("transformer_blocks.0.attn.to_q")
    for m, (residual, norm) in residuals.items():
        singular = torch.linalg.svdvals(exact.delta(m))                        # Eckart-Young per module
        torch.testing.assert_close(torch.tensor([residual, norm]), torch.stack([singular[3:].norm(), singular.norm()]))
        torch.testing.assert_close(torch.tensor(residual), (exact.delta(m) - small.delta(m)).norm())
    with pytest.raises(ValueError, match="--rank 4 is outside 1..3"):
        merge([one, uniform], method="delta-mean", rank=4)
    single, residuals = compress(one, 1)                                        # one rank-1 LoRA from mixed scales
    assert set(single.ranks.values()) == {1} and single.alpha == one.scale_of("transformer_blocks.0.attn.to_q")
    for m, (residual, _) in residuals.items():
        torch.testing.assert_close(torch.tensor(residual), (one.delta(m) - single.delta(m)).norm())
        torch.testing.assert_close(torch.tensor(residual), torch.linalg.svdvals(one.delta(m))[1:].norm())

    tied, residuals = merge([one, uniform], [1.0, 3.0], "ties", rank=16, density=0.3)   # full rank: exact
    assert relative_error(residuals) < 1e-6 and merge([one, uniform], method="ties")[0].rank == 3
    for m in tied.A:
        expected = ties_delta(torch.stack([one.delta(m), uniform.delta(m)]), torch.tensor([0.25, 0.75]), 0.3)
        torch.testing.assert_close(tied.delta(m), expected, rtol=0, atol=1e-5)


def test_every_input_format_gives_identical_merges(sd3_transformer, tmp_path):
    loras = [random_lora(sd3_transformer, 1), random_lora(sd3_transformer, 2)]
    readings = {"peft folder": [], "peft file": [], "diffusers + metadata": [], "diffusers bare": []}
    for k, lora in enumerate(loras):
        readings["peft folder"].append(load_lora(write_peft(lora, tmp_path / f"folder{k}")))
        bare = write_peft(lora, tmp_path / f"bare{k}", with_config=False) / "adapter_model.safetensors"
        readings["peft file"].append(load_lora(bare, lora_alpha=lora.alpha))
        save_lora(lora, tmp_path / f"ours{k}.safetensors")
        readings["diffusers + metadata"].append(load_lora(tmp_path / f"ours{k}.safetensors"))
        save_file({f"transformer.{m}.lora_{p}.weight": getattr(lora, p)[m] for m in lora.A for p in "AB"},
                  tmp_path / f"plain{k}.safetensors")
        readings["diffusers bare"].append(load_lora(tmp_path / f"plain{k}.safetensors", lora_alpha=lora.alpha))
    for method, rank in [("ab-mean", None), ("delta-mean", 5), ("ties", None)]:
        reference = merge(loras, [1.0, 2.0], method, rank)[0]
        for fmt, pair in readings.items():
            merged = merge(pair, [1.0, 2.0], method, rank)[0]
            assert all(torch.equal(merged.delta(m), reference.delta(m)) for m in reference.A), (method, fmt)


def _cli(*args):
    return subprocess.Popen([sys.executable, "merge_lora.py", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_merge_is_loadable_by_load_lora_and_add_adapter(teacher_files, sd3_transformer, tmp_path):
    out = tmp_path / "merged.safetensors"
    ocr, geneval, pick = (teacher_files[t] for t in ("ocr", "geneval", "pick"))
    stdout, stderr = _cli(ocr, geneval, pick, "--method", "delta-mean", "--weights", "1,1,2", "--rank", "3",
                          "--out", out).communicate()
    assert "overall relative Frobenius error" in stdout, stderr
    merged = load_lora(out)
    reference = merge([load_lora(p) for p in (ocr, geneval, pick)], [1.0, 1.0, 2.0], "delta-mean", 3)[0]
    assert (merged.rank, merged.alpha) == (3, 6.0)
    assert all(torch.equal(merged.delta(m), reference.delta(m)) for m in reference.A)
    add_adapter(copy.deepcopy(sd3_transformer), merged, "student", str(out))       # what train.py --init_lora does


def test_cli_bad_input_is_one_line_and_writes_nothing(teacher_files, sd3_transformer, tmp_path, capsys):
    """merge_lora.main, what `python merge_lora.py` runs (the test above runs the script), in this process: no
    interpreter start-up per case."""
    ocr, geneval, pick = (teacher_files[t] for t in ("ocr", "geneval", "pick"))
    partial = random_lora(sd3_transformer, 4)
    del partial.A["transformer_blocks.1.attn.to_q"], partial.B["transformer_blocks.1.attn.to_q"]
    save_lora(partial, tmp_path / "partial.safetensors")
    bare = write_peft(partial, tmp_path / "bare", with_config=False) / "adapter_model.safetensors"
    out = tmp_path / "merged.safetensors"
    cases = {"target different modules": [ocr, tmp_path / "partial.safetensors", "--out", out],
             "invalid choice: 'average'": [ocr, geneval, "--method", "average", "--out", out],
             "give 2 non-negative weights": [ocr, geneval, "--weights", "0.5", "--out", out],
             "is an input": [ocr, geneval, "--out", ocr / "adapter_model.safetensors"],
             "ab-mean needs one rank and alpha": [ocr, pick, "--out", out],
             "no lora_alpha": [bare, bare, "--out", out]}
    files = [ocr / "adapter_model.safetensors", ocr / "adapter_config.json", geneval / "adapter_model.safetensors",
             pick, tmp_path / "partial.safetensors", bare]
    before = [f.read_bytes() for f in files]
    threads = torch.get_num_threads()                                       # main sets 1 thread past the flags
    try:
        for message, args in cases.items():
            capsys.readouterr()
            with pytest.raises(SystemExit) as done:
                merge_lora.main([str(a) for a in args])
            stdout, stderr = capsys.readouterr()
            assert done.value.code not in (0, None) and stdout == "", message
            assert stderr.count("\n") == 1 and stderr.startswith("merge_lora.py: error: ") and message in stderr, stderr
    finally:
        torch.set_num_threads(threads)
    assert [f.read_bytes() for f in files] == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "partial.safetensors"]   # no temporary files left
