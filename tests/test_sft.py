"""SFT: assistant-only loss, packing, exact resume (SIGTERM mid-run), learning on
KG-teacher trajectories with a small model, and 2 processes evaluating as one."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import sft as sft_config
from fleming_jax import preemption
from fleming_jax import tokenizer as toklib
from fleming_jax.data import pipeline
from fleming_jax.data.records import write_jsonl
from fleming_jax.distill import collect, teachers
from fleming_jax.models import create_sharded, config_from
from fleming_jax.train import checkpoint, sft
from fleming_jax.train.logprobs import token_logprobs
from tests.test_parallel import ROOT, free_port


@pytest.fixture(scope="module")
def data(kg_records, tmp_path_factory):
    """KG-teacher SFT chats (train / eval files) and a 1024-entry tokenizer built on them."""
    root = tmp_path_factory.mktemp("sft_data")
    outcomes = collect.collect_chunk(kg_records, teachers.KGTeacher(kg_records), collect.CollectConfig(k=1))
    chats = [s for o in outcomes for s in o["sft"]]
    write_jsonl(root / "train.jsonl", chats[:-48])
    write_jsonl(root / "eval.jsonl", chats[-48:])
    tok = toklib.build((m["content"] for c in chats for m in c["messages"]), str(root / "tok"), 1024)
    return root, tok, chats


def small_config(root, **train):
    config = sft_config.get_config("tiny")
    config.model.update(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, vocab_size=1024)
    config.train.update(dict(seq_len=256, batch_size=8, log_every=1, eval_every=1000) | train)
    config.data.update(train=str(root / "train.jsonl"), eval=str(root / "eval.jsonl"))
    config.tokenizer = str(root / "tok")
    config.checkpoint.update(every=2, keep=2)
    return config


def test_tokenizer_round_trips_offline_and_masks_only_assistant_tokens(data):
    root, tok, _ = data
    again = toklib.load(str(root / "tok"))
    assert len(again) <= 1024 and again.chat_template == toklib.CHAT_TEMPLATE
    stops = toklib.stop_ids(again)
    assert set(stops) == {again.convert_tokens_to_ids(toklib.IM_END), again.convert_tokens_to_ids(toklib.ENDOFTEXT)}
    for tag in toklib.REPLY_TAGS:
        assert len(again.encode(tag)) == 1
    chat = [{"role": "user", "content": "Which gene?"}, {"role": "assistant", "content": "<think>\nx\n</think>\n<answer>B</answer>"}]
    ids, mask = toklib.encode_chat(again, chat)
    assert again.decode(ids[mask == 1]) == chat[1]["content"] + toklib.IM_END
    prompt = again.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids[:len(prompt)]) == list(prompt) and not mask[:len(prompt)].any()
    assert mask[len(prompt):-1].all() and mask[-1] == 0  # the "\n" after <|im_end|> is not trained
    # A template without a generation block (like Qwen's own) gives the same mask by prefixes.
    plain = toklib.CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    again.chat_template = plain
    ids2, mask2 = toklib.encode_chat(again, chat)
    assert list(ids2) == list(ids) and list(mask2[:-1]) == list(mask[:-1])

    (example,), _ = pipeline.tokenize([{"messages": chat}], tok, 64)
    (row,) = pipeline.eval_batches([example], 64, 1)
    weights = row["loss_weights"][0]
    n = len(example["tokens"])
    assert not weights[:len(prompt)].any() and weights[len(prompt):n - 1].all() and not weights[n - 1:].any()


def _model():
    config = sft_config.get_config("tiny").model
    config.update(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=1024)
    return create_sharded(config_from(config), seed=1)


def test_loss_is_zero_weighted_on_prompt_tokens():
    model = _model()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1024, (1, 12)).astype(np.int32)
    weights = np.zeros((1, 12), np.float32)
    weights[0, 7:] = 1  # the "assistant" tail
    batch = {"tokens": tokens, "segments": np.ones_like(tokens), "loss_weights": weights}
    num, den, _ = sft.sft_loss(model, batch)
    logprobs = np.asarray(token_logprobs(model, tokens, batch["segments"]))
    np.testing.assert_allclose(num, -logprobs[0, 7:].sum(), rtol=1e-6)
    assert den == 5
    # Changing a prompt token changes nothing it does not condition: the gradient wrt the
    # prompt's own predictions is zero, so its loss is untouched if only targets 1..6 move.
    grads = jax.grad(lambda lp: -(lp * weights).sum())(logprobs)
    assert not np.asarray(grads)[0, :7].any()


def test_packed_and_unpacked_rows_give_the_same_per_example_loss():
    model = _model()
    rng = np.random.default_rng(1)
    examples = [{"tokens": rng.integers(0, 1024, n).astype(np.int32),
                 "loss_weights": (np.arange(n) >= n // 2).astype(np.int32)} for n in (9, 14, 6)]
    (packed,) = pipeline.eval_batches(examples, 32, 1)
    assert packed["segments"].max() == 3
    lp_packed = np.asarray(token_logprobs(model, packed["tokens"], packed["segments"]))[0] * packed["loss_weights"][0]
    per_packed = [lp_packed[packed["segments"][0] == k].sum() for k in (1, 2, 3)]
    per_single = []
    for e in examples:
        (row,) = pipeline.eval_batches([e], 32, 1)
        lp = np.asarray(token_logprobs(model, row["tokens"], row["segments"]))[0] * row["loss_weights"][0]
        per_single.append(lp.sum())
    np.testing.assert_allclose(per_packed, per_single, rtol=1e-5)


def _params(trainer):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.state.params))


def lora_on_a_saved_base(config, root) -> str:
    """`config` set to train rank-8 adapters on a random base saved as a checkpoint; its path."""
    base = checkpoint.save_params(str(root / "base"), create_sharded(config_from(config.model), 0))
    config.model.update(init_from=base, lora_rank=8, lora_alpha=16.0)
    return base


@pytest.mark.parametrize("quant", ["", pytest.param("nf4", marks=pytest.mark.slow)])
def test_lora_sft_lowers_the_held_out_loss_and_checkpoints_only_the_adapters(data, tmp_path, quant):
    from fleming_jax import models as fm
    from fleming_jax.models import decoder

    root = data[0]
    config = small_config(root)
    base = lora_on_a_saved_base(config, tmp_path)
    config.model.lora_base_quant = quant  # QLoRA: the merged model and export decode the NF4 base
    config.optimizer.update(total_steps=12, warmup_steps=1, learning_rate=3e-2)
    trainer = sft.Trainer(config, str(tmp_path / "run"))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after < before - 0.1, (before, after)  # a random base: the adapters alone move it slowly
    # the checkpoint: adapters and their optimizer state only, and where the base is
    run = str(tmp_path / "run" / "checkpoints")
    saved = checkpoint.lora_meta(run)
    assert saved == dict(rank=8, alpha=16.0, targets=list(decoder.LORA_TARGETS), base_quant=quant,
                         base=dict(init_from=base, hf_path="", seed=0))
    params = ocp.StandardCheckpointer().metadata(checkpoint.params_dir(run)).item_metadata.tree
    assert set(params) == {"layers"} and all("_lora_" in k for k in params["layers"])
    # the next stage's init_from: the same adapters on the same base, or merged with lora_rank=0
    again = config.model.copy_and_resolve_references()
    again.init_from = run
    model, _ = fm.build(again)
    jax.tree.map(np.testing.assert_array_equal, _params(trainer), jax.tree.map(np.asarray, nnx.to_pure_dict(
        nnx.state(model, nnx.LoRAParam))))
    again.lora_rank = 0
    merged, merged_config = fm.build(again)
    assert merged_config.lora_rank == 0
    expected = decoder.merge_lora(trainer.state.model(trainer.graphdef))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(merged)), nnx.to_pure_dict(nnx.state(expected)))
    # export: the merged model for transformers, the adapter for peft on the base
    from configs import export as export_config
    from fleming_jax.models import hf

    config = export_config.get_config("tiny")
    config.model = again
    config.model.update(lora_rank=0, lora_base_quant="")  # as the export config comes: the checkpoint's meta says it is LoRA
    hf.export_task(config, str(tmp_path / "export"))
    exported, _ = hf.load(str(tmp_path / "export" / "hf"))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(exported)), nnx.to_pure_dict(nnx.state(expected)))
    adapter = hf.read_adapter_config(str(tmp_path / "export" / "adapter"))
    assert adapter["rank"] == 8 and adapter["base"]["hf_path"] == base


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_sigterm_equals_the_uninterrupted_run(data, tmp_path, lora):
    root = data[0]
    config = small_config(root)
    if lora:
        lora_on_a_saved_base(config, tmp_path)
    config.optimizer.update(total_steps=6, warmup_steps=2)
    full = sft.Trainer(config, str(tmp_path / "full"))
    full_rows = full.train()

    def interrupt(step):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)
    first = sft.Trainer(config, str(tmp_path / "cut"))
    with pytest.raises(preemption.Preempted):  # main.py exits 0 on it
        first.train(on_step=interrupt)
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["2", "3"]
    resumed = sft.Trainer(config, str(tmp_path / "cut"))
    rows = resumed.train()
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows[3:]]
    jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(full))  # bit for bit
    if lora:
        return
    # the params item is what the next stage's --config.model.init_from reads
    model = checkpoint.restore_model(str(tmp_path / "cut" / "checkpoints"), config_from(config.model))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                 _params(full))


@pytest.mark.slow
def test_resume_walks_back_over_a_step_without_metadata(data, tmp_path, capsys):
    from tests.test_rl_stages import corrupt

    config = small_config(data[0])
    config.optimizer.update(total_steps=3, warmup_steps=1)
    config.checkpoint.update(every=1, keep=5)
    full = sft.Trainer(config, str(tmp_path / "full"))
    full.train()

    def interrupt(step):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted):
        sft.Trainer(config, str(tmp_path / "cut")).train(on_step=interrupt)
    corrupt(tmp_path / "cut" / "checkpoints" / "2", "no_metadata")
    capsys.readouterr()
    resumed = sft.Trainer(config, str(tmp_path / "cut"))
    assert [r["step"] for r in resumed.train()] == [2, 3]  # from step 1, the newest that restores
    out = capsys.readouterr().out
    assert "checkpoint step 2" in out and "does not restore" in out, out
    jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(full))
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


@pytest.mark.slow
def test_held_out_loss_falls_on_kg_teacher_trajectories(data, tmp_path):
    config = small_config(data[0], eval_every=40)
    config.optimizer.update(total_steps=80, warmup_steps=5, learning_rate=1e-2)
    trainer = sft.Trainer(config, str(tmp_path))
    start = trainer.evaluate()
    rows = trainer.train()
    end = rows[-1]["eval_loss"]
    print(f"held-out loss {start:.3f} -> {end:.3f}")
    assert end < 0.7 * start, (start, end)  # measured on 2 CPU cores: 6.95 -> 4.42
    assert os.path.exists(tmp_path / "metrics.jsonl")


# ---------------------------------------------------------------- several hosts

def uneven_data(root) -> str:
    """Chats whose eval split packs unevenly by host: even-numbered examples are long (one
    per 128-token row), odd ones short (three to a row), so a per-host slice of it (host 0:
    the long ones) would pack into more batches on one host than on the other."""
    rng = np.random.default_rng(0)
    words = [w * n for w in ("fever", "rash", "edema", "sepsis", "anemia", "ataxia", "coma", "gout") for n in (1, 2)]

    def chat(i, n_words):
        return {"id": f"c{i}", "meta": {}, "messages": [
            {"role": "user", "content": f"Case {i}: what is the finding?"},
            {"role": "assistant", "content": " ".join(rng.choice(words, n_words))}]}
    train = [chat(i, 40) for i in range(16)]
    held_out = [chat(100 + i, 70 if i % 2 == 0 else 6) for i in range(24)]
    write_jsonl(os.path.join(root, "train.jsonl"), train)
    write_jsonl(os.path.join(root, "eval.jsonl"), held_out)
    toklib.build((m["content"] for c in train + held_out for m in c["messages"]), os.path.join(root, "tok"), 1024)
    return root


def multihost_config(root):
    config = small_config(pathlib.Path(root), seq_len=128, batch_size=8, eval_every=1)
    config.optimizer.update(total_steps=2, warmup_steps=1)
    config.checkpoint.update(every=1)
    return config


def multihost_run(root, workdir, sigterm: str = "") -> dict:
    """What each process of the multi-host SFT test runs (and the 1-process reference): the
    held-out loss at init, then 2 steps with an eval after each. sigterm="here" / "other":
    SIGTERM arrives at this host / at another one during step 1's first eval batch (and the
    init eval is skipped)."""
    trainer = sft.Trainer(multihost_config(root), workdir)
    out = dict(eval_batches=len(trainer.eval_data), eval_calls=0)
    if not sigterm:
        out["initial"] = trainer.evaluate()
    evaluate = trainer.eval_fn

    def eval_fn(params, batch):
        out["eval_calls"] += 1
        if sigterm == "here" and out["eval_calls"] == 1:
            signal.raise_signal(signal.SIGTERM)
        return evaluate(params, batch)
    trainer.eval_fn = eval_fn
    try:
        out["rows"] = trainer.train()
    except preemption.Preempted as e:
        out["preempted"] = str(e)
    return out


def launch_sft(root, workdir, mode="run"):
    """2 processes x 2 CPU devices (`tests/multihost_sft_worker.py`) running `multihost_run`."""
    port, env = free_port(), dict(os.environ, PYTHONPATH=ROOT)
    return [subprocess.Popen([sys.executable, "-m", "tests.multihost_sft_worker", str(port), str(i), "2", str(root),
                              str(workdir), str(workdir) + f".{i}.json", mode],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def finish_sft(procs, workdir, timeout=300) -> list[dict]:
    """Each worker's `multihost_run` result; a worker still running after `timeout` s is
    killed (hosts that run different numbers of collectives wait for each other forever)."""
    results = []
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out = p.communicate()[0] + f"\n(still running after {timeout} s: hung in a collective? killed)"
        if p.returncode != 0:
            for q in procs:
                q.kill()
            pytest.fail(f"process {i}: {out[-3000:]}")
        with open(str(workdir) + f".{i}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.slow
def test_two_processes_run_the_same_eval_batches_with_the_one_process_loss(tmp_path):
    """Eval on 2 processes x 2 devices: both hosts run the same number of eval batches, and
    the held-out loss is a 1-process (8 device) run's on the same weights: at init, and on
    the 2-process run's trained weights (its last checkpoint)."""
    root = uneven_data(str(tmp_path))
    tok = toklib.load(os.path.join(root, "tok"))
    examples, _ = pipeline.tokenize(sft.read_chats(os.path.join(root, "eval.jsonl"), "eval"), tok, 128)
    lengths = [len(e["tokens"]) for e in examples]
    assert min(lengths[0::2]) > 64 and max(lengths[1::2]) <= 42, lengths  # uneven by host, as meant
    procs = launch_sft(root, tmp_path / "mh")
    try:
        single = multihost_run(root, str(tmp_path / "single"))
    except BaseException:
        for p in procs:
            p.kill()
        raise
    results = finish_sft(procs, tmp_path / "mh")
    assert single["eval_batches"] >= 2
    for got in results:
        assert got["eval_batches"] == single["eval_batches"]
        assert got["eval_calls"] == single["eval_calls"] == 2 * single["eval_batches"]  # after steps 1, 2
        # same examples, same weights, same packing: only the devices' reduction order differs
        np.testing.assert_allclose(got["initial"], single["initial"], rtol=1e-6)
        # trained on other meshes, the weights differ by reduction-order noise (see test_parallel)
        np.testing.assert_allclose([r["eval_loss"] for r in got["rows"]],
                                   [r["eval_loss"] for r in single["rows"]], rtol=1e-4)
    trained = sft.Trainer(multihost_config(root), str(tmp_path / "check"))
    model = checkpoint.restore_model(str(tmp_path / "mh" / "checkpoints"), config_from(trained.config.model),
                                     trained.mesh)
    nnx.replace_by_pure_dict(trained.state.params, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(results[0]["rows"][-1]["eval_loss"], trained.evaluate(), rtol=1e-6)


@pytest.mark.slow
def test_two_processes_stop_together_on_one_sigterm_during_eval(tmp_path):
    """SIGTERM to process 1 alone during step 1's first eval batch: both hosts skip the rest
    of that eval at the same batch, save step 1 and stop at step 2's check."""
    root = uneven_data(str(tmp_path))
    results = finish_sft(launch_sft(root, tmp_path / "mh", "sigterm"), tmp_path / "mh")
    for got in results:
        assert got["eval_calls"] == 1 and got["preempted"] == "SIGTERM during step 2", got
    assert os.listdir(tmp_path / "mh" / "checkpoints") == ["1"]
