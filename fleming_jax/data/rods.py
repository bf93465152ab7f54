"""The `synthesize` task: RODS data end to end.

Reads the configured QA sources and evaluation sets, builds the knowledge graph,
synthesises questions weighted toward entities the curated text rarely mentions, cleans
everything together (format checks, dedup, decontamination), splits train/validation and
writes `train.jsonl`, `validation.jsonl`, `report.json` and `report.md` into the workdir.
On several hosts process 0 does it all (host-side Python, no device program) and the others
wait for it and return its report.
"""

from __future__ import annotations

import collections
import json
import random
import time

from fleming_jax import parallel, paths
from fleming_jax.data import kg as kglib
from fleming_jax.data import quality, sources, synthesis
from fleming_jax.data.records import QARecord, write_jsonl

COVERED_TYPES = ("disease", "gene", "drug")


def _log(message: str):
    print(f"[synthesize] {message}", flush=True)


def mentions(kg: kglib.KG, records: list[QARecord], types=COVERED_TYPES) -> collections.Counter:
    """How many records name each entity of `types` (whole-word match of normalised names)."""
    by_first = collections.defaultdict(list)
    for e in kg.entities.values():
        words = tuple(quality.normalize(e.name).split())
        if e.type in types and words and len(" ".join(words)) >= 3:
            by_first[words[0]].append((words, e.id))
    counts = collections.Counter()
    for r in records:
        words = quality.normalize(" ".join([r.question, *(r.options or {}).values()])).split()
        found = {id for i, w in enumerate(words) for name, id in by_first.get(w, ())
                 if tuple(words[i:i + len(name)]) == name}
        counts.update(found)
    return counts


def _coverage(kg: kglib.KG, counts: collections.Counter) -> dict[str, int]:
    return {t: sum(1 for id in counts if kg.entities[id].type == t) for t in COVERED_TYPES}


def build_kg(cfg) -> kglib.KG:
    """HPO (default) plus any PrimeKG / triples files the config names, in one graph."""
    graph = kglib.KG()
    if cfg.hpo:
        graph = kglib.load_hpo(cfg.get("hpo_dir") or None, max_diseases=cfg.get("max_diseases") or None,
                               seed=cfg.seed)
    if cfg.get("primekg"):
        graph, skipped = kglib.load_primekg(cfg.primekg, graph)
        _log(f"PrimeKG: skipped rows by relation {dict(skipped)}")
    if cfg.get("triples"):
        graph = kglib.load_triples(cfg.triples, graph)
    return graph


def _read_all(specs, what: str):
    records, reports = [], {}
    for spec in specs:
        spec = dict(spec)
        fmt, path = spec.pop("format", None), spec.pop("path", None)
        if not fmt or not path:
            raise ValueError(f"config.{what}: each entry needs `format` and `path`, got {spec}")
        name = spec.pop("name", None) or fmt
        if name in reports:
            raise ValueError(f"config.{what}: two sources named {name!r}; give each a distinct `name`")
        got, reports[name] = sources.read_source(fmt, path, name, **spec)
        records += got
        _log(f"read {what} {name}: {reports[name].read} rows, {len(got)} records")
    return records, reports


def run(config, workdir: str) -> dict:
    return parallel.on_main(_synthesize, config, workdir)


def _synthesize(config, workdir: str) -> dict:
    timings, t0 = {}, time.perf_counter()
    curated, reports = _read_all(config.sources, "sources")
    eval_records, _ = _read_all(config.get("eval_sets", []), "eval_sets")
    eval_sets = collections.defaultdict(list)
    for r in eval_records:
        eval_sets[r.source].append(r)
    timings["read"] = time.perf_counter() - t0

    t = time.perf_counter()
    clean_cfg = quality.CleanConfig(**config.clean)
    curated = quality.clean(curated, reports, eval_sets, clean_cfg)
    _log(f"cleaned curated sources: {len(curated)} records kept")
    timings["clean_curated"] = time.perf_counter() - t

    t = time.perf_counter()
    graph = build_kg(config.kg)
    _log(f"knowledge graph: {graph.stats()}")
    timings["kg"] = time.perf_counter() - t

    t = time.perf_counter()
    before = mentions(graph, curated)
    synth_cfg = synthesis.SynthConfig(**{k: v for k, v in config.synthesis.items()})
    synthetic, failed = synthesis.synthesize(graph, synth_cfg, mentions=before, progress=_log)
    name = "kg_synthesis"
    reports[name] = sources.SourceReport(name, read=len(synthetic))
    # Synthetic items are cleaned with the curated ones so they never repeat them.
    kept = quality.clean(curated + synthetic, reports, eval_sets, clean_cfg)
    synthetic = [r for r in kept if r.source == name]
    after = before + mentions(graph, synthetic)
    timings["synthesize"] = time.perf_counter() - t

    rng = random.Random(config.seed)
    rng.shuffle(kept)
    n_val = int(round(len(kept) * config.validation_fraction))
    splits = {"validation": kept[:n_val], "train": kept[n_val:]}
    for split, rows in splits.items():
        write_jsonl(paths.join(workdir, f"{split}.jsonl"), rows)

    report = {
        "sources": {n: r.to_dict() for n, r in reports.items()},
        "decontamination": {e: sum(r.dropped.get(f"contaminated:{e}", 0) for r in reports.values())
                            for e in eval_sets},
        "kg": graph.stats(),
        "synthesis": {"requested": synth_cfg.num_questions, "kept": len(synthetic),
                      "path_types": dict(collections.Counter(r.meta["path_type"] for r in synthetic)),
                      "hops": {str(k): v for k, v in sorted(collections.Counter(
                          r.meta["hops"] for r in synthetic).items())},
                      "failed_attempts": dict(sorted(failed.items()))},
        "coverage": {"curated": _coverage(graph, before), "curated+synthetic": _coverage(graph, after)},
        "splits": {k: len(v) for k, v in splits.items()},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    paths.write_text(paths.join(workdir, "report.json"), json.dumps(report, indent=1))
    markdown = to_markdown(report)
    paths.write_text(paths.join(workdir, "report.md"), markdown)
    print(markdown, flush=True)
    _log(f"wrote {workdir}/train.jsonl, validation.jsonl, report.json, report.md")
    return report


def to_markdown(report: dict) -> str:
    lines = ["# RODS data report", "", "| source | read | kept | dropped (by reason) |", "|---|---|---|---|"]
    for name, r in report["sources"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) or "-"
        lines.append(f"| {name} | {r['read']} | {r['kept']} | {dropped} |")
    s = report["synthesis"]
    lines += ["", f"Decontamination (removed per evaluation set): {report['decontamination'] or 'none configured'}",
              "", f"Knowledge graph: {report['kg']['entities']}; relations {report['kg']['relations']}",
              "", f"Synthesis: {s['kept']} kept of {s['requested']} requested; path types {s['path_types']}; "
                  f"hops {s['hops']}",
              "", "| distinct entities mentioned | " + " | ".join(COVERED_TYPES) + " |",
              "|---|" + "---|" * len(COVERED_TYPES)]
    for k, v in report["coverage"].items():
        lines.append(f"| {k} | " + " | ".join(str(v[t]) for t in COVERED_TYPES) + " |")
    lines += ["", f"Splits: {report['splits']}; timings (s): {report['timings_s']}", ""]
    return "\n".join(lines)
