"""Accuracy of a model on QA records, through the engine and the reward code (and, for open-ended
answers, an LLM judge's mean score: `eval.judge`).

`evaluate_records` is the library call (the RL stages' held-out curve, the demo): records in,
summary dict out, no files. `run` is task `eval`: any checkpoint on any set of benchmark
files, with `results.json`, a `results.md` laid out like the paper's Table 3, and the
per-question outputs. A question is scored in one place, `score_question`, with the same
reward code training uses, so an eval number and a training reward never disagree.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from fleming_jax import parallel, paths, rewards, sampler
from fleming_jax.data.records import QARecord, write_jsonl
from fleming_jax.data.sources import Malformed
from fleming_jax.progress import eta
from fleming_jax.prompts import completion_texts, record_prompts

# What PAPER.md states of the published results; it gives no other per-benchmark numbers.
PUBLISHED = ("Published (arXiv 2509.15279; only these are stated): macro average over 9 benchmarks, "
             "Fleming-R1-7B 63.4 (base 55.4, +cold start 58.5, +stage 1 61.2) and Fleming-R1-32B 75.4 "
             "(base 72.9, +cold start 74.5); Fleming-R1-32B on MedXpertQA 30.33. Avg above is over the "
             "benchmarks of this run, comparable only when they are the paper's nine.")


def fits_context(tokenizer, max_new_tokens: int, max_len: int) -> Callable[[QARecord], None]:
    """A reader check (`accept`): a record whose prompt plus `max_new_tokens` exceeds the
    model's `max_len` positions cannot be sampled, so it is dropped at the door, counted as
    `prompt_over_<max_len - max_new_tokens>_tokens`."""
    limit = max_len - max_new_tokens

    def accept(record: QARecord) -> None:
        if len(record_prompts(tokenizer, [record])[0]) > limit:
            raise Malformed(f"prompt_over_{limit}_tokens")
    return accept


# ---------------------------------------------------------------- the math (pure)

def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer (None = no answer, never a candidate); a tie goes to
    the answer seen first, so the vote is deterministic and k=1 votes for its one sample."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def pass_at_1(correct: Sequence[bool]) -> float:
    """pass@1 of one question estimated from k samples: the share that are correct."""
    return float(np.mean(correct))


def bootstrap_interval(values, level: float = 0.95, draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-question `values` and its percentile-bootstrap
    interval, resampling questions. `values` is [questions], or [runs, questions] with the
    same questions in every run (seeds), averaged over runs inside each draw. For a paired
    gain pass `after - before` per question: each question's difficulty cancels, which an
    interval on each accuracy alone cannot show."""
    table = np.atleast_2d(np.asarray(values, np.float64))
    if table.shape[1] == 0:
        raise ValueError("bootstrap_interval needs at least one question")
    per_question = table.mean(0)
    picks = np.random.default_rng(seed).integers(0, len(per_question), (draws, len(per_question)))
    low, high = np.quantile(per_question[picks].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return float(per_question.mean()), float(low), float(high)


def macro_average(values: Mapping[str, float]) -> float:
    """Unweighted mean over benchmarks (the paper's Avg): every benchmark counts the same."""
    return float(np.mean(list(values.values())))


def score_question(record: QARecord, completions: Sequence[str], lengths: Sequence[int]) -> dict:
    """The one place a question is scored: per sample the extracted answer, correctness and
    format (the rewards' own terms) and length; then the vote and whether it is right.
    A sample is correct exactly when its extracted answer is the reference, so the vote is
    right when the samples that cast it are."""
    scores = [rewards.score(t, record) for t in completions]
    extracted = [rewards.extract_answer(t, record) for t in completions]
    correct = [s["accuracy"] == 1.0 for s in scores]
    vote = majority_vote(extracted)
    return dict(id=record.id, gold=record.answer, completions=list(completions), extracted=extracted,
                correct=correct, format=[s["format"] == 1.0 for s in scores], lengths=[int(n) for n in lengths],
                vote=vote, vote_correct=vote is not None and any(c for a, c in zip(extracted, correct) if a == vote))


def summarize(rows: Sequence[dict]) -> dict:
    """accuracy = pass@1 averaged over questions; majority_accuracy = accuracy of the vote;
    format_error_rate and mean_length (tokens, stop token included) over all samples."""
    return dict(n=len(rows), accuracy=float(np.mean([pass_at_1(r["correct"]) for r in rows])),
                majority_accuracy=float(np.mean([r["vote_correct"] for r in rows])),
                format_error_rate=1.0 - float(np.mean([f for r in rows for f in r["format"]])),
                mean_length=float(np.mean([n for r in rows for n in r["lengths"]])))


def judge_outputs(records: Sequence[QARecord], outputs: list[dict], settings) -> dict:
    """Every sample scored by the LLM judge (`fleming_jax.judge.score` with `settings`: base_url,
    model, ...; open-ended answers a string match cannot check): each output row gets `judge`
    (its samples' scores, 0 where a verdict was unparsable or failed); returns the mean over
    questions of their samples' mean (`judge_score`) and the judge's counts."""
    from fleming_jax import judge

    samples = [(record, text) for record, row in zip(records, outputs) for text in row["completions"]]
    values, counts = judge.score([t for _, t in samples], [r for r, _ in samples], **dict(settings))
    start = 0
    for row in outputs:
        row["judge"], start = values[start:start + len(row["completions"])], start + len(row["completions"])
    return dict(judge_score=float(np.mean([np.mean(row["judge"]) for row in outputs])),
                judge={k: round(v, 2) for k, v in counts.items()})


# ---------------------------------------------------------------- through the engine

def sample_texts(engine: sampler.RolloutEngine, tokenizer, records: Sequence[QARecord], params: sampler.SamplingParams,
                 stop_ids: Sequence[int], key) -> tuple[list[list[str]], np.ndarray]:
    """(completions [records][k], lengths [records, k]) for one batch of records."""
    out = engine.generate(record_prompts(tokenizer, records), key, params, stop_ids)
    return completion_texts(tokenizer, out), out.lengths


def evaluate_records(engine: sampler.RolloutEngine, tokenizer, records: Sequence[QARecord],
                     params: sampler.SamplingParams | None = None, stop_ids: Sequence[int] | None = None, key=None,
                     batch_size: int = 64, progress: Callable[[int, int, list[dict]], None] | None = None) -> dict:
    """`summarize`'s numbers plus `outputs` (one `score_question` row per record), sampled
    through `engine` (synced by the caller); writes nothing. Defaults: greedy with 256 new
    tokens, the tokenizer's stop tokens. `progress(done, total, rows)` is called after each batch."""
    from fleming_jax import tokenizer as toklib

    if not records:
        raise ValueError("evaluate_records needs at least one record")
    params = params or sampler.SamplingParams(temperature=0.0)
    stop_ids = toklib.stop_ids(tokenizer) if stop_ids is None else stop_ids
    key = jax.random.key(0) if key is None else key
    rows = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        texts, lengths = sample_texts(engine, tokenizer, batch, params, stop_ids, jax.random.fold_in(key, start))
        rows += [score_question(r, t, n) for r, t, n in zip(batch, texts, lengths)]
        if progress:
            progress(len(rows), len(records), rows)
    return summarize(rows) | dict(outputs=rows)


# ---------------------------------------------------------------- task `eval`

def read_benchmarks(specs, limit: int = 0, accept: Callable[[QARecord], None] | None = None
                    ) -> list[tuple[str, list[QARecord], dict]]:
    """(name, records, reader report) per `config.benchmarks` entry; a missing file names the
    entry's config key and, where the entry says, the command that makes it. Questions that
    fail `accept` (e.g. `fits_context`) are counted in the report, not evaluated."""
    from fleming_jax.data import sources

    out, names = [], set()
    for i, spec in enumerate(specs):
        spec = dict(spec)
        fmt, path, producer = spec.pop("format", None), spec.pop("path", None), spec.pop("producer", None)
        if not fmt or not path:
            raise ValueError(f"config.benchmarks[{i}]: needs `format` and `path`, got {spec}")
        name = spec.pop("name", None) or fmt
        if output_name(name) in names:
            raise ValueError(f"config.benchmarks[{i}]: two benchmarks named {name!r} (output file "
                             f"{output_name(name)}.jsonl); give each a distinct `name`")
        names.add(output_name(name))
        try:
            records, report = sources.read_source(fmt, path, name, accept=accept, **spec)
        except FileNotFoundError as e:
            hint = f"run `{producer}` first, or point" if producer else "point"
            raise FileNotFoundError(f"config.benchmarks[{i}] ({name}): {path} does not exist; {hint} "
                                    f"config.benchmarks[{i}].path at the benchmark's file") from e
        if not records:
            raise ValueError(f"config.benchmarks[{i}] ({name}): no usable question in {path}; "
                             f"reader report {report.to_dict()}")
        out.append((name, records[:limit] if limit else records, report.to_dict()))
    return out


def output_name(name: str) -> str:
    """A benchmark's name as a file name inside `outputs/`: characters other than letters,
    digits, `.`, `_` and `-` become `_` and leading dots go, so `../x` or `/abs` stay inside."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "benchmark"


def load_tokenizer(config):
    """(tokenizer, model config) for `config.model` and `config.tokenizer`, refusing a missing
    checkpoint (naming its producer), an ambiguous source, or a tokenizer the model cannot embed.
    Cheap: it runs before the benchmarks are read and the model is built."""
    from fleming_jax import models
    from fleming_jax import tokenizer as toklib

    m = config.model
    if m.init_from and m.hf_path:
        raise ValueError(f"config.model.init_from={m.init_from} and config.model.hf_path={m.hf_path} are both set; "
                         "clear one (e.g. --config.model.init_from= to evaluate the HF model)")
    if m.init_from and not paths.exists(m.init_from):
        raise FileNotFoundError(f"config.model.init_from={m.init_from} does not exist; run "
                                f"`{config.init_from_producer}` first, or evaluate another model with "
                                "--config.model.init_from=<checkpoints> or --config.model.hf_path=<HF dir>")
    path = config.tokenizer or m.hf_path
    if not path:
        raise ValueError("config.tokenizer is empty and there is no config.model.hf_path to take it from")
    if not paths.is_hub_id(path) and not paths.exists(path):
        raise FileNotFoundError(f"config.tokenizer={path} does not exist; run `{config.tokenizer_producer}` "
                                "first, or point --config.tokenizer at the model's tokenizer directory")
    tokenizer = toklib.load(path)
    model_config = models.config_from(m)
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"vocab mismatch: the tokenizer at {path} has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {model_config.vocab_size}; evaluate with the tokenizer the model was "
                         "trained with")
    return tokenizer, model_config


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(results: dict) -> str:
    """Table 3's layout (rows = model, columns = benchmarks + Avg, accuracy in %), then the
    per-benchmark details and the published numbers PAPER.md gives."""
    names, k = list(results["benchmarks"]), results["sampling"]["num_samples"]
    b, macro, model = results["benchmarks"], results["macro"], results["model"]
    kinds = [("accuracy", "greedy" if results["sampling"]["temperature"] == 0 else "pass@1")]
    if k > 1:
        kinds = [("accuracy", f"pass@1, k={k}"), ("majority_accuracy", f"maj@{k}")]
    if "judge_score" in macro:
        kinds.append(("judge_score", "judge's mean score"))
    lines = ["| Model | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    lines += [f"| {model} ({what}) | " + " | ".join(_pct(b[n][key]) for n in names) + f" | {_pct(macro[key])} |"
              for key, what in kinds]
    lines += ["", "| benchmark | questions | dropped by reader | pass@1 | majority | format errors | mean length |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        r = b[n]
        dropped = ", ".join(f"{why} {c}" for why, c in r["reader"]["dropped"].items()) or "0"
        lines.append(f"| {n} | {r['n']} | {dropped} | {_pct(r['accuracy'])} | {_pct(r['majority_accuracy'])} | "
                     f"{_pct(r['format_error_rate'])} | {r['mean_length']:.1f} |")
    return "\n".join(lines + ["", PUBLISHED, ""])


def run(config, workdir: str) -> dict:
    """Task `eval`: writes `results.json`, `results.md` and `outputs/<output_name(benchmark)>.jsonl`,
    rewritten as each benchmark finishes (a later failure keeps what was done; `pending` in
    results.json names the benchmarks not yet evaluated)."""
    from fleming_jax import models
    from fleming_jax.engine import LocalEngine

    e, main = config.eval, parallel.is_main_process()
    if e.samples > 1 and e.temperature == 0:
        raise ValueError(f"config.eval.samples={e.samples} with temperature 0 gives {e.samples} identical greedy "
                         "samples; set --config.eval.temperature (e.g. 0.6) or samples=1")
    tokenizer, model_config = load_tokenizer(config)
    accept = fits_context(tokenizer, e.max_new_tokens, model_config.max_position_embeddings)
    benchmarks = read_benchmarks(config.benchmarks, e.limit, accept)
    # Built on the configured mesh (an FSDP import shards as it reads), then decoded in the
    # rollout layout: tensor parallel inside a host, so no weight is gathered per token.
    built_on = parallel.make_mesh(config.mesh)
    model, _ = models.build(config.model, built_on)
    engine = LocalEngine.of(model, mesh=parallel.rollout_mesh(-1, model_config.num_kv_heads, built_on))
    m = config.model
    label = e.model_name or m.init_from or m.hf_path or f"random {m.preset} (seed {m.seed})"
    params = sampler.SamplingParams(temperature=e.temperature, top_p=e.top_p, num_samples=e.samples,
                                    max_new_tokens=e.max_new_tokens)
    log = (lambda msg: print(f"[eval] {msg}", flush=True)) if main else (lambda msg: None)
    log(f"{label} on {', '.join(n for n, _, _ in benchmarks)}; {params}")
    results = dict(model=label, sampling=dataclasses.asdict(params), benchmarks={})
    for i, (name, records, report) in enumerate(benchmarks):
        t0 = time.perf_counter()
        if report["dropped"]:
            log(f"{name}: reader kept {report['kept']} of {report['read']}; dropped {report['dropped']} "
                f"(first at {report['examples']})")

        def progress(done, total, rows, name=name, t0=t0):
            left = eta(done, total, time.perf_counter() - t0)
            log(f"{name}: {done}/{total} questions, pass@1 {summarize(rows)['accuracy']:.3f} "
                f"({time.perf_counter() - t0:.1f}s{', ' + left if left else ''})")

        summary = evaluate_records(engine, tokenizer, records, params, key=jax.random.fold_in(jax.random.key(e.seed), i),
                                   batch_size=e.batch_size, progress=progress)
        outputs = summary.pop("outputs")
        if e.judge.base_url:
            summary |= judge_outputs(records, outputs, e.judge)
            log(f"{name}: judge's mean score {summary['judge_score']:.3f} ({summary['judge']})")
        results["benchmarks"][name] = summary | dict(reader=report, seconds=round(time.perf_counter() - t0, 2))
        keys = ("accuracy", "majority_accuracy", "format_error_rate", "mean_length") + (
            ("judge_score",) if e.judge.base_url else ())
        results["macro"] = {k: macro_average({n: r[k] for n, r in results["benchmarks"].items()}) for k in keys}
        results["pending"] = [n for n, _, _ in benchmarks[i + 1:]]
        if main:
            write_jsonl(paths.join(workdir, "outputs", f"{output_name(name)}.jsonl"), outputs)
            paths.write_text(paths.join(workdir, "results.json"), json.dumps(results, indent=2))
            paths.write_text(paths.join(workdir, "results.md"), markdown(results))
    log(f"results in {workdir}/results.json, results.md, outputs/\n{markdown(results)}")
    return results
