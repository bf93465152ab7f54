"""The demo pipeline over several training seeds: the spread of held-out accuracy per stage.

python benchmarks/demo_seeds.py --workdir=runs/demo_seeds [--seeds 0 1 2] [--budget full]

Each seed runs `python main.py --config=configs/demo.py:<budget> --config.seed=<seed>` in
`<workdir>/seed<seed>` (one after the other; a finished seed's stages are skipped on a
rerun). The synthesised data and the held-out questions are the same for every seed; the
seed drives the model init, the SFT data order and the RL sampling. Prints a table of
mean ± std per stage, RL's gain over SFT pooled over the seeds with a paired bootstrap 95%
interval (questions resampled, each the same under every seed), and ends with
`ratio=<rl_stage2 / sft>`, the mean held-out accuracy after both RL stages over the mean
after SFT (above 1: RL added accuracy). Also writes
`<workdir>/accuracy_seeds.png`: the mean per stage with one dot per seed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fleming_jax.evaluate import bootstrap_interval  # noqa: E402

STAGES = ("init", "sft", "rl_stage1", "rl_stage2")


def run_seed(seed: int, workdir: str, budget: str) -> dict:
    out = os.path.join(workdir, f"seed{seed}")
    command = [sys.executable, "main.py", f"--config=configs/demo.py:{budget}", f"--config.seed={seed}",
               f"--workdir={out}"]
    print(f"[seeds] {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float]) -> str:
    return "{:.3f} ± {:.3f}".format(*mean_std(values))


def plot(accuracy: dict[str, list[float]], seeds: list[int], file: str) -> None:
    """Bars of the mean held-out accuracy per stage, ± std, with each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    means, stds = zip(*(mean_std(accuracy[s]) for s in STAGES))
    ax.bar(STAGES, means, yerr=stds, capsize=4, color="#4a7ab5",
           label=f"mean ± std over {len(seeds)} seeds (dots: each seed)")
    for i, stage in enumerate(STAGES):
        ax.scatter([i + 0.3] * len(seeds), accuracy[stage], color="black", s=10, zorder=3)
    ax.axhline(0.25, color="grey", linestyle="--", label="chance (4 options)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/demo_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", default="full", help="a key of configs/demo.py BUDGETS")
    args = parser.parse_args()
    reports = {seed: run_seed(seed, os.path.abspath(args.workdir), args.budget) for seed in args.seeds}
    accuracy = {stage: [r["held_out"][stage]["accuracy"] for r in reports.values()] for stage in STAGES}
    minutes = [sum(s["seconds"] for s in r["stages"].values()) / 60 for r in reports.values()]
    n = reports[args.seeds[0]]["held_out"]["sft"]["n"]
    print(f"\nheld-out accuracy over seeds {args.seeds} ({n} questions, 4 options; mean ± std)")
    print("| stage | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{a:.3f}" for a in accuracy[stage]) + f" | {spread(accuracy[stage])} |")
    gain = [b - a for a, b in zip(accuracy["sft"], accuracy["rl_stage2"])]
    print("| RL gain (rl_stage2 - sft) | " + " | ".join(f"{g:+.3f}" for g in gain) + f" | {spread(gain)} |")
    paired = [[b - a for a, b in zip(r["held_out"]["sft"]["per_question"], r["held_out"]["rl_stage2"]["per_question"])]
              for r in reports.values()]  # [seeds, questions]: the same questions under every seed
    mean, low, high = bootstrap_interval(paired)
    print(f"RL gain over SFT, pooled over seeds: {mean:+.3f}, paired bootstrap 95% interval [{low:+.3f}, {high:+.3f}]")
    print(f"stage time per seed: {spread(minutes)} minutes")
    plot(accuracy, args.seeds, os.path.join(os.path.abspath(args.workdir), "accuracy_seeds.png"))
    print(f"ratio={statistics.mean(accuracy['rl_stage2']) / max(statistics.mean(accuracy['sft']), 1e-9):.3f}")


if __name__ == "__main__":
    main()
