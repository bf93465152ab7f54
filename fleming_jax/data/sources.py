"""Readers that turn each public medical QA set, in the schema it is published in, into
`QARecord`s.

`read_source(format, path, name=None, **options)` is the one entry point. A reader is a
tiny field mapping `(row, options) -> QARecord` in `READERS`; loading rows from files or
datasets and checking the mapped record are shared. A row that cannot be mapped (a missing
field, an answer that is not among the options, an empty question) is counted under its
reason in the `SourceReport`, never crashed on.

`path` may be a local .jsonl/.json/.parquet/.csv/.tsv file, an HF `datasets` directory
saved with `save_to_disk`, `hf:NAME[:CONFIG]` (hub download; needs the network), or
`tfds:NAME` (a TFDS dataset prepared as array_record under option `data_dir`). Options
common to every format: `split` (HF/TFDS split, default "train"), `limit` (max rows).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import re
import string
from typing import Any, Callable, Iterator

from fleming_jax import paths
from fleming_jax.data.records import QARecord, numbered_jsonl, read_jsonl

LETTERS = string.ascii_uppercase


class Malformed(ValueError):
    """A row that cannot become a record; `reason` keys the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class SourceReport:
    """What one source gave: rows read, records kept, rows dropped by reason, and the
    location of the first row dropped for each reason (to find and fix it)."""

    name: str
    read: int = 0
    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, where: str):
        self.dropped[reason] += 1
        self.examples.setdefault(reason, where)

    def to_dict(self) -> dict[str, Any]:
        return dict(read=self.read, kept=self.kept, dropped=dict(sorted(self.dropped.items())),
                    examples=self.examples)

    def summary(self) -> str:
        """One line: kept of read, then each reason's count and where it first occurred."""
        dropped = ", ".join(f"{why} {n} (first at {self.examples[why]})" for why, n in sorted(self.dropped.items()))
        return f"kept {self.kept} of {self.read} rows" + (f"; dropped {dropped}" if dropped else "")


# ---------------------------------------------------------------- loading rows

def load_rows(path: str, split: str = "train", data_dir: str | None = None
              ) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs from any supported container; location names file and line/row."""
    if path.startswith("hf:"):
        import datasets  # network: never in tests

        name, _, config = path[3:].partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
        yield from ((f"{path}[{split}] row {i}", row) for i, row in enumerate(ds))
    elif path.startswith("tfds:"):
        import tensorflow_datasets as tfds

        ds = tfds.data_source(path[5:], split=split, data_dir=data_dir)
        for i in range(len(ds)):
            yield f"{path}[{split}] row {i}", _decode(ds[i])
    elif paths.path(path).is_dir():
        import datasets

        ds = datasets.load_from_disk(paths.local_dir(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r}; splits: {list(ds)} (set option split)")
            ds = ds[split]
        yield from ((f"{path} row {i}", row) for i, row in enumerate(ds))
    elif not paths.exists(path):
        raise FileNotFoundError(f"{path}: no such file; point the source's path at a local or gs:// "
                                "file or dataset directory, or use hf:NAME / tfds:NAME")
    elif path.endswith(".jsonl"):
        yield from ((f"{path}:{number}", row) for number, row in numbered_jsonl(path))
    elif path.endswith(".json"):
        data = json.loads(paths.read_text(path))
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            # PubMedQA style: {key: row}; the key becomes the row's `_key`.
            yield from ((f"{path} key {k}", {"_key": k, **v}) for k, v in data.items())
        elif isinstance(data, list):
            yield from ((f"{path} item {i}", row) for i, row in enumerate(data))
        else:
            raise ValueError(f"{path}: expected a JSON list of rows or an object of rows")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with paths.open_file(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
    elif path.endswith((".csv", ".tsv")):
        with paths.open_file(path) as f:
            reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    else:
        raise ValueError(f"{path}: unknown file type; use .jsonl, .json, .parquet, .csv or .tsv")


def _decode(row: dict) -> dict:
    """TFDS data sources give text as bytes."""
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in row.items()}


# ---------------------------------------------------------------- shared mapping helpers

def _get(row: dict, *keys: str) -> Any:
    """The first present, non-empty value among `keys`; Malformed names the field if none."""
    for key in keys:
        value = row.get(key)
        if value is not None and value != "":
            return value
    raise Malformed(f"missing_{keys[0]}")


def _lettered(texts: list) -> dict[str, str]:
    return {LETTERS[i]: str(t) for i, t in enumerate(texts) if t is not None and str(t) != ""}


def _index_answer(value: Any, base: int) -> str:
    """Letter of an integer answer index counted from `base` (0 or 1)."""
    try:
        index = int(value) - base
    except (TypeError, ValueError):
        raise Malformed("answer_not_an_index") from None
    if not 0 <= index < len(LETTERS):
        raise Malformed("answer_not_in_options")
    return LETTERS[index]


def _id(row: dict, options: dict, *keys: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return str(options["_row"])


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[\.\):：、]\s*")


def _options_from(value: Any) -> dict[str, str]:
    """A dict of letter -> text from a dict, a list (possibly "A. text" items), or one
    "A text\\nB text" string (CMExam)."""
    if isinstance(value, dict):
        return {str(k).strip(): str(v) for k, v in value.items() if v not in (None, "")}
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
        out = {}
        for line in value:
            m = re.match(r"^\s*([A-Z])[\.\):：、\s]\s*(.*)$", line)
            if not m:
                raise Malformed("options_unparsable")
            out[m.group(1)] = m.group(2).strip()
        return out
    if isinstance(value, list):
        if all(isinstance(v, dict) and "key" in v for v in value):
            return {str(v["key"]): str(v["value"]) for v in value}
        stripped = [_OPTION_PREFIX.sub("", str(v), count=1) for v in value]
        return _lettered(stripped)
    raise Malformed("options_unparsable")


# ---------------------------------------------------------------- readers (field mappings)

def _medqa(row, o):
    return QARecord(_id(row, o, "id"), o["_name"], _get(row, "question"), _get(row, "answer_idx"),
                    _options_from(_get(row, "options")),
                    meta={k: row[k] for k in ("meta_info",) if row.get(k)})


def _medmcqa(row, o):
    # The HF release counts `cop` from 0, the original GitHub JSON from 1: say which (cop_base).
    base = o.get("cop_base", 0)
    return QARecord(_id(row, o, "id"), o["_name"], _get(row, "question"),
                    _index_answer(_get(row, "cop"), base),
                    _lettered([row.get(k) for k in ("opa", "opb", "opc", "opd")]),
                    explanation=row.get("exp") or None,
                    meta={k: row[k] for k in ("subject_name", "topic_name", "choice_type") if row.get(k)})


def _pubmedqa(row, o):
    # Original JSON: {PMID: {QUESTION, CONTEXTS, final_decision, LONG_ANSWER}}; HF: pubid,
    # question, context.contexts, final_decision, long_answer.
    question = _get(row, "QUESTION", "question")
    contexts = row.get("CONTEXTS") or (row.get("context") or {}).get("contexts") or []
    answer = str(_get(row, "final_decision")).strip().lower()
    if answer not in ("yes", "no", "maybe"):
        raise Malformed("answer_not_yes_no_maybe")
    text = "\n".join(["Context: " + " ".join(contexts), "", "Question: " + question]) if contexts else question
    return QARecord(_id(row, o, "_key", "pubid"), o["_name"], text, answer,
                    explanation=row.get("LONG_ANSWER") or row.get("long_answer") or None)


MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                "medical_genetics", "professional_medicine")


def _mmlu(row, o):
    subject = row.get("subject", "")
    if subject not in o.get("subjects", MMLU_MEDICAL):
        raise Malformed("other_subject")
    return QARecord(_id(row, o, "id"), o["_name"], _get(row, "question"),
                    _index_answer(_get(row, "answer"), 0), _lettered(list(_get(row, "choices"))),
                    meta={"subject": subject})


def _mmlu_pro(row, o):
    category = row.get("category", "")
    if category not in o.get("categories", ("health", "biology")):
        raise Malformed("other_category")
    answer = _get(row, "answer")
    if "answer_index" in row and _index_answer(row["answer_index"], 0) != answer:
        raise Malformed("answer_index_mismatch")
    options = [x for x in _get(row, "options") if x != "N/A"]
    return QARecord(_id(row, o, "question_id"), o["_name"], _get(row, "question"), answer,
                    _lettered(options), meta={"category": category})


def _headqa(row, o):
    answers = sorted(_get(row, "answers"), key=lambda a: int(a["aid"]))
    return QARecord(_id(row, o, "qid"), o["_name"], _get(row, "qtext"),
                    _index_answer(_get(row, "ra"), 1), _lettered([a["atext"] for a in answers]),
                    meta={k: row[k] for k in ("category", "year") if row.get(k)})


def _medxpertqa(row, o):
    # The published question repeats the options after "Answer Choices:"; ours come from `options`.
    question = re.split(r"\n\s*Answer Choices:", _get(row, "question"))[0]
    return QARecord(_id(row, o, "id"), o["_name"], question, _get(row, "label"),
                    _options_from(_get(row, "options")),
                    meta={k: row[k] for k in ("medical_task", "body_system", "question_type") if row.get(k)})


def _careqa(row, o):
    # CareQA counts `cop` from 1.
    return QARecord(_id(row, o, "unique_id", "id"), o["_name"], _get(row, "question"),
                    _index_answer(_get(row, "cop"), o.get("cop_base", 1)),
                    _lettered([row.get(f"op{i}") for i in range(1, 5)]),
                    meta={k: row[k] for k in ("category", "year") if row.get(k)})


def _lettered_mcq(row, o):
    """JMED and the like: `options` (dict or list, up to 21) and `answer` letter."""
    return QARecord(_id(row, o, "id"), o["_name"], _get(row, "question"),
                    str(_get(row, "answer")).strip(), _options_from(_get(row, "options")))


def _medbullets(row, o):
    return QARecord(_id(row, o, "id", "link"), o["_name"], _get(row, "question"),
                    str(_get(row, "answer_idx")).strip(),
                    _lettered([row.get(k) for k in ("opa", "opb", "opc", "opd", "ope")]),
                    explanation=row.get("explanation") or None)


def _cmexam(row, o):
    # CMExam CSV: Question, Options ("A text\nB text"), Answer letters; CMB: question,
    # option {A: ...}, answer. Multi-answer items have no single verifiable letter.
    answer = str(_get(row, "Answer", "answer")).strip()
    if len(answer) != 1:
        raise Malformed("multiple_answers")
    return QARecord(_id(row, o, "id"), o["_name"], _get(row, "Question", "question"), answer,
                    _options_from(_get(row, "Options", "option")),
                    explanation=row.get("Explanation") or row.get("explanation") or None,
                    meta={"language": "zh"})


def _medkgqa(row, o):
    graphs = o.get("_graphs")
    meta = {"graph_idx": row.get("graph_idx")}
    if graphs is not None and row.get("graph_idx") is not None:
        meta["kg_graph"] = graphs.get(int(row["graph_idx"]))
    return QARecord(_id(row, o, "id"), o["_name"], _get(row, "question"),
                    str(_get(row, "answer")).strip(), _options_from(_get(row, "choices")), meta=meta)


def _jsonl(row, o):
    try:
        return QARecord.from_dict(row)
    except (TypeError, ValueError):
        raise Malformed("not_a_qa_record") from None


READERS: dict[str, Callable[[dict, dict], QARecord]] = {
    "medqa": _medqa, "medmcqa": _medmcqa, "pubmedqa": _pubmedqa, "mmlu": _mmlu,
    "mmlu_pro": _mmlu_pro, "headqa": _headqa, "medxpertqa": _medxpertqa, "careqa": _careqa,
    "jmed": _lettered_mcq, "medbullets": _medbullets, "cmexam": _cmexam,
    "medkgqa": _medkgqa, "jsonl": _jsonl,
}


# ---------------------------------------------------------------- the entry point

def check(record: QARecord) -> QARecord:
    """The checks every mapped record passes: a question, an answer, the answer among options
    (text everywhere: a null or a number is not an answer)."""
    if not isinstance(record.question, str) or not record.question.strip():
        raise Malformed("empty_question")
    if record.options is not None:
        if not isinstance(record.options, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in record.options.items()):
            raise Malformed("options_not_text")
        if len(record.options) < 2:
            raise Malformed("too_few_options")
        if not isinstance(record.answer, str) or record.answer not in record.options:
            raise Malformed("answer_not_in_options")
    elif not isinstance(record.answer, str) or not record.answer.strip():
        raise Malformed("missing_answer")
    rubric = (record.meta or {}).get("rubric")  # an open-ended record's grading rubric, for the judge
    if rubric is not None and (not isinstance(rubric, str) or not rubric.strip()):
        raise Malformed("rubric_not_text")
    return record


def _load_graphs(path: str) -> dict[int, Any]:
    """MedKgQA_graph.jsonl: line i (0-based) is subgraph i unless a row names its `graph_idx`."""
    return {int(g.get("graph_idx", i)) if isinstance(g, dict) else i: g
            for i, g in enumerate(read_jsonl(path))}


def read_source(format: str, path: str, name: str | None = None,
                accept: Callable[[QARecord], None] | None = None, **options
                ) -> tuple[list[QARecord], SourceReport]:
    """Records of one source and its report; `name` (default: the format) is the record's
    `source` and keys the report. `accept(record)` may raise `Malformed` to drop a record
    this run cannot use. Options: see the module docstring and each reader."""
    if format not in READERS:
        raise ValueError(f"unknown source format {format!r}; formats: {', '.join(READERS)}")
    name = name or format
    reader, report, records, seen = READERS[format], SourceReport(name), [], set()
    opts = dict(options, _name=name)
    if options.get("graph_path"):
        opts["_graphs"] = _load_graphs(options["graph_path"])
    limit = options.get("limit")
    for row_number, (where, row) in enumerate(load_rows(path, options.get("split", "train"),
                                                        options.get("data_dir"))):
        if limit is not None and report.read >= limit:
            break
        report.read += 1
        try:
            if not isinstance(row, dict):
                raise Malformed("not_an_object")
            record = check(reader(row, dict(opts, _row=f"{name}-{row_number}")))
            if accept:
                accept(record)
        except Malformed as e:
            report.drop(e.reason, where)
            continue
        if record.id in seen:  # ids key the splits and the reports: keep them unique
            record.id = f"{record.id}#{row_number}"
        seen.add(record.id)
        record.source = name
        records.append(record)
    report.kept = len(records)
    return records, report
