"""Text in, text out: evaluation and the local teacher template with `fleming_jax.prompts` and
generate with the engine; greedy replies equal transformers' and sampled ones the engine's."""

import jax
import numpy as np
import pytest
import torch

from fleming_jax import engine, evaluate, prompts
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import QARecord
from fleming_jax.distill.teachers import LocalTeacher
from fleming_jax.models import hf
from fleming_jax.sampler import SamplingParams

RECORDS = [QARecord(f"q{i}", "t", question, answer, options) for i, (question, answer, options) in enumerate([
    ("patient 3 has fever and rash; which drug?", "B", {"A": "aspirin", "B": "heparin", "C": "insulin"}),
    ("rash?", "yes", None),
    ("patient 7 has fever; which test?", "A", {"A": "culture", "B": "x-ray"}),
])]
CHATS = [[{"role": "user", "content": "patient 3 has fever"}], [{"role": "user", "content": "rash?"}],
         [{"role": "user", "content": "answer 2"}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, tokenizer, our model, transformers' model) of one tiny random Qwen2."""
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("prompts")
    texts = [f"patient {i} has fever and rash; answer {i % 4}" for i in range(300)]
    tok = toklib.build(texts + [prompts.user_prompt(r) for r in RECORDS] * 20, str(path), vocab_size=320)
    reference = make_hf_model("qwen2", False, vocab_size=320)
    reference.save_pretrained(path)
    return str(path), tok, hf.load(str(path))[0], reference


def transformers_greedy(reference, tok, ids, new_tokens):
    """transformers' greedy reply to one prompt, decoded without its stop token."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=toklib.stop_ids(tok))[0, len(ids):]
    out = out.tolist()
    stops = [i for i, t in enumerate(out) if t in toklib.stop_ids(tok)]
    return tok.decode(out[:stops[0]] if stops else out)


def test_evaluation_greedy_equals_transformers_and_its_samples_are_the_engines(tiny):
    _, tok, model, reference = tiny
    ids = prompts.record_prompts(tok, RECORDS)
    assert ids[1] == prompts.chat_prompts(tok, [[{"role": "user", "content": prompts.user_prompt(RECORDS[1])}]])[0]
    greedy = evaluate.evaluate_records(engine.LocalEngine.of(model), tok, RECORDS, SamplingParams(temperature=0, max_new_tokens=12),
                                       batch_size=2)["outputs"]
    assert [row["completions"] for row in greedy] == [[transformers_greedy(reference, tok, p, 12)] for p in ids]

    params = SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=12)
    sampled = evaluate.evaluate_records(engine.LocalEngine.of(model), tok, RECORDS, params, key=jax.random.key(4), batch_size=4)["outputs"]
    # one batch, so key fold_in(key, 0); two slots instead of eval's: scheduling never changes samples
    out = engine.generate(model, ids, jax.random.fold_in(jax.random.key(4), 0), params,
                          stop_ids=toklib.stop_ids(tok), slots=2, chunk=3, pad_id=tok.pad_token_id)
    assert [row["completions"] for row in sampled] == prompts.completion_texts(tok, out)
    assert [row["lengths"] for row in sampled] == out.lengths.tolist()
    assert len({t for row in sampled for t in row["completions"]}) > 1


@pytest.mark.slow
def test_local_teacher_greedy_equals_transformers_and_its_samples_are_the_engines(tiny):
    path, tok, model, reference = tiny
    teacher = LocalTeacher.from_hf(path, batch_size=2, seed=3)
    ours = teacher.complete_many(CHATS[:2], n=2, temperature=0.0, max_tokens=12)
    for chat, replies in zip(CHATS, ours):
        expected = transformers_greedy(reference, tok, prompts.chat_prompts(tok, [chat])[0], 12)
        assert replies == [expected, expected]

    teacher = LocalTeacher(model, tok, seed=3, batch_size=2)
    sampled = teacher.complete_many(CHATS, n=3, temperature=1.0, max_tokens=12)  # batches [0:2], [2:3]
    params = SamplingParams(temperature=1.0, num_samples=3, max_new_tokens=12)
    expected = []
    for call, chats in enumerate([CHATS[:2], CHATS[2:]]):  # the teacher's key per engine call; other slots
        out = engine.generate(model, prompts.chat_prompts(tok, chats), jax.random.fold_in(jax.random.key(3), call),
                              params, stop_ids=toklib.stop_ids(tok), slots=3, chunk=2, pad_id=tok.pad_token_id)
        expected += prompts.completion_texts(tok, out)
    assert sampled == expected and [len(r) for r in sampled] == [3, 3, 3]
    assert sampled != teacher.complete_many(CHATS, n=3, max_tokens=12)  # each call draws afresh
    assert len(set(np.ravel(sampled))) > 1
