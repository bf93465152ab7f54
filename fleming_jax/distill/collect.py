"""Cold-start trajectory collection (the `distill` task): teacher chains of thought,
kept only when they verify.

For each QA record the teacher writes k replies to an answer-conditioned prompt (question +
gold answer, as the paper does; `answer_conditioned=False` asks blind). When none
verifies, up to `refine_rounds` rounds show the teacher its flawed chain and ask it to
backtrack and correct itself. A reply is kept when it is non-empty, its extracted answer
is correct, its format is exact and its length is within bounds; of those, the shortest
or all are kept. Each record's outcome is appended to `<workdir>/trajectories/<split>.jsonl`
as soon as its chunk is done, so a rerun skips every record already there and never asks
the teacher about it again.

On several hosts (a TPU slice) process 0 alone builds and asks the teacher and writes every
output; the other hosts keep step with it chunk by chunk (`lockstep`), so a SIGTERM on any
host stops all of them at the same chunk boundary, an error on process 0 stops them too, and
they return process 0's report. The HTTP and KG teachers are host-side Python, so that is all
they need. The local teacher is refused there: `teachers.from_config` puts its model on one
device of process 0, yet its engine checks for preemption between decode chunks, a collective
the waiting hosts would never join (a hang). Asking it from every host in step, with only the
writes guarded, would need that teacher built on every host's devices; serve the model
(`vllm serve`) and use the HTTP teacher instead.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Generator

import jax

from fleming_jax import parallel, paths, preemption, rewards
from fleming_jax.data import inputs
from fleming_jax.data.records import QARecord, write_jsonl
from fleming_jax.distill import teachers
from fleming_jax.progress import Progress
from fleming_jax.prompts import user_prompt

REASONS = ("empty", "wrong_answer", "bad_format", "too_short", "too_long")


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    k: int = 4  # replies asked per record per round
    answer_conditioned: bool = True
    refine_rounds: int = 2
    keep: str = "shortest"  # or "all"
    min_chars: int = 20
    max_chars: int = 8000
    temperature: float = 0.7
    max_tokens: int = 4096
    chunk: int = 32  # records in flight between two appends to the log

    def __post_init__(self):
        if self.keep not in ("shortest", "all"):
            raise ValueError(f"collect.keep={self.keep!r}: use 'shortest' or 'all'")


def _gold(record: QARecord) -> str:
    if record.options:
        letter = record.answer.strip().upper()
        return f"{letter}. {record.options.get(letter, '')}".strip()
    return record.answer


def first_chat(record: QARecord, answer_conditioned: bool) -> teachers.Chat:
    """The teacher's prompt: the student's prompt, plus the gold answer when conditioned."""
    text = user_prompt(record)
    if answer_conditioned:
        text += (f"\n\nThe correct answer is {_gold(record)}. Write a concise, logically structured "
                 "chain of thought that reaches it from the question, stating any assumptions, in "
                 "the format asked above. Do not mention that you were given the answer.")
    return [{"role": "user", "content": text}]


def refine_chat(first: teachers.Chat, flawed: str, record: QARecord, answer_conditioned: bool) -> teachers.Chat:
    """Shows the teacher its flawed chain and asks it to backtrack and correct itself."""
    hint = f" The correct answer is {_gold(record)}." if answer_conditioned else ""
    return first + [{"role": "assistant", "content": flawed}, {"role": "user", "content": (
        "Your reasoning above does not reach a verified answer in the required format." + hint +
        " Go back to the step where it went wrong, consider alternative hypotheses, correct "
        "yourself, and write the complete corrected reasoning and answer in the required format.")}]


def rejection(completion: str, record: QARecord, cfg: CollectConfig) -> str | None:
    """Why a reply is not kept (one of REASONS), or None when it is."""
    if not completion.strip():
        return "empty"
    if not rewards.is_correct(completion, record):
        return "wrong_answer"
    if not rewards.format_ok(completion):
        return "bad_format"
    if len(completion) < cfg.min_chars:
        return "too_short"
    if len(completion) > cfg.max_chars:
        return "too_long"
    return None


def sft_record(record: QARecord, trajectory: str, index: int, refine_round: int) -> dict:
    """The SFT chat: the student's prompt (no system prompt) and the teacher's reply."""
    return {"id": record.id if index == 0 else f"{record.id}#{index}",
            "messages": [{"role": "user", "content": user_prompt(record)},
                         {"role": "assistant", "content": trajectory}],
            "meta": {"source": record.source, "answer": record.answer, "refine_round": refine_round}}


def collect_chunk(records: list[QARecord], teacher: teachers.Teacher, cfg: CollectConfig) -> list[dict]:
    """One outcome per record: {id, answered, verified, refine_rounds, rejected, sft}."""
    firsts = [first_chat(r, cfg.answer_conditioned) for r in records]
    chats = list(firsts)
    outcomes = [dict(id=r.id, answered=False, verified=False, refine_rounds=0,
                     rejected=collections.Counter(), sft=[]) for r in records]
    pending = list(range(len(records)))
    for round_ in range(cfg.refine_rounds + 1):
        if not pending:
            break
        replies = teacher.complete_many([chats[i] for i in pending], n=cfg.k,
                                        temperature=cfg.temperature, max_tokens=cfg.max_tokens)
        still = []
        for i, completions in zip(pending, replies):
            record, out = records[i], outcomes[i]
            out["refine_rounds"] = round_
            good = []
            for c in completions:
                reason = rejection(c, record, cfg)
                out["answered"] |= reason != "empty"
                out["verified"] |= reason not in ("empty", "wrong_answer")
                if reason:
                    out["rejected"][reason] += 1
                else:
                    good.append(c)
            flawed = next((c for c in completions if c.strip()), None)
            if good:
                keep = [min(good, key=len)] if cfg.keep == "shortest" else good
                out["sft"] = [sft_record(record, t, j, round_) for j, t in enumerate(keep)]
            elif flawed is not None and round_ < cfg.refine_rounds:
                chats[i] = refine_chat(firsts[i], flawed, record, cfg.answer_conditioned)
                still.append(i)
        pending = still
    return outcomes


def read_log(path: str) -> list[dict]:
    """Outcomes already written; a last line cut short by a kill is dropped from the file."""
    if not paths.exists(path):
        return []
    lines = paths.read_text(path).split("\n")
    done = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # a bad line that is not the unfinished last one
                raise ValueError(f"{path}:{number}: not valid JSON; delete the line to resume") from None
            paths.write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in done))  # drop it
    return done


def collecting(records: list[QARecord], teacher: teachers.Teacher, cfg: CollectConfig, log_path: str,
               progress=print) -> Generator[None, None, list[dict]]:
    """`collect` one chunk a step (a generator; its return value is the outcomes), for `lockstep`."""
    done = {d["id"]: d for d in read_log(log_path)}
    todo = [r for r in records if r.id not in done]
    if done:
        progress(f"resuming {log_path}: {len(done)} records done, {len(todo)} to ask")
    shown = Progress(len(todo), "records asked", progress)
    with paths.Appender(log_path) as log:
        for start in range(0, len(todo), cfg.chunk):
            for out in collect_chunk(todo[start:start + cfg.chunk], teacher, cfg):
                log.write(json.dumps(out, ensure_ascii=False) + "\n")
                done[out["id"]] = out
            log.flush()
            shown.update(min(start + cfg.chunk, len(todo)))
            yield  # the log holds every finished chunk: a rerun stopped here asks the rest
    return [done[r.id] for r in records if r.id in done]


def collect(records: list[QARecord], teacher: teachers.Teacher, cfg: CollectConfig, log_path: str,
            progress=print) -> list[dict]:
    """Outcomes for every record, in the records' order, asking only about those not yet in
    `log_path` and appending each chunk's outcomes to it as it finishes (one host)."""
    return lockstep(collecting(records, teacher, cfg, log_path, progress), "distillation")


# ---------------------------------------------------------------- several hosts
# Distillation on several hosts: process 0 works, the others keep step (`parallel.on_main`).


def lockstep(work: Generator | None, where: str) -> Any:
    """Runs `work`, process 0's generator of host-side steps (None on the other hosts), with
    every host in step: before each step all pass the preemption check (`where`), after it all
    learn from process 0 whether there is more. Returns the generator's (JSON-able) value on
    every host."""
    def step():
        try:
            next(work)
            return True, None
        except StopIteration as stop:
            return False, stop.value
    try:
        while True:
            preemption.check(where)
            more, value = parallel.on_main(step)
            if not more:
                return value
    finally:
        if work is not None:
            work.close()


def summarize(outcomes: list[dict], resumed: int) -> dict:
    rejected = collections.Counter()
    for o in outcomes:
        rejected.update(o["rejected"])
    return {"records_asked": len(outcomes), "resumed_from_log": resumed,
            "answered": sum(o["answered"] for o in outcomes),
            "verified": sum(o["verified"] for o in outcomes),
            "kept": sum(bool(o["sft"]) for o in outcomes),
            "kept_after_refinement": sum(bool(o["sft"]) and o["refine_rounds"] > 0 for o in outcomes),
            "trajectories_kept": sum(len(o["sft"]) for o in outcomes),
            "rejected": {r: rejected[r] for r in REASONS if rejected[r]}}


def _read_records(path: str, key: str) -> list[QARecord]:
    """The checked QA records of `config.data.<key>` (see `fleming_jax.data.inputs`)."""
    return inputs.read_records(path, f"data.{key}", (
        "run `python main.py --config=configs/synthesize.py --workdir=runs/synthesize` first, or point "
        f"--config.data.{key} at a QA-record JSONL file"))


def run(config, workdir: str) -> dict:
    """The `distill` task: every split in `config.data` -> `<workdir>/<split>.jsonl` SFT chats.
    Process 0 does the work and every host returns its report (see the module docstring)."""
    if config.teacher.kind == "local" and jax.process_count() > 1:
        raise ValueError(f"config.teacher.kind='local' cannot run in a job of {jax.process_count()} processes "
                         "(its model sits on one device of process 0, and its engine's preemption checks need "
                         "every host); run distill on one host, or serve the model (e.g. `vllm serve`) and use "
                         "--config.teacher.kind=http")
    return lockstep(_distill(config, workdir) if parallel.is_main_process() else None, "distillation")


def _distill(config, workdir: str) -> Generator[None, None, dict]:
    """`run` on process 0, one teacher chunk a step."""
    cfg = CollectConfig(**config.collect)
    splits = {k: v for k, v in config.data.items() if v}
    inputs = {split: _read_records(path, split) for split, path in splits.items()}
    if config.get("max_records"):
        inputs = {s: rows[:config.max_records] for s, rows in inputs.items()}
    teacher = teachers.from_config(config.teacher, [r for rows in inputs.values() for r in rows])
    report = {}
    for split, rows in inputs.items():
        log_path = paths.join(workdir, "trajectories", f"{split}.jsonl")
        resumed = len(read_log(log_path))
        outcomes = yield from collecting(rows, teacher, cfg, log_path,
                                         progress=lambda m: print(f"[distill:{split}] {m}", flush=True))
        out = paths.join(workdir, f"{split}.jsonl")
        write_jsonl(out, [s for o in outcomes for s in o["sft"]])
        report[split] = summarize(outcomes, resumed) | {"output": out}
        print(f"[distill:{split}] {json.dumps(report[split])}", flush=True)
    paths.write_text(paths.join(workdir, "report.json"), json.dumps(report, indent=1))
    return report
