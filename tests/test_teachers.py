"""LoRA files (peft and diffusers formats) and teacher routing on one shared base."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_lora, write_peft
from merge_lora import LoRA, LoRAFileError, load_lora, lora_from_adapter, save_lora
from models import Base, sd3_velocity
from sde_sampler import Condition
from teachers import BASE, add_adapter, parse_teachers, route, target_velocities, use_adapter


def _merged(transformer, lora: LoRA):
    """An independent reference: a copy of the base with W + (alpha / r) B A written into its weights."""
    merged = copy.deepcopy(transformer)
    with torch.no_grad():
        for module in lora.A:
            merged.get_submodule(module).weight += lora.delta(module)
    return merged


def _with_adapters(sd3_transformer, loras: dict):
    transformer = copy.deepcopy(sd3_transformer)
    for name, lora in loras.items():
        add_adapter(transformer, lora, name)
    return transformer


def _condition(transformer, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, p = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    return Condition(torch.randn(batch, 5, d, generator=g), torch.randn(batch, p, generator=g),
                     torch.randn(1, 5, d, generator=g), torch.randn(1, p, generator=g))


def test_lora_formats_round_trip_to_identical_deltas(sd3_transformer, tmp_path):
    lora = random_lora(sd3_transformer, 7, rank=4, alpha=8.0)
    peft_folder = write_peft(lora, tmp_path / "peft")
    save_lora(lora, tmp_path / "ours.safetensors")
    bare = write_peft(lora, tmp_path / "bare", with_config=False) / "adapter_model.safetensors"
    readings = [load_lora(peft_folder), load_lora(peft_folder / "adapter_model.safetensors"),
                load_lora(tmp_path / "ours.safetensors"), load_lora(bare, lora_alpha=8.0)]
    for reading in readings:
        assert reading.alpha == 8.0 and reading.rank == 4 and reading.A.keys() == lora.A.keys()
        for module in lora.A:
            assert torch.equal(reading.delta(module), lora.delta(module))
    with pytest.raises(LoRAFileError, match="no lora_alpha.*--lora_alpha"):
        load_lora(bare)


def test_bad_lora_files_are_refused_with_the_file_named(sd3_transformer, tmp_path):
    save_lora(random_lora(sd3_transformer, 1), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoRAFileError, match="cannot read LoRA .*truncated.safetensors"):
        load_lora(tmp_path / "truncated.safetensors")
    with pytest.raises(LoRAFileError, match="LoRA not found"):
        load_lora(tmp_path / "missing.safetensors")
    save_file({"model.layer.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(LoRAFileError, match="unexpected key 'model.layer.weight'"):
        load_lora(tmp_path / "other.safetensors", lora_alpha=1.0)


def test_a_lora_for_another_model_is_refused(sd3_transformer):
    transformer = copy.deepcopy(sd3_transformer)
    foreign = LoRA({"down_blocks.0.attn.to_q": torch.zeros(2, 8)}, {"down_blocks.0.attn.to_q": torch.zeros(8, 2)}, 2.0)
    with pytest.raises(ValueError, match="not a linear layer of this base"):
        add_adapter(transformer, foreign, "teacher_x")
    lora = random_lora(sd3_transformer, 3)
    module = next(iter(lora.A))
    lora.A[module] = torch.zeros(4, lora.A[module].shape[1] + 1)
    with pytest.raises(ValueError, match=f"{module} has shape"):
        add_adapter(transformer, lora, "teacher_y")


def test_adapter_output_equals_merged_weights_and_base_is_restored(sd3_transformer):
    ocr, geneval = random_lora(sd3_transformer, 1), random_lora(sd3_transformer, 2)
    transformer = _with_adapters(sd3_transformer, {"teacher_ocr": ocr, "teacher_geneval": geneval,
                                                   "student": random_lora(sd3_transformer, 3)})
    transformer.set_adapter("student")
    cond, x, sigma = _condition(transformer, 2), torch.randn(2, 4, 8, 8), torch.tensor([0.8, 0.4])
    with torch.no_grad():
        for name, reference in (("teacher_ocr", _merged(sd3_transformer, ocr)), (BASE, sd3_transformer)):
            with use_adapter(transformer, name):
                ours = sd3_velocity(transformer, x, sigma, cond, 4.5)
            assert torch.allclose(ours, sd3_velocity(reference, x, sigma, cond, 4.5), atol=1e-5)
    assert transformer.active_adapters() == ["student"]                     # restored after each use


def test_mixed_batch_routing_equals_each_samples_own_teacher(sd3_transformer):
    loras = {"ocr": random_lora(sd3_transformer, 11), "geneval": random_lora(sd3_transformer, 12)}
    transformer = _with_adapters(sd3_transformer, {f"teacher_{t}": l for t, l in loras.items()}
                                 | {"student": random_lora(sd3_transformer, 13)})
    transformer.set_adapter("student")
    tasks = ["ocr", "geneval", "geneval", "ocr", "geneval"]
    adapters = route(tasks, {"ocr": "teacher_ocr", "geneval": "teacher_geneval"})
    cond, states = _condition(transformer, 5, seed=1), torch.randn(3, 5, 4, 8, 8)
    sigmas = torch.tensor([1.0, 0.7, 0.2])
    step = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1])                            # rows mixing states and images
    image = torch.tensor([0, 1, 2, 3, 4, 0, 3, 2, 4])
    base = Base(transformer, None, None, (4, 8, 8), 3.0, "tiny")              # only its velocity is used
    velocity = target_velocities(base, [adapters[i] for i in image], states[step, image], sigmas[step], cond,
                                 image, 4.5, chunk=2)
    assert velocity.shape == (9, 4, 8, 8)
    with torch.no_grad():
        for r, (j, i) in enumerate(zip(step.tolist(), image.tolist())):
            reference = _merged(sd3_transformer, loras[tasks[i]])
            own = sd3_velocity(reference, states[j, [i]], sigmas[[j]], cond[[i]], 4.5)
            assert torch.allclose(velocity[r], own[0], atol=1e-5), (tasks[i], i, j)


def test_parse_teachers_takes_task_from_stem_or_prefix(tmp_path):
    spec = f"{tmp_path}/ocr.safetensors,geneval={tmp_path}/g_lora"
    assert parse_teachers(spec) == {"ocr": tmp_path / "ocr.safetensors", "geneval": tmp_path / "g_lora"}
    with pytest.raises(ValueError, match="task 'ocr' given twice"):
        parse_teachers(f"{tmp_path}/ocr.safetensors,ocr={tmp_path}/x")


def test_lora_from_adapter_reads_back_what_was_added(sd3_transformer):
    lora = random_lora(sd3_transformer, 5, rank=3, alpha=6.0)
    transformer = _with_adapters(sd3_transformer, {"student": lora})
    back = lora_from_adapter(transformer, "student")
    assert back.alpha == 6.0 and back.A.keys() == lora.A.keys()
    assert all(torch.equal(back.A[m], lora.A[m]) and torch.equal(back.B[m], lora.B[m]) for m in lora.A)
