"""Tokenizers: any HF tokenizer from a local directory, and the small offline one.

Real runs use the base model's own tokenizer (`load(hf_path)`). The tiny default has no
download to lean on, so `build` trains a byte-level BPE on the run's own text with
Qwen-style special tokens and chat template, saved in HF format so `transformers`
(and every later stage) loads it like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable

import numpy as np

from fleming_jax import paths
from fleming_jax.data.records import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
REPLY_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Qwen's layout (`<|im_start|>role\n…<|im_end|>\n`). The `{% generation %}` block marks
# what the assistant writes (its text and the closing <|im_end|>, so it learns to stop);
# `return_assistant_tokens_mask=True` reads it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
FINGERPRINT = "fleming_fingerprint.json"  # what a built tokenizer was built from


def build(texts: Iterable[str], out_dir: str, vocab_size: int = 4096):
    """Trains a byte-level BPE of at most `vocab_size` entries (special tokens and reply
    tags included) on `texts`, saves it to `out_dir` in HF format and returns it loaded."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = [ENDOFTEXT, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    # Qwen's own normalizer and pre-tokenizer (digits one at a time): saved beside a qwen2
    # config.json, `AutoTokenizer` loads this as a Qwen2Tokenizer, which imposes them; the
    # merges must be learned under the same splits or exported models would re-tokenize.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(REPLY_TAGS), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if not json.loads(tok.to_str())["model"]["merges"]:
        raise ValueError(f"no text to build a tokenizer from (it would have no merges); nothing written "
                         f"to {out_dir}")
    # The tags stay in decoded text (not "special"), but are always one token each.
    tok.add_tokens([AddedToken(t, normalized=False) for t in REPLY_TAGS])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20)
    if not paths.is_remote(out_dir):
        fast.save_pretrained(out_dir)
        return load(out_dir)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # every host loads its own copy; process 0 uploads
        save(fast, tmp)
        save(fast, out_dir)
        return load(tmp)


def save(tokenizer, out_dir: str) -> None:
    """`tokenizer.save_pretrained` into a local or remote directory (remote: process 0 writes,
    staged in a temporary local directory since transformers writes local files only)."""
    from fleming_jax import parallel

    if not paths.is_remote(out_dir):
        tokenizer.save_pretrained(out_dir)
    elif parallel.is_main_process():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            paths.upload_dir(tmp, out_dir)


def build_once(texts: list[str], out_dir: str, vocab_size: int):
    """`build`'s tokenizer for `texts`, reused from `out_dir` only when its fingerprint says it
    was built from the same texts and vocab size; rebuilt otherwise (a directory left by a run
    on other data, a killed build, an empty file). The fingerprint is written last."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    fingerprint = {"texts_sha256": digest.hexdigest(), "texts": len(texts), "vocab_size": vocab_size}
    file = paths.join(out_dir, FINGERPRINT)
    if paths.exists(file) and json.loads(paths.read_text(file)) == fingerprint:
        return load(out_dir)
    if paths.exists(paths.join(out_dir, "tokenizer.json")):
        print(f"[tokenizer] {out_dir} was not built from these {len(texts)} texts at vocab_size={vocab_size}; "
              "rebuilding it", flush=True)
    tokenizer = build(texts, out_dir, vocab_size)
    paths.write_text(file, json.dumps(fingerprint))
    return tokenizer


def load(path: str):
    """The HF tokenizer in directory `path`: local, gs:// (copied to the local cache first) or a
    hub id (`org/name`, resolved by `paths.local_dir`). A BPE without merges (what training on
    no text leaves) is refused."""
    import transformers

    local = paths.local_dir(path, kind="tokenizer")
    file = os.path.join(local, "tokenizer.json")
    if not os.path.isfile(file) and not os.path.isfile(os.path.join(local, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); "
                                "pass an HF model directory or one written by fleming_jax.tokenizer.build")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            model = json.load(f).get("model") or {}
        if model.get("type") == "BPE" and not model.get("merges"):
            raise ValueError(f"{paths.join(path, 'tokenizer.json')}: a BPE tokenizer with no merges (built from no "
                             f"text?); delete {path} and rerun the sft task that builds it, or point config.tokenizer "
                             "at a working one")
    return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)


# Tokens that end a turn or a text besides EOS: Qwen's, Llama 3's (end of turn, of a tool
# call's message, of the text: its generation_config's eos ids) and Gemma's end of turn
STOP_TOKENS = (IM_END, ENDOFTEXT, "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>")


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: EOS and the `STOP_TOKENS` the vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[t] for t in STOP_TOKENS if t in vocab]
    return sorted({i for i in ids if i is not None})


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, assistant mask) of a chat through the tokenizer's chat template.

    The mask is 1 on tokens the assistant writes. Templates with a `{% generation %}` block
    give it directly; others (e.g. Qwen's own) get it by rendering the chat up to each
    assistant turn and taking the tokens that turn adds.
    """
    if _GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["assistant_masks"], np.int32)
    ids = _ids(tokenizer, messages, False)
    mask = np.zeros(len(ids), np.int32)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_ids(tokenizer, messages[:i], True))
            end = len(_ids(tokenizer, messages[:i + 1], False))
            if _ids(tokenizer, messages[:i + 1], False) != ids[:end]:
                raise ValueError("the chat template does not render a chat's prefix as a prefix of "
                                 "the chat; add a {% generation %} block to it to mark assistant text")
            mask[start:end] = 1
    return np.asarray(ids, np.int32), mask


def _ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])
