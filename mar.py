"""MAR: the anchor regulariser of Flow-OPD (paper sec. 3.3), beta * K_j(S, A) on every sample and step.

Distilling several teachers pulls the student toward each task's specialist; MAR adds the same dense
per-step KL (opd_loss.step_kl) toward one frozen, task-agnostic anchor A on ALL data, so the student
keeps general image quality while it learns the tasks:

    L_MAR = beta * mean_ij K_ij(S, A),      beta = 0.04 (the paper and the authors' code)

A is either the base model (the student adapter disabled: the reference policy of Flow-GRPO's KL
penalty) or a frozen anchor LoRA given by path (the paper: a quality/"aesthetic" teacher). The paper
reports MAR raising ImageReward 1.26 -> 1.36, Aesthetic 5.89 -> 6.23, HPS-v2.1 .300 -> .330.
The anchor's velocities are computed with the teachers' (teachers.target_velocities, no grad, grouped by
adapter); the term is added inside the losses of opd_loss.py.

Demo: python train.py --anchor toy/quality.safetensors --beta 0.04 ...
"""
from teachers import BASE, add_adapter
from merge_lora import load_lora


def load_anchor(transformer, path: str, lora_alpha: float | None = None):
    """The anchor's adapter name: BASE (None) for the base model, or 'anchor' for a frozen LoRA at `path`."""
    if not path:
        return BASE
    add_adapter(transformer, load_lora(path, lora_alpha), "anchor", path)
    return "anchor"
