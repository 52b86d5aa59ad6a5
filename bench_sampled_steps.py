"""The measurement behind opd_loss.UNIFORM_FLOOR: the variance of the sampled-steps estimator (--sampled_steps k)
as a function of the uniform floor lam of p_j = (1 - lam) w_j / sum w + lam / J, on real rows of the toy world.

The toy world runs SD3.5-M's sampling schedule (T = 10, shift 3, a = 0.7), so its KL weights w_j are SD3.5-M's
(92 % on j = 7, 8). For a batch of student rollouts (the toy recipe: 16 images) this computes, at every row
(image i, trained step j), the gkd loss l_ij (teacher + beta * anchor, MAR against the base) and its LoRA gradient
g_ij, one row per backward. Per image the dense terms are L_i = (1/J) sum_j l_ij and G_i = (1/J) sum_j g_ij; the
sampled estimator is G^_i = sum_{j in S_i} g_ij / (J pi_j). Its variance is exact, not sampled: every draw of the
design (opd_loss.systematic_designs) with its probability, through the Gram matrix g_i g_i^T:

    E||G^ - G||^2 = (1/N^2) sum_i sum_d P_d c_d^T (g_i g_i^T) c_d,   c_dj = [j in S_d] / (J pi_j) - 1/J

reported relative to ||G||^2 and to the variance the batch already has from drawing N images,
tr Cov_i(G_i) / N. The expected cosine with the dense gradient is a Monte-Carlo mean over --draws draws.
Students: the merge of the toy teachers (the paper's cold start, merge_lora ab-mean) and a fresh LoRA (B = 0).

Run (CPU, a few minutes):  python bench_sampled_steps.py --out out/sampled_steps
"""
import argparse
import json
import os
from pathlib import Path
import tempfile

import torch

from merge_lora import load_lora, merge, save_lora
from opd_loss import inclusion_probabilities, step_probabilities, systematic_designs
from train import local_batch, parse_config, route, rows_at, setup, step_loss, student_rollout, velocities_at_rows

FLOORS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
TEACHERS = "toy/ocr.safetensors,toy/geneval.safetensors"


def row_terms(run, images: int, iteration: int = 1):
    """Rollouts of `images` images and, at all J rows of each, l_ij and the flat LoRA gradient g_ij.
    -> loss [N, J], grads [N, J, P] (float64)"""
    mine, seeds = local_batch(run, iteration)
    mine, seeds = mine[:images], seeds[:images]
    batch = student_rollout(run, mine, seeds)
    J = run.cfg.train_steps
    rows = rows_at(torch.ones(J, dtype=torch.float64), [0.0] * len(seeds), run.device)
    rows.targets["teacher"] = velocities_at_rows(run, route([batch.tasks[i] for i in rows.image.tolist()], run.routes), batch, rows)
    rows.targets["anchor"] = velocities_at_rows(run, [run.anchor] * len(rows), batch, rows)
    loss = torch.zeros(len(seeds), J, dtype=torch.float64)
    grads = torch.zeros(len(seeds), J, sum(p.numel() for p in run.params), dtype=torch.float64)
    for r in range(len(rows)):
        i, j = int(rows.image[r]), int(rows.step[r])
        value = step_loss(run, batch, rows[r: r + 1])[0].sum()                  # l_ij
        value.backward()
        loss[i, j] = value.item()
        grads[i, j] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in run.params])
        run.optimizer.zero_grad(set_to_none=True)
    return loss, grads


def estimator_variance(values: torch.Tensor, pi: torch.Tensor) -> float:
    """Exact E||X^ - X||^2 of the batch mean over images, X^_i = sum_{j in S_i} x_ij / (J pi_j), X_i = mean_j x_ij.
    values: [N, J, P] (P = 1 for the loss)"""
    N, J = values.shape[:2]
    gram = torch.einsum("njp,nkp->njk", values, values)                          # g_i g_i^T  [N, J, J]
    total = 0.0
    for probability, _, steps in systematic_designs(pi):
        c = torch.full((J,), -1.0 / J, dtype=torch.float64)
        c[steps] += 1 / (J * pi[steps])                                            # c_d
        total += probability * torch.einsum("j,njk,k->", c, gram, c).item()
    return total / N**2


def expected_cosine(grads: torch.Tensor, pi: torch.Tensor, draws: int, seed: int = 0) -> float:
    """Monte-Carlo mean of cos(G^, G) over `draws` independent draws of every image's steps."""
    N, J, _ = grads.shape
    dense = grads.mean((0, 1))
    designs = systematic_designs(pi)
    probabilities = torch.tensor([p for p, _, _ in designs], dtype=torch.float64)
    weights = torch.zeros(len(designs), J, dtype=torch.float64)                  # row weights of each design
    for d, (_, _, steps) in enumerate(designs):
        weights[d, steps] = 1 / (J * pi[steps])
    picks = torch.multinomial(probabilities, draws * N, replacement=True, generator=torch.Generator().manual_seed(seed))
    c = weights[picks].view(draws, N, J)
    sampled = torch.einsum("dnj,njp->dp", c, grads) / N
    return torch.nn.functional.cosine_similarity(sampled, dense[None], dim=1).mean().item()


def study(run, loss, grads, ks, draws: int) -> list[dict]:
    N, J = loss.shape
    dense = grads.mean((0, 1))
    image_noise = ((grads.mean(1) - dense) ** 2).sum(1).sum().item() / (N - 1) / N   # tr Cov_i(G_i) / N
    w = run.kl_w[:J].cpu()
    rows = []
    for k in ks:
        for floor in FLOORS:
            pi = inclusion_probabilities(step_probabilities(w, floor), k)
            grad_var = estimator_variance(grads, pi)
            rows.append({"k": k, "floor": floor, "pi": [round(x, 4) for x in pi.tolist()],
                         "loss_rel_var": estimator_variance(loss[..., None], pi) / loss.mean().item() ** 2,
                         "grad_rel_var": grad_var / dense.pow(2).sum().item(),
                         "grad_var_over_image_noise": grad_var / image_noise,
                         "cosine": expected_cosine(grads, pi, draws)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--draws", type=int, default=2000, help="Monte-Carlo draws for the expected cosine")
    parser.add_argument("--ks", default="1,2,3")
    parser.add_argument("--smoke", action="store_true", help="4 images, 4 SDE steps (a CPU check of this script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out/sampled_steps"))
    args = parser.parse_args()
    import train
    _, _, device = train.setup_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = ["--steps", "4", "--train_steps", "3"] if args.smoke else []
    images = 4 if args.smoke else args.images
    record = {"images": images, "floors": FLOORS, "students": {}}
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merge_init.safetensors"
        save_lora(merge([load_lora(p) for p in TEACHERS.split(",")], method="ab-mean")[0], merged)
        for student, init in (("merge", ["--init_lora", str(merged)]), ("fresh", [])):
            cfg = parse_config(["--teachers", TEACHERS, *init, *small, "--out", f"{tmp}/{student}",
                                "--images_per_iteration", str(max(images, 16)), "--updates", "1"])
            run = setup(cfg, 0, 1, device)
            loss, grads = row_terms(run, images)
            ks = [k for k in map(int, args.ks.split(",")) if k <= cfg.train_steps]
            record["students"][student] = {"loss_per_step": loss.mean(0).tolist(),
                                           "grad_norm_per_step": grads.norm(dim=2).mean(0).tolist(),
                                           "rows": study(run, loss, grads, ks, 200 if args.smoke else args.draws)}
            print(json.dumps({student: record["students"][student]["loss_per_step"]}), flush=True)
    (out / "sampled_steps.json").write_text(json.dumps(record, indent=2))
    (out / "sampled_steps.md").write_text(table(record))
    print(table(record))


def table(record: dict) -> str:
    lines = []
    for student, data in record["students"].items():
        lines += [f"student: {student}; mean l_j over images: " + " ".join(f"{x:.2e}" for x in data["loss_per_step"]),
                  "mean ||g_ij||: " + " ".join(f"{x:.2e}" for x in data["grad_norm_per_step"]), "",
                  "| k | floor | loss rel. var | grad rel. var | grad var / image noise | E cos(G^, G) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['floor']} | {r['loss_rel_var']:.3f} | {r['grad_rel_var']:.3f} | "
                  f"{r['grad_var_over_image_noise']:.2f} | {r['cosine']:.3f} |" for r in data["rows"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
