"""Verifiable rewards: a table of completions with hand-written rewards (defaults: 1.0 for a
right answer + 0.1 for the format), including every gaming pattern we refuse to pay for."""

import string

import ml_collections
import pytest

from configs import rl_stage1
from fleming_jax import rewards
from fleming_jax.data.records import QARecord, format_reply

MCQ = QARecord(id="mcq", source="t", question="Which drug irreversibly inhibits COX-1?", answer="B",
               options={"A": "Ibuprofen", "B": "Aspirin", "C": "Warfarin", "D": "Heparin"})
JMED = QARecord(id="jmed", source="t", question="q", answer="U",
                options={c: f"Drug {c.lower()}{i}" for i, c in enumerate(string.ascii_uppercase[:21])})
ZH = QARecord(id="zh", source="t", question="问题", answer="B",
              options={"A": "布洛芬", "B": "阿司匹林", "C": "华法林", "D": "肝素"})
PREFIXLIKE = QARecord(id="p", source="t", question="q", answer="A",
                      options={"A": "Choice of drug depends on renal function", "B": "Optional surgery"})
PUBMED = QARecord(id="pub", source="t", question="Does X reduce Y?", answer="yes")
FREE = QARecord(id="free", source="t", question="Diagnosis?", answer="Type 2 diabetes mellitus")

R = "The patient needs an irreversible COX inhibitor."
OK = format_reply(R, "B")
MB = 1_000_000

TABLE = [
    # name, completion, record, reward, accuracy, format
    ("right", OK, MCQ, 1.1, 1, 1),
    ("wrong", format_reply(R, "C"), MCQ, 0.1, 0, 1),
    ("lowercase letter", format_reply(R, "b"), MCQ, 1.1, 1, 1),
    ("parenthesised", format_reply(R, "(B)"), MCQ, 1.1, 1, 1),
    ("bracketed with dot", format_reply(R, "[B]."), MCQ, 1.1, 1, 1),
    ("letter and its text", format_reply(R, "B. Aspirin"), MCQ, 1.1, 1, 1),
    ("letter and its text in parens", format_reply(R, "(B) aspirin"), MCQ, 1.1, 1, 1),
    ("answer prefix", format_reply(R, "Answer: B"), MCQ, 1.1, 1, 1),
    ("sentence prefix", format_reply(R, "The final answer is B."), MCQ, 1.1, 1, 1),
    ("markdown bold", format_reply(R, "**B**"), MCQ, 1.1, 1, 1),
    ("option text", format_reply(R, "aspirin"), MCQ, 1.1, 1, 1),
    ("option text, case and punctuation", format_reply(R, "  ASPIRIN! "), MCQ, 1.1, 1, 1),
    ("wrong option text", format_reply(R, "Warfarin"), MCQ, 0.1, 0, 1),
    ("letter contradicts its text", format_reply(R, "B. Warfarin"), MCQ, 0.1, 0, 1),
    # our call: option text then its own letter in brackets counts; a disagreement does not
    ("text then its letter", format_reply(R, "Aspirin (B)"), MCQ, 1.1, 1, 1),
    ("text then another option's letter", format_reply(R, "Heparin (C)"), MCQ, 0.1, 0, 1),
    ("right text, wrong letter", format_reply(R, "Aspirin (C)"), MCQ, 0.1, 0, 1),
    ("text is not exactly an option", format_reply(R, "Aspirin 81 mg"), MCQ, 0.1, 0, 1),
    ("letter not among the options", format_reply(R, "E"), MCQ, 0.1, 0, 1),
    # Gaming: several options, hedges, answers in the wrong place, repeats.
    ("two letters with comma", format_reply(R, "A, B"), MCQ, 0.1, 0, 1),
    ("two letters with comma, right first", format_reply(R, "B, A"), MCQ, 0.1, 0, 1),
    ("two letters with and", format_reply(R, "B and C"), MCQ, 0.1, 0, 1),
    ("hedge with or", format_reply(R, "B or C"), MCQ, 0.1, 0, 1),
    ("slash", format_reply(R, "B/C"), MCQ, 0.1, 0, 1),
    ("two lines", format_reply(R, "B\nC"), MCQ, 0.1, 0, 1),
    ("all the letters", format_reply(R, "ABCD"), MCQ, 0.1, 0, 1),
    ("answer only inside think", f"<think>{R} <answer>B</answer></think>", MCQ, 0.0, 0, 0),
    # Only what follows the last </think> counts: a draft answer inside the reasoning is
    # reasoning (it costs the format reward, not accuracy).
    ("draft answer in think, one final answer", f"<think>{R} Maybe <answer>C</answer>? No.</think>"
     "<answer>B</answer>", MCQ, 1.0, 1, 0),
    ("tag named in think, one final answer", f"<think>I must write <answer> and </answer> tags.</think>"
     "\n<answer>B</answer>", MCQ, 1.0, 1, 0),
    ("draft right in think, final wrong", f"<think><answer>B</answer></think><answer>C</answer>", MCQ, 0.0, 0, 0),
    ("two final answers after think", f"<think>{R}</think><answer>B</answer><answer>C</answer>", MCQ, 0.0, 0, 0),
    ("hedge after think", f"<think><answer>B</answer></think><answer>B or C</answer>", MCQ, 0.0, 0, 0),
    ("repeated with another letter", OK + "\n<answer>C</answer>", MCQ, 0.0, 0, 0),
    # our call: the final tag repeated, even with the same letter, scores 0 (commit once)
    ("repeated with the same letter", OK + "\n<answer>B</answer>", MCQ, 0.0, 0, 0),
    ("repeat in other tag case", OK + "<ANSWER>C</ANSWER>", MCQ, 0.0, 0, 0),
    ("text after the answer", OK + "\nAnswer: C", MCQ, 0.0, 0, 0),
    ("answer before the think block", "<answer>B</answer><think>x</think>", MCQ, 0.0, 0, 0),
    # Malformed but answered: accuracy stands, the format reward does not.
    ("no think block", "<answer>B</answer>", MCQ, 1.0, 1, 0),
    ("think opened by the prompt", f"{R}</think>\n<answer>B</answer>", MCQ, 1.0, 1, 0),
    ("empty think", "<think> \n</think><answer>B</answer>", MCQ, 1.0, 1, 0),
    ("text between think and answer", f"<think>{R}</think>So: <answer>B</answer>", MCQ, 1.0, 1, 0),
    ("text before think", f"Sure! <think>{R}</think><answer>B</answer>", MCQ, 1.0, 1, 0),
    ("tags in another case", f"<THINK>{R}</THINK><Answer>B</Answer>", MCQ, 1.0, 1, 0),
    ("two think blocks", "<think>a</think><think>b</think><answer>B</answer>", MCQ, 1.0, 1, 0),
    # Malformed and unanswered.
    ("empty answer", format_reply(R, ""), MCQ, 0.0, 0, 0),
    ("blank answer", format_reply(R, "  "), MCQ, 0.0, 0, 0),
    ("unclosed answer", f"<think>{R}</think><answer>B", MCQ, 0.0, 0, 0),
    ("unclosed think", f"<think>{R} <answer>B</answer>", MCQ, 0.0, 0, 0),
    ("think reopened", "<think>a</think><think>b <answer>B</answer>", MCQ, 0.0, 0, 0),
    ("reversed answer tags", f"<think>{R}</think></answer>B<answer>", MCQ, 0.0, 0, 0),
    ("no tags", "B", MCQ, 0.0, 0, 0),
    ("empty", "", MCQ, 0.0, 0, 0),
    ("whitespace", " \n\t ", MCQ, 0.0, 0, 0),
    # Non-ASCII.
    ("chinese reasoning, fullwidth letter", "<think>患者服用阿司匹林。</think><answer>（Ｂ）</answer>",
     MCQ, 1.1, 1, 1),
    ("chinese prefix", format_reply("推理", "答案：B"), ZH, 1.1, 1, 1),
    ("chinese option text", format_reply("推理", "阿司匹林。"), ZH, 1.1, 1, 1),
    ("chinese wrong option text", format_reply("推理", "肝素"), ZH, 0.1, 0, 1),
    ("emoji answer", format_reply("🤔", "💊"), MCQ, 0.1, 0, 1),
    ("accented letter is no letter", format_reply(R, "É"), MCQ, 0.1, 0, 1),
    # 21 options (JMED).
    ("last of 21 letters", format_reply(R, "U"), JMED, 1.1, 1, 1),
    ("option text of 21", format_reply(R, "drug u20"), JMED, 1.1, 1, 1),
    ("beyond 21 letters", format_reply(R, "V"), JMED, 0.1, 0, 1),
    # Option texts that look like an answer prefix.
    ("option text starting 'Choice'", format_reply(R, "Choice of drug depends on renal function."),
     PREFIXLIKE, 1.1, 1, 1),
    ("option text starting 'Option...'", format_reply(R, "optional surgery"), PREFIXLIKE, 0.1, 0, 1),
    # PubMedQA-style yes/no/maybe and short free text.
    ("yes", format_reply(R, "yes"), PUBMED, 1.1, 1, 1),
    ("Yes.", format_reply(R, "Yes."), PUBMED, 1.1, 1, 1),
    ("Answer: YES", format_reply(R, "Answer: YES"), PUBMED, 1.1, 1, 1),
    ("no", format_reply(R, "no"), PUBMED, 0.1, 0, 1),
    ("maybe", format_reply(R, "maybe"), PUBMED, 0.1, 0, 1),
    ("yes or no", format_reply(R, "yes or no"), PUBMED, 0.1, 0, 1),
    ("yes/maybe", format_reply(R, "yes/maybe"), PUBMED, 0.1, 0, 1),
    ("yes with a reason", format_reply(R, "Yes, because the trial was positive"), PUBMED, 0.1, 0, 1),
    ("free text normalised", format_reply(R, " type 2 Diabetes   mellitus. "), FREE, 1.1, 1, 1),
    ("free text abbreviation", format_reply(R, "T2DM"), FREE, 0.1, 0, 1),
    ("free text superset", format_reply(R, "Type 2 diabetes mellitus or type 1"), FREE, 0.1, 0, 1),
    # Enormous completions: linear work, nothing truncated away.
    ("1 MB of reasoning", format_reply("x" * MB, "B"), MCQ, 1.1, 1, 1),
    ("1 MB answer", format_reply(R, "B " * (MB // 2)), MCQ, 0.1, 0, 1),
    ("1 MB of think tags", "<think>" * (MB // 7) + "<answer>B</answer>", MCQ, 0.0, 0, 0),
    ("1 MB of answer tags", "<answer>B</answer>" * (MB // 18), MCQ, 0.0, 0, 0),
    ("1 MB of brackets", format_reply(R, "(" * MB), MCQ, 0.1, 0, 1),
    ("1 MB of backtracking bait", format_reply(R, "B" + " " * MB + "x"), MCQ, 0.1, 0, 1),
]


DEFAULT = rewards.load_components(rl_stage1.get_config().rl.rewards)  # the paper's: correctness + 0.1 format


@pytest.mark.parametrize("name,completion,record,reward,accuracy,fmt", TABLE, ids=[t[0] for t in TABLE])
def test_reward_table(name, completion, record, reward, accuracy, fmt):
    """The default `rl.rewards` (RL's reward) and `score` (evaluation's terms) on each case."""
    got, _ = rewards.score_components(DEFAULT, [completion], [record])
    assert got == pytest.approx(dict(reward=[reward], correctness=[accuracy], format=[fmt])), name
    assert rewards.score(completion, record) == dict(accuracy=accuracy, format=fmt)
    assert rewards.is_correct(completion, record) == bool(accuracy)
    assert rewards.format_ok(completion) == bool(fmt)


def test_extract_answer_is_canonical():
    assert rewards.extract_answer(format_reply(R, "(b) Aspirin."), MCQ) == "B"
    assert rewards.extract_answer(format_reply(R, "warfarin"), MCQ) == "C"
    assert rewards.extract_answer(format_reply(R, "A or C"), MCQ) is None
    assert rewards.extract_answer(format_reply(R, "  Maybe! "), PUBMED) == "maybe"
    assert rewards.extract_answer(format_reply(R, "Type-2  Diabetes"), FREE) == "type2 diabetes"
    assert rewards.extract_answer("", FREE) is None


def test_duplicate_option_texts_are_ambiguous():
    record = QARecord(id="dup", source="t", question="q", answer="A", options={"A": "Aspirin", "B": "aspirin"})
    assert rewards.extract_answer(format_reply(R, "Aspirin"), record) is None
    assert rewards.is_correct(format_reply(R, "A"), record)


def letter_share(completions, records, letter="B"):
    return [c.count(letter) / max(len(c), 1) for c in completions]


def one_value(completions, records):
    return [1.0]


def test_components_weights_kwargs_and_order():
    spec = ml_collections.ConfigDict(dict(
        correctness=dict(fn="fleming_jax.rewards:correctness", weight=2.0),
        format=dict(fn="fleming_jax.rewards:format_adherence", weight=0.5),
        letters=dict(fn="tests.test_rewards:letter_share", weight=-1.0, letter="C")))
    components = rewards.load_components(spec)
    got, reported = rewards.score_components(components, [OK, format_reply(R, "C"), "CC"], [MCQ] * 3)
    assert reported == {}
    c_share = format_reply(R, "C").count("C") / len(format_reply(R, "C"))
    assert got["correctness"] == [1.0, 0.0, 0.0] and got["format"] == [1.0, 1.0, 0.0] and got["letters"][2] == 1.0
    assert got["reward"] == pytest.approx([2.5 - got["letters"][0], 0.5 - c_share, -1.0])


@pytest.mark.parametrize("entry,message", [
    (dict(fn="fleming_jax.rewards.correctness"), "as 'module:function'"),
    (dict(fn="no_such_module:f"), "cannot import 'no_such_module'"),
    (dict(fn="fleming_jax.rewards:nothing"), "has no function 'nothing'"),
    (dict(fn="tests.test_rewards:letter_share", colour="red"), "does not fit its signature"),
    (dict(fn="fleming_jax.rewards:correctness", weight="high"), "a number"),
])
def test_bad_components_fail_in_one_line(entry, message):
    with pytest.raises(ValueError, match=message) as got:
        rewards.load_components(dict(correctness=dict(fn="fleming_jax.rewards:correctness"), mine=entry))
    assert "rl.rewards." in str(got.value) and "\n" not in str(got.value)


def test_a_pass_component_and_one_value_each():
    with pytest.raises(ValueError, match="rl.solved_by='correctness' is not one of rl.rewards's components"):
        rewards.load_components(dict(mine=dict(fn="fleming_jax.rewards:format_adherence")))
    assert len(rewards.load_components(dict(mine=dict(fn="fleming_jax.rewards:format_adherence")), "mine")) == 1
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        rewards.score_components(rewards.load_components(dict(correctness=dict(fn="tests.test_rewards:one_value"))),
                                 [OK, OK], [MCQ] * 2)


def test_record_whose_answer_is_not_an_option_letter_is_refused():
    bad = QARecord(id="bad", source="t", question="q", answer="Aspirin", options=MCQ.options)
    with pytest.raises(ValueError, match="record 'bad': answer 'Aspirin' is not one of its option letters"):
        rewards.score(OK, bad)
