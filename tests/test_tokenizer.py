"""The offline tokenizer survives export: beside a qwen2 config.json, transformers loads it
as a Qwen2Tokenizer (which imposes Qwen's pre-tokenizer); the ids must not change."""

import json

import transformers

from fleming_jax import tokenizer as toklib


def test_exported_tokenizer_tokenizes_like_the_built_one(tmp_path):
    texts = [f"patient {i} has fever and rash; answer {i % 4} <think>x</think><answer>B</answer>"
             for i in range(300)]
    built = toklib.build(texts, str(tmp_path), vocab_size=320)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "qwen2"}, f)  # what hf.save writes beside it
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    text = "A 31-year-old with fever 39.5 C <think>so</think><answer>B</answer> déjà vu"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.convert_ids_to_tokens(loaded(text)["input_ids"]).count("<think>") == 1
    chat = [{"role": "user", "content": text}, {"role": "assistant", "content": "<think>a</think><answer>C</answer>"}]
    ids, mask = toklib.encode_chat(loaded, chat)
    ref_ids, ref_mask = toklib.encode_chat(built, chat)
    assert ids.tolist() == ref_ids.tolist() and mask.tolist() == ref_mask.tolist() and mask.sum() > 0
    assert toklib.stop_ids(loaded) == toklib.stop_ids(built) == sorted(
        built.convert_tokens_to_ids([toklib.ENDOFTEXT, toklib.IM_END]))
