"""Plot a run: one PNG of the curves in its metrics.jsonl, for people who would rather look than read.

Panels (x = iteration): the loss; K_j to each task's teacher (kl_teacher/<task>); K_j to the anchor (MAR,
kl_anchor; GRPO runs: kl_base); the held-out reward of each task from the in-loop evaluation (eval/<task>,
the EMA weights under --ema, iteration 0 = before training); images/s of training (evaluation time apart);
the mean reward of each iteration's rollouts (GRPO and GRPO-Mix: reward/<task>, a teacher's learning curve).
KL panels use a log scale. Also prints the run's training and in-loop evaluation seconds.
matplotlib is an optional dependency (requirements-logging.txt), imported here only.

Run: python plot.py out/opd                 (writes out/opd/curves.png; --out picks another file)
"""
import argparse
import json
from pathlib import Path
import sys


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run}: give a train.py --out folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(lines: list[dict], keys: list[str]) -> dict[str, tuple[list, list]]:
    """{key: (iterations, values)} for each key with at least one number."""
    found = {}
    for key in keys:
        points = [(m["iteration"], m[key]) for m in lines if isinstance(m.get(key), (int, float))]
        if points:
            found[key] = tuple(map(list, zip(*points)))
    return found


def panels(lines: list[dict]) -> list[tuple[str, dict, bool]]:
    """(title, {label: (x, y)}, log scale) for each panel, from the keys present."""
    keys = list(dict.fromkeys(k for m in lines for k in m))
    tasks = [k.split("/", 1)[1] for k in keys if k.startswith("eval/") and k != "eval/average"]
    per_teacher = [k for k in keys if k.startswith("kl_teacher/")]
    anchor = [k for k in ("kl_anchor", "kl_base") if k in keys]
    rollout_rewards = [k for k in keys if k.startswith("reward/")] or ["reward"]
    return [("loss", series(lines, ["loss"]), False),
            ("KL to each task's teacher", series(lines, per_teacher or ["kl_teacher"]), True),
            ("KL to the anchor" if "kl_anchor" in keys else "KL to the base", series(lines, anchor), True),
            ("held-out reward (in-loop evaluation)", series(lines, [f"eval/{t}" for t in tasks] + ["eval/average"]),
             False),
            ("images/s (training)", series(lines, ["images_per_s"]), False),
            ("reward of the rollouts (training)", series(lines, rollout_rewards), False)]


def plot(run: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = read_metrics(run)
    drawn = panels(lines)
    columns = 3
    rows = -(-len(drawn) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), constrained_layout=True)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, (title, curves, log) in zip(axes.flat, drawn):
        for label, (x, y) in curves.items():
            ax.plot(x, y, marker="o" if len(x) < 12 else None, markersize=3, label=label.split("/")[-1])
        if log and curves and all(v > 0 for _, y in curves.values() for v in y):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        if len(curves) > 1:
            ax.legend(fontsize=7)
        if not curves:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle(str(run), fontsize=9)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    train = sum(m.get("seconds", 0) for m in lines)
    evaluation = sum(m.get("seconds_eval", 0) for m in lines)
    print(f"{out}: {len(lines)} lines; training {train:.1f} s, in-loop evaluation {evaluation:.1f} s "
          f"({evaluation / max(train + evaluation, 1e-9):.1%} of the two)")
    return out


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="plot.py", description="Plot a train.py run's metrics.jsonl into one PNG.")
    parser.add_argument("run", type=Path, help="the run's --out folder")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default <run>/curves.png)")
    args = parser.parse_args(argv)
    return plot(args.run, args.out or args.run / "curves.png")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ModuleNotFoundError) as error:
        print(f"plot.py: error: {error}" + (" (pip install -r requirements-logging.txt)"
                                           if isinstance(error, ModuleNotFoundError) else ""), file=sys.stderr)
        sys.exit(2)
