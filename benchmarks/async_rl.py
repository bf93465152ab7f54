"""Asynchronous GRPO (`rl.max_staleness=1`, rollouts on devices of their own) against the
synchronous run, on the demo's RL stage 1.

python benchmarks/async_rl.py --workdir=runs/demo [--steps 20] [--devices 2] [--size 600]

Starts from a finished demo run's SFT checkpoint and runs the demo's stage-1 config (its
grading pass, batch, learning rate) for `--steps` steps twice, in one process on
`--devices` host devices (XLA's fake CPU devices; 2 on a 2-core machine, one a core):
synchronous (both phases on all devices, one after the other) and one update stale with
the devices split in half (rollouts on one half while the other half updates; with one
device, the two interleaved on it). Prints, per
run, the wall time per step (the median over steps after the first, which compiles), where
it goes (rollout, update, sync, the trainer waiting for the rollout, the rollout group
idle) and the held-out accuracy of the final weights (greedy, the demo's held-out
questions); then what the measured phases predict for other splits; ends with
`ratio=<synchronous s/step / asynchronous s/step>`.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/demo", help="a finished demo run (configs/demo.py)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=2, help="host devices (split in half for the async run)")
    parser.add_argument("--size", type=int, default=600, help="held-out questions scored after each run")
    return parser.parse_args()


ARGS = parse()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from fleming_jax import demo as pipeline  # noqa: E402
from fleming_jax import paths  # noqa: E402
from fleming_jax.data.records import QARecord, read_jsonl  # noqa: E402
from fleming_jax.evaluate import bootstrap_interval, evaluate_records, pass_at_1  # noqa: E402
from fleming_jax.sampler import SamplingParams  # noqa: E402
from fleming_jax.train import rl  # noqa: E402

PHASES = ("time_generate", "time_update", "time_sync", "time_rollout_wait", "time_rollout_idle")


def stage_config(workdir: str, steps: int, max_staleness: int, rollout_devices: int):
    config = demo.get_config()
    pipeline.wire(config, workdir)
    stage = config.stages.rl_stage1
    stage.rl.update(steps=steps, eval_every=steps + 1, max_staleness=max_staleness)
    stage.data.eval = ""  # scored below on the held-out set instead
    stage.rollout.devices = rollout_devices
    stage.checkpoint.every = steps
    return stage


def run(name: str, config, records, eval_tokens: int) -> dict:
    ends = []
    with tempfile.TemporaryDirectory() as workdir:
        trainer = rl.RLTrainer(config, workdir)
        rows = trainer.train(on_step=lambda step: ends.append(time.perf_counter()))
        greedy = SamplingParams(temperature=0.0, max_new_tokens=eval_tokens)
        scored = evaluate_records(trainer.policy(), trainer.tokenizer, records, greedy, trainer.stop_ids,
                                  batch_size=len(records))
    per_step = np.diff(ends)  # steps 2.. (the first compiles the update)
    correct = [pass_at_1(r["correct"]) for r in scored["outputs"]]
    mean, low, high = bootstrap_interval(correct)
    phases = {k: float(np.median([r.get(k, 0.0) for r in rows[1:]])) for k in PHASES}
    return dict(name=name, step=float(np.median(per_step)), total=ends[-1] - ends[0], accuracy=(mean, low, high),
                **phases)


def main():
    workdir = ARGS.workdir
    if not paths.exists(paths.join(workdir, "sft", "checkpoints")):
        sys.exit(f"{workdir}/sft/checkpoints does not exist: run python main.py --config=configs/demo.py "
                 f"--workdir={workdir}")
    cfg = demo.get_config()
    records = [QARecord.from_dict(r) for r in read_jsonl(paths.join(workdir, "synthesize", "validation.jsonl"))]
    records = records[:ARGS.size]
    half = ARGS.devices // 2
    split = f"{ARGS.devices - half} + {half} devices" if half else "interleaved on 1 device"
    results = [run("synchronous", stage_config(workdir, ARGS.steps, 0, 0), records, cfg.demo.eval_max_new_tokens),
               run(f"max_staleness=1, {split}", stage_config(workdir, ARGS.steps, 1, half), records,
                   cfg.demo.eval_max_new_tokens)]
    print(f"demo RL stage 1 from {workdir}/sft, {ARGS.steps} steps, {ARGS.devices} host devices; per step: median "
          "over steps 2.. (s)")
    print("| run | wall | rollout | update | sync | trainer waits | rollout idle | held-out accuracy [95%] |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        acc = "{:.3f} [{:.3f}, {:.3f}]".format(*r["accuracy"])
        print(f"| {r['name']} | {r['step']:.2f} | {r['time_generate']:.2f} | {r['time_update']:.2f} | "
              f"{r['time_sync']:.2f} | {r['time_rollout_wait']:.2f} | {r['time_rollout_idle']:.2f} | {acc} |")
    sync = results[0]
    gen, rest = sync["time_generate"], sync["time_update"] + sync["time_sync"]
    print(f"timeline of the synchronous step: rollout {gen:.2f} s + update and sync {rest:.2f} s; split with a "
          f"share s of the devices for rollouts and each phase scaling with its devices, one update stale: "
          f"max({gen:.2f} / s, {rest:.2f} / (1 - s)), best {gen + rest:.2f} s at s = {gen / (gen + rest):.2f}: no "
          "faster than the synchronous step; the overlap pays where a phase does not scale with devices "
          "(decoding's per-token latency, the long tail of a rollout)")
    print(f"ratio={sync['step'] / results[1]['step']:.3f}")


if __name__ == "__main__":
    main()
