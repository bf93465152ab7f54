"""Verifiable rewards: answer extraction, correctness and format adherence.

The paper rewards only answer correctness and reasoning-format adherence (no length
term, against reward hacking). The reply format is the one in `fleming_jax.data.records`:
`<think>…</think>` then `<answer>X</answer>`.

Strict by design, so a policy cannot collect accuracy by hedging:
- only what comes after the last `</think>` counts: a draft `<answer>` inside the reasoning
  (or the model naming the tag there) neither pays nor costs accuracy (it costs the format
  reward). That tail needs exactly one `<answer>` and one `</answer>`, with nothing but
  whitespace after it (the answer is the last word; text between `</think>` and `<answer>`
  is allowed); an answer only inside `<think>`, under an unclosed `<think>`, followed by
  more text, or repeated after `</think>` scores 0 -- even repeated with the same letter
  (our call: a policy must commit once, and paying repeats invites tag spam); a missing
  `<think>` costs only the format reward;
- the answer must name one option: `B`, `(B)`, `B.`, `Answer: B`, `B. Aspirin` or `Aspirin (B)`
  (the text must be B's: `Heparin (C)` when C is Warfarin scores 0, our call) or the exact
  text of one option; "A, C", "A or C", "A and C" score 0;
- free-text answers (e.g. PubMedQA's yes/no/maybe) must equal the reference after
  normalisation (NFKC, case, punctuation, whitespace); "yes or no" scores 0.
Tags are matched ASCII-case-insensitively when counting, so `<Answer>C</Answer>` still
counts as a second answer; the format reward wants them spelled exactly.

All work is linear in the completion's length (tag scan with a fixed-string regex,
str methods); text inside the answer tag longer than `MAX_ANSWER_CHARS` is not an answer.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import unicodedata
from typing import Any, Mapping, Sequence

from fleming_jax.data.records import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, QARecord

MAX_ANSWER_CHARS = 2000

_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_TAG_RE = re.compile("|".join(re.escape(t) for t in _TAGS), re.IGNORECASE | re.ASCII)
# "Answer:", "The final answer is", "Option", "答案：" before the answer proper.
_PREFIX_RE = re.compile(
    r"(?:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\b(?:\s+is\b)?|答案(?:是|为)?)\s*:?\s*",
    re.IGNORECASE)
# One option letter, bare or bracketed, then an optional separator and maybe the option text.
_LETTER_RE = re.compile(r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])(?!\w))\s*[.:)\-]?\s*(.*)", re.DOTALL)
# Option text followed by its letter in brackets: "Aspirin (B)".
_TEXT_LETTER_RE = re.compile(r"(.*?)\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\])\s*\.?", re.DOTALL)
_DECORATION = " \t\r\n*_`'\""


def _tags(completion: str) -> list[tuple[str, int, int]]:
    """(canonical tag, start, end) for every reply-format tag, in order."""
    return [(m.group().lower(), m.start(), m.end()) for m in _TAG_RE.finditer(completion)]


def _answer_text(completion: str) -> str | None:
    """The text of the single answer block after the last `</think>`, else None.

    Only what follows the last `</think>` counts (a draft `<answer>` inside the reasoning,
    or the model naming the tag there, is reasoning); there must be exactly one answer
    block, no `<think>` reopened, and nothing but whitespace after `</answer>`. Without any
    `</think>` the whole completion is the tail, and an unclosed `<think>` gives None.
    """
    tags = _tags(completion)
    closes = [t for t in tags if t[0] == THINK_CLOSE]
    tail = [t for t in tags if t[1] >= closes[-1][2]] if closes else tags
    if any(t[0] == THINK_OPEN for t in tail):
        return None  # think reopened after the last close, or never closed
    answers = [t for t in tail if t[0] in (ANSWER_OPEN, ANSWER_CLOSE)]
    if [t[0] for t in answers] != [ANSWER_OPEN, ANSWER_CLOSE]:
        return None  # missing, unclosed, reversed or repeated
    (_, _, start), (_, end, after) = answers
    if completion[after:].strip():
        return None  # the answer must be the last word: what follows could revise it
    text = completion[start:end]
    return text if len(text) <= MAX_ANSWER_CHARS else None


def normalize(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form used for every text comparison."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def _strip_prefix(text: str) -> str:
    m = _PREFIX_RE.match(text)
    return text[m.end():].strip(_DECORATION) if m else text


def _option_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The one option `text` names, by letter (optionally followed by that option's own
    text) or by the option's exact text; None when it names none or several."""
    letters = {k.strip().upper(): normalize(v) for k, v in options.items()}
    m = _LETTER_RE.fullmatch(text)
    if m:
        letter = next(g for g in m.groups()[:3] if g).upper()
        rest = normalize(m.group(4))
        if letter in letters and (not rest or rest == letters[letter]):
            return letter
    m = _TEXT_LETTER_RE.fullmatch(text)
    if m and m.group(1).strip():
        letter = (m.group(2) or m.group(3)).upper()
        return letter if letter in letters and normalize(m.group(1)) == letters[letter] else None
    wanted = normalize(text)
    matches = [k for k, v in letters.items() if v and v == wanted]
    return matches[0] if len(matches) == 1 else None


def _reference(record: QARecord) -> str:
    if not record.options:
        return normalize(record.answer)
    letter = record.answer.strip().upper()
    if letter not in {k.strip().upper() for k in record.options}:
        raise ValueError(f"record {record.id!r}: answer {record.answer!r} is not one of its option "
                         f"letters {sorted(record.options)}; fix the record (answers are letters)")
    return letter


def extract_answer(completion: str, record: QARecord) -> str | None:
    """The completion's final answer in canonical form (an option letter, or normalised
    free text), or None when there is no single unambiguous answer."""
    raw = _answer_text(completion)
    if raw is None:
        return None
    raw = unicodedata.normalize("NFKC", raw).strip(_DECORATION)
    text = _strip_prefix(raw)
    if record.options:
        # An option text may itself start like a prefix ("Choice of ..."): try it whole too.
        return _option_letter(text, record.options) or (
            _option_letter(raw, record.options) if raw != text else None)
    return normalize(text) or None


def is_correct(completion: str, record: QARecord) -> bool:
    """Whether the single extracted answer is the record's (raises on a record whose answer
    is not one of its option letters: a data bug that would silently zero every reward)."""
    return extract_answer(completion, record) == _reference(record)


def format_ok(completion: str) -> bool:
    """Exactly `<think>non-empty</think> <answer>non-empty</answer>`, with only whitespace
    before, between and after, and the tags spelled exactly."""
    tags = _tags(completion)
    if [t[0] for t in tags] != list(_TAGS) or any(completion[s:e] != t for t, s, e in tags):
        return False
    (_, t0, t1), (_, t2, t3), (_, a0, a1), (_, a2, a3) = tags
    gaps = (completion[:t0], completion[t3:a0], completion[a3:])
    return (all(not g.strip() for g in gaps)
            and bool(completion[t1:t2].strip()) and bool(completion[a1:a2].strip()))


def score(completion: str, record: QARecord) -> dict[str, float]:
    """{'accuracy', 'format'}: a reply's two 0/1 terms (evaluation's per-sample scores; RL's
    reward is the weighted sum of `rl.rewards`, below)."""
    return dict(accuracy=float(is_correct(completion, record)), format=float(format_ok(completion)))


# ------------------------------------------------------------------ reward components (RL's `rl.rewards`)
# A reward component is a batched function `fn(completions, records, **kwargs) -> one float
# per completion` (completions: the decoded replies, list[str]; records: each reply's
# QARecord; kwargs: the component's own config keys besides fn and weight), or -> (those
# floats, {name: number} to log for the batch, e.g. a judge's request counts). RL's reward is
# the weighted sum of its components; one component (`rl.solved_by`, "correctness" by default)
# decides what counts as solved (its value >= `rl.solved_at`) for the pool's grading and mining
# and the `accuracy` metric.


def correctness(completions: Sequence[str], records: Sequence[QARecord]) -> list[float]:
    """1.0 where the reply's single final answer is the record's (`is_correct`), else 0.0."""
    return [float(is_correct(c, r)) for c, r in zip(completions, records)]


def format_adherence(completions: Sequence[str], records: Sequence[QARecord]) -> list[float]:
    """1.0 where the reply is exactly `<think>…</think> <answer>…</answer>` (`format_ok`)."""
    return [float(format_ok(c)) for c in completions]


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    fn: Any
    weight: float
    kwargs: Mapping[str, Any]


def load_components(spec: Mapping[str, Mapping[str, Any]], solved_by: str = "correctness",
                    key: str = "rl.rewards") -> list[Component]:
    """The components of `spec` ({name: {fn: "module:function", weight: w, **kwargs}}),
    imported and checked against the signature, so a bad entry fails in one line at start-up."""
    out = []
    for name, entry in dict(spec).items():
        entry = dict(entry)
        where = f"{key}.{name}"
        target, weight = entry.pop("fn", None), entry.pop("weight", 1.0)
        if not isinstance(target, str) or target.count(":") != 1:
            raise ValueError(f"{where}.fn={target!r}: name a function as 'module:function' "
                             "(e.g. 'fleming_jax.rewards:correctness')")
        module_name, function = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{where}.fn={target!r}: cannot import {module_name!r} ({e}); put it on PYTHONPATH") from e
        fn = getattr(module, function, None)
        if not callable(fn):
            raise ValueError(f"{where}.fn={target!r}: {module_name} has no function {function!r}")
        try:
            inspect.signature(fn).bind([], [], **entry)
        except TypeError as e:
            raise ValueError(f"{where}: {target}({', '.join(['completions', 'records', *entry])}) does not fit its "
                             f"signature {inspect.signature(fn)} ({e}); a reward takes (completions, records, "
                             "**its config keys)") from e
        if not isinstance(weight, (int, float)):
            raise ValueError(f"{where}.weight={weight!r}: a number")
        out.append(Component(name, fn, float(weight), entry))
    if solved_by not in {c.name for c in out}:
        raise ValueError(f"rl.solved_by={solved_by!r} is not one of {key}'s components {sorted(spec)}: name the "
                         "component whose value says solved (the pool's grading and mining count it; "
                         "'correctness' for closed questions, a judge's component for open-ended ones)")
    return out


def score_components(components: Sequence[Component], completions: Sequence[str],
                     records: Sequence[QARecord]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(each component's value for each completion and `reward`, their weighted sum; what the
    components report of the batch, as `<component>_<name>`)."""
    values, reported = {}, {}
    for c in components:
        got = c.fn(list(completions), list(records), **c.kwargs)
        if isinstance(got, tuple):
            got, extra = got
            reported.update({f"{c.name}_{k}": float(v) for k, v in extra.items()})
        got = [float(v) for v in got]
        if len(got) != len(completions) or not all(map(math.isfinite, got)):
            raise ValueError(f"reward {c.name!r} ({c.fn.__module__}:{c.fn.__name__}) returned {len(got)} values "
                             f"for {len(completions)} completions, or a non-finite one: one finite float each")
        values[c.name] = got
    values["reward"] = [sum(c.weight * values[c.name][i] for c in components) for i in range(len(completions))]
    return values, reported
