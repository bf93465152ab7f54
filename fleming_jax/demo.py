"""Task `demo`: the whole Fleming-R1 pipeline on the tiny default, with a report.

synthesize -> distill (KG teacher) -> sft (from random init) -> rl_stage1 -> rl_stage2 ->
export, each stage in its own subfolder of the workdir. A stage that finished leaves a
DONE file and is skipped on a rerun; one that crashed resumes from its checkpoints. The
held-out synthesised questions are evaluated (greedy) at random init and after each
training stage (outputs in `held_out/<stage>.jsonl`); `report.json`, `report.md` and PNG
plots land in the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from fleming_jax import models, parallel, paths
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import QARecord, read_jsonl, write_jsonl
from fleming_jax.engine import LocalEngine
from fleming_jax.evaluate import bootstrap_interval, evaluate_records, pass_at_1
from fleming_jax.sampler import SamplingParams

STAGES = ("synthesize", "distill", "sft", "rl_stage1", "rl_stage2", "export")
EVALUATED = ("init", "sft", "rl_stage1", "rl_stage2")


def stage_runner(name: str):
    """The task function each stage runs (imported lazily: a skipped stage costs nothing)."""
    import importlib

    module, function = {
        "synthesize": ("fleming_jax.data.rods", "run"), "distill": ("fleming_jax.distill.collect", "run"),
        "sft": ("fleming_jax.train.sft", "run"), "rl_stage1": ("fleming_jax.train.rl", "run"),
        "rl_stage2": ("fleming_jax.train.rl", "run"), "export": ("fleming_jax.models.hf", "export_task"),
    }[name]
    return getattr(importlib.import_module(module), function)


def held_out_accuracy(config, stage: str, workdir: str, records: list[QARecord]) -> dict:
    """Greedy accuracy of a stage's model on the held-out questions; the per-question
    outputs go to `<workdir>/held_out/<stage>.jsonl` for inspection."""
    model_cfg = config.stages.sft.model.copy_and_resolve_references()  # the architecture all stages share
    model_cfg.init_from = "" if stage == "init" else paths.join(workdir, stage, "checkpoints")
    model, _ = models.build(model_cfg)
    tokenizer = toklib.load(paths.join(workdir, "sft", "tokenizer"))
    params = SamplingParams(temperature=0.0, max_new_tokens=config.demo.eval_max_new_tokens)
    # all questions in one rollout (the engine keeps its slots full); the tokenizer's stop tokens
    result = evaluate_records(LocalEngine.of(model), tokenizer, records, params, batch_size=len(records))
    if parallel.is_main_process():
        write_jsonl(paths.join(workdir, "held_out", f"{stage}.jsonl"), result["outputs"])
    result["per_question"] = [pass_at_1(r["correct"]) for r in result.pop("outputs")]  # for the intervals
    result["interval"] = list(bootstrap_interval(result["per_question"])[1:])
    return result


def rl_gains(report: dict) -> dict[str, list[float]]:
    """Each RL stage's held-out gain over SFT on the same questions: [gain, low, high] with a
    paired bootstrap 95% interval."""
    held_out, gains = report["held_out"], {}
    for stage in ("rl_stage1", "rl_stage2"):
        if "sft" in held_out and stage in held_out:
            before, after = (held_out[s]["per_question"] for s in ("sft", stage))
            gains[stage] = list(bootstrap_interval([b - a for a, b in zip(before, after)]))
    return gains


def wire(config, workdir: str) -> None:
    """Points each stage's inputs at the previous stages' folders under `workdir`, and hands
    `config.seed` to every training stage (model init, SFT data order, RL sampling)."""
    s, at = config.stages, lambda *p: paths.join(workdir, *p)
    s.sft.model.seed = s.sft.data.seed = s.rl_stage1.rl.seed = s.rl_stage2.rl.seed = config.seed
    s.distill.data.update(train=at("synthesize", "train.jsonl"), validation=at("synthesize", "validation.jsonl"))
    s.sft.data.update(train=at("distill", "train.jsonl"), eval=at("distill", "validation.jsonl"))
    for stage, start in (("rl_stage1", "sft"), ("rl_stage2", "rl_stage1")):
        s[stage].model.init_from = at(start, "checkpoints")
        s[stage].tokenizer = at("sft", "tokenizer")
        s[stage].data.update(train=at("synthesize", "train.jsonl"), eval=at("synthesize", "validation.jsonl"))
    s.export.model.init_from = at("rl_stage2", "checkpoints")
    s.export.export.update(tokenizer=at("sft", "tokenizer"), out_dir=at("export", "hf"))


def run(config, workdir: str) -> dict:
    """Runs (or resumes) every stage, evaluates after each, writes the report."""
    config = config.copy_and_resolve_references()
    wire(config, workdir)
    report_file = paths.join(workdir, "report.json")
    report = {"stages": {}, "held_out": {}}
    if paths.exists(report_file):
        report = json.loads(paths.read_text(report_file))
    report["devices"] = f"{jax.device_count()} {jax.default_backend()}"  # e.g. "2 cpu": config.cpu_devices
    for i, name in enumerate(STAGES, 1):
        stage_dir = paths.join(workdir, name)
        if paths.exists(paths.join(stage_dir, "DONE")):
            print(f"[demo {i}/{len(STAGES)}] {name}: done already, skipped", flush=True)
            continue
        print(f"[demo {i}/{len(STAGES)}] {name} -> {stage_dir}", flush=True)
        start = time.perf_counter()
        paths.makedirs(stage_dir)
        stage_runner(name)(config.stages[name], stage_dir)
        report["stages"][name] = {"seconds": round(time.perf_counter() - start, 1)}
        if name == "sft":  # the tokenizer exists now: evaluate the random init for reference
            report["held_out"]["init"] = evaluate_stage(config, "init", workdir)
        if name in EVALUATED:
            report["held_out"][name] = evaluate_stage(config, name, workdir)
        if parallel.is_main_process():
            paths.write_text(paths.join(stage_dir, "DONE"), "")
        save_report(report, workdir)
    save_report(report, workdir)
    print(format_table(report), flush=True)
    return report


def evaluate_stage(config, stage: str, workdir: str) -> dict:
    rows = list(read_jsonl(paths.join(workdir, "synthesize", "validation.jsonl")))
    records = [QARecord.from_dict(r) for r in rows][:config.demo.eval_size]
    start = time.perf_counter()
    result = held_out_accuracy(config, stage, workdir, records)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[demo] held-out after {stage}: accuracy {result['accuracy']:.3f}, format errors "
          f"{result['format_error_rate']:.3f}, mean length {result['mean_length']:.0f}", flush=True)
    return result


def format_table(report: dict) -> str:
    n = next((r["n"] for r in report["held_out"].values()), 0)
    lines = [f"| stage | held-out accuracy ({n} questions, 95% interval) | format errors | mean length | "
             "stage time (s) |", "|---|---|---|---|---|"]
    for stage in EVALUATED:
        r = report["held_out"].get(stage)
        if r:
            seconds = report["stages"].get(stage, {}).get("seconds", 0.0)
            low, high = r.get("interval", (r["accuracy"],) * 2)
            lines.append(f"| {stage} | {r['accuracy']:.3f} [{low:.3f}, {high:.3f}] | {r['format_error_rate']:.3f} | "
                         f"{r['mean_length']:.0f} | {seconds} |")
    for stage, (gain, low, high) in report.get("rl_gain", {}).items():  # save_report's
        lines.append(f"\n{stage} - sft on the same questions: {gain:+.3f} [{low:+.3f}, {high:+.3f}] "
                     "(paired bootstrap, 95%)")
    return "\n".join(lines)


def save_report(report: dict, workdir: str) -> None:
    """report.json, report.md and the plots (process 0 only)."""
    if not parallel.is_main_process():
        return
    report["rl_gain"] = rl_gains(report)  # [gain, low, high] a stage, over SFT
    paths.write_text(paths.join(workdir, "report.json"), json.dumps(report, indent=2))
    plots = make_plots(report, workdir)
    total = sum(s["seconds"] for s in report["stages"].values())
    evaluation = sum(r.get("seconds", 0.0) for r in report["held_out"].values())
    md = ["# fleming-jax demo report", "", format_table(report), "",
          f"Time: {total:.0f} s in the stages + {evaluation:.0f} s of held-out evaluation, on "
          f"{report.get('devices', '?')} devices.", ""]
    md += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    paths.write_text(paths.join(workdir, "report.md"), "\n".join(md) + "\n")


def rl_metrics(workdir: str) -> dict[str, list[dict]]:
    """metrics.jsonl rows of the RL stages, when they exist."""
    out = {}
    for stage in ("rl_stage1", "rl_stage2"):
        file = paths.join(workdir, stage, "metrics.jsonl")
        if paths.exists(file):
            out[stage] = list(read_jsonl(file))
    return out


def make_plots(report: dict, workdir: str) -> list[str]:
    """Held-out accuracy per stage; reward, pass rate, pool size and length over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stages = [s for s in EVALUATED if s in report["held_out"]]
    if stages:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        accuracy = [report["held_out"][s]["accuracy"] for s in stages]
        low, high = zip(*(report["held_out"][s].get("interval", (a, a)) for s, a in zip(stages, accuracy)))
        ax.bar(stages, accuracy, color="#4a7ab5", yerr=[[a - lo for a, lo in zip(accuracy, low)],
                                                       [hi - a for a, hi in zip(accuracy, high)]],
               capsize=4, label="accuracy (bars: 95% interval)")
        ax.axhline(0.25, color="grey", linestyle="--", label="chance (4 options)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
        fig.tight_layout()
        _savefig(fig, paths.join(workdir, "accuracy.png"))
        plt.close(fig)
        written.append("accuracy.png")
    runs = rl_metrics(workdir)
    if runs:
        panels = [("reward_mean", "reward"), ("accuracy", "rollout pass rate"),
                  ("pool_wrong", "stage-2 wrong pool"), ("completion_length", "completion length")]
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
        offset = 0
        for stage, rows in runs.items():
            steps = [offset + r["step"] for r in rows]
            for ax, (key, title) in zip(axes, panels):
                values = [r.get(key) for r in rows]
                if any(v is not None for v in values):
                    ax.plot(steps, values, label=stage, color="C0" if stage == "rl_stage1" else "C1")
                ax.set_title(title)
                ax.set_xlabel("RL step")
            offset = steps[-1] if steps else offset
        axes[0].legend()
        fig.tight_layout()
        _savefig(fig, paths.join(workdir, "rl_curves.png"))
        plt.close(fig)
        written.append("rl_curves.png")
    rows = [r for stage_rows in runs.values() for r in stage_rows if "time_rollout_idle" in r]
    if rows:
        written.append(timeline_plot(plt, rows, paths.join(workdir, "rl_timeline.png")))
    return written


# Where each device group's time goes in an RL step: (metrics key, label) busy first.
TIMELINE = {"trainer": [("time_update", "update"), ("time_sync", "sync"), ("time_rollout_wait", "waits for rollout")],
            "rollout engine": [("time_generate", "rollout"), ("time_rollout_idle", "idle")]}


def timeline_plot(plt, rows: list[dict], file: str) -> str:
    """Per RL step (both stages in turn), the trainer's and the rollout engine's time as
    stacked bars: with `rl.max_staleness` > 0 each group's idle time shrinks."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), sharey=True)
    steps = np.arange(1, len(rows) + 1)
    for ax, (group, parts) in zip(axes, TIMELINE.items()):
        bottom = np.zeros(len(rows))
        for key, label in parts:
            values = np.array([r.get(key, 0.0) for r in rows])
            ax.bar(steps, values, bottom=bottom, label=label, width=0.9)
            bottom += values
        ax.set_title(group)
        ax.set_xlabel("RL step (stage 1, then stage 2)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("seconds")
    fig.tight_layout()
    _savefig(fig, file)
    plt.close(fig)
    return os.path.basename(file)


def _savefig(fig, file: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with paths.open_file(file, "wb") as f:
        f.write(buf.getvalue())
