"""Packed RL update batches: the packing by hand, its balance, and the same loss and gradient
as one sequence per row on a real tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fleming_jax import models, sampler
from fleming_jax.train import grpo, packing
from fleming_jax.train import state as statelib
from fleming_jax.train.logprobs import token_logprobs
from tests.test_grpo import cfg
from tests.test_parallel import small_model_cfg


def hand_sequences():
    return packing.Sequences(
        prompts=[np.array([1, 2, 3]), np.array([4, 5]), np.array([6])],
        completions=np.array([[10, 11, 0, 0], [12, 13, 14, 0], [15, 0, 0, 0]], np.int32),
        lengths=np.array([2, 3, 1]), advantages=np.array([0.5, -1.0, 2.0], np.float32),
        per_token=dict(old_logprobs=-np.array([[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0]], np.float32)))


def test_build_and_unpack_by_hand():
    seqs = hand_sequences()
    batch = packing.build(seqs, [[0, 2], [1], []], length=12)
    scored = min(sampler.bucket(3), 12)  # the most completion tokens in a row (3), at most the row length
    assert batch["tokens"].shape == batch["segments"].shape == (3, 12)
    assert all(batch[k].shape == (3, scored) for k in ("targets", "completion_mask", "token_share", "advantages",
                                                       "old_logprobs"))
    np.testing.assert_array_equal(batch["tokens"][0, :8], [1, 2, 3, 10, 11, 6, 15, 0])
    # a segment per prompt and per reply; a reply also sees its prompt's segment (`prefixes`)
    np.testing.assert_array_equal(batch["segments"][0, :8], [1, 1, 1, 2, 2, 3, 4, 0])
    np.testing.assert_array_equal(batch["prefixes"][0, :8], [0, 0, 0, 1, 1, 0, 3, 0])
    np.testing.assert_array_equal(batch["positions"][0, :8], [0, 1, 2, 3, 4, 0, 1, 0])
    np.testing.assert_array_equal(batch["targets"][0, :3], [3, 4, 6])  # where the completions' tokens sit
    np.testing.assert_array_equal(batch["sources"][0, :3], [2, 3, 5])  # the positions that predict them
    np.testing.assert_array_equal(batch["completion_mask"][0, :4], [1, 1, 1, 0])
    np.testing.assert_allclose(batch["token_share"][0, :4], [0.5, 0.5, 1, 0])  # 1 / the sequence's length
    np.testing.assert_array_equal(batch["advantages"][0, :4], [0.5, 0.5, 2.0, 0])
    np.testing.assert_array_equal(batch["old_logprobs"][0, :4], [-1, -2, -6, 0])
    np.testing.assert_array_equal(batch["tokens"][1, :6], [4, 5, 12, 13, 14, 0])
    np.testing.assert_array_equal(batch["targets"][1, :3], [2, 3, 4])
    np.testing.assert_allclose(batch["token_share"][1].sum(), 1.0)
    assert batch["segments"][2].sum() == batch["completion_mask"][2].sum() == 0  # an empty row
    np.testing.assert_array_equal(packing.unpack(seqs, [[0, 2], [1], []], batch["old_logprobs"]),
                                  seqs.per_token["old_logprobs"])
    # shared prompts: the two replies of group 0 follow one copy of its prompt
    shared = dataclasses.replace(seqs, prompts=[seqs.prompts[0], seqs.prompts[0], seqs.prompts[2]],
                                 groups=np.array([0, 0, 1]), share_prompts=True)
    rows, _ = packing.lay_out(shared, 16, 1)
    assert rows == [[0, 1, 2]]
    b = packing.build(shared, rows, 16)
    np.testing.assert_array_equal(b["tokens"][0, :11], [1, 2, 3, 10, 11, 12, 13, 14, 6, 15, 0])
    np.testing.assert_array_equal(b["segments"][0, :11], [1, 1, 1, 2, 2, 3, 3, 3, 4, 5, 0])
    np.testing.assert_array_equal(b["prefixes"][0, :11], [0, 0, 0, 1, 1, 1, 1, 1, 0, 4, 0])
    np.testing.assert_array_equal(b["positions"][0, :11], [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 0])
    np.testing.assert_array_equal(b["targets"][0, :6], [3, 4, 5, 6, 7, 9])
    np.testing.assert_array_equal(b["sources"][0, :6], [2, 3, 2, 5, 6, 8])  # reply 2 starts from the prompt
    # a reply costs its prompt too only in a row without its group's prompt
    assert packing.assign([5, 6, 2], 16, 1, prompts=[3, 3, 1], groups=[0, 0, 1]) == [[1, 0, 2]]  # 10 tokens
    assert packing.assign([5, 6, 2], 7, 1, prompts=[3, 3, 1], groups=[0, 0, 1]) == [[1], [0, 2]]  # 6 | 5 + 2
    # one sequence per row: rows as wide as the longest prompt's bucket + the longest reply's
    assert packing.row_length(3, 3, 0) == sampler.bucket(3) + sampler.bucket(3)
    assert packing.row_length(3, 3, -1) == sampler.bucket(6) and packing.row_length(3, 3, 64) == 64
    assert packing.row_length(20, 40, 0) == 32 + 64 and packing.row_length(20, 40, -1) == 64
    assert packing.row_length(20, 60, 0) == packing.row_length(20, 60, -1) == 32 + 64  # 80 tokens: 32 + 64 < 128
    assert packing.row_length(20, 60, -1, sequence=50) == 64  # packed rows hold the longest sequence


def long_tailed(n, seed=0, budget=512):
    rng = np.random.default_rng(seed)
    prompts = np.repeat(rng.integers(32, 65, n // 8), 8)
    return prompts, np.minimum(rng.geometric(4 / budget, n), budget)


@pytest.mark.parametrize("accum,devices", [(1, 1), (2, 4)])
def test_packing_is_complete_unsplit_and_balanced_over_shards_and_microbatches(accum, devices):
    prompts, replies = long_tailed(256)
    sizes = prompts + replies
    length = sampler.bucket(int(sizes.max()))
    rows = packing.assign(sizes, length, accum * devices)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))  # each sequence once, whole
    loads = np.array([sizes[row].sum() for row in rows])
    assert loads.max() <= length and len(rows) % (accum * devices) == 0
    assert loads.max() - loads.min() <= sizes.max()  # rows within one sequence of each other
    assert len(rows) == packing.row_count(-(-int(sizes.sum()) // length), accum * devices)  # fewest rows
    # the shards and microbatches the train step makes of the rows (microbatch i: rows i, i+n, …;
    # then contiguous blocks per device) carry about the same tokens
    cells = np.asarray(statelib.microbatches(dict(x=jnp.asarray(loads)), accum)["x"]).reshape(accum, devices, -1)
    per_cell = cells.sum(-1)
    print("tokens per cell", per_cell.ravel(), "of", sizes.sum())
    assert per_cell.max() - per_cell.min() <= sizes.max()
    assert per_cell.min() >= 0.9 * per_cell.mean()
    # one sequence per row
    flat = packing.assign(sizes, length, 8, packed=False)
    assert [r for r in flat if r] == [[i] for i in range(len(sizes))] and len(flat) % 8 == 0


@pytest.mark.parametrize("needed,multiple,rows", [(1, 1, 1), (8, 1, 8), (9, 1, 10), (17, 1, 20), (33, 1, 40),
                                                  (3, 8, 8), (72, 8, 80), (0, 4, 4)])
def test_row_count(needed, multiple, rows):
    assert packing.row_count(needed, multiple) == rows


def test_update_budget_by_hand_and_its_fallback():
    """The update's fixed shape from the config: 4 prompts x 8 / 2 minibatches = 16
    sequences, prompts of 100 (bucket 128), replies up to 48, rows of 128 (wider: 192 holds
    128 + 48), 2 accumulation steps x 4 devices. The worst case packs one reply a row (128 +
    48 + 48 > 192): 16 rows; the budget is half of them. Sequences that need more rows take
    twice the rows, never a shape in between."""
    from configs import rl_stage1

    rl = rl_stage1.get_config("tiny").rl
    rl.update(prompts_per_step=4, group_size=8, minibatches=2, max_new_tokens=48, pack_length=128, grad_accum_steps=2,
              share_prompts=True, update_budget=0.5)
    budget = packing.update_budget(rl, 100, 4)
    assert budget == packing.Budget(rows=8, length=192, scored=192, packed=True, multiple=8)
    rl.pack_length = 0  # one sequence per row: a row per sequence, scored over the reply's bucket
    assert packing.update_budget(rl, 100, 4) == packing.Budget(16, 128 + 64, 64, False, 8)
    rl.update(pack_length=128, update_budget=1.0)
    assert packing.update_budget(rl, 100, 4).rows == 16
    rl.update_budget = 0.0
    with pytest.raises(ValueError, match="rl.update_budget=0.0"):
        packing.update_budget(rl, 100, 4)

    def group(n, reply):  # n replies of one group, after a prompt of 100
        return packing.Sequences(prompts=[np.ones(100, np.int32)] * n, completions=np.ones((n, 48), np.int32),
                                 lengths=np.full(n, reply), advantages=np.ones(n, np.float32), per_token={},
                                 groups=np.zeros(n, np.int64), share_prompts=True)
    short = group(16, 20)  # 100 + 4 x 20 a row: 4 rows of the 8
    rows = budget.fit(short, np.arange(16))
    assert len(rows) == 8 and sum(map(len, rows)) == 16
    assert all(100 + 20 * len(row) <= 192 for row in rows)
    assert len(budget.fit(group(8, 48), np.arange(8))) == 8  # one long reply a row: 8 rows hold 8
    assert len(budget.fit(group(12, 48), np.arange(12))) == 16  # 12 do not: the next size, 2 x 8
    laid = packing.minibatch_rows(group(12, 48), [np.arange(6), np.arange(6, 12)], budget)
    assert [len(rows) for rows in laid] == [8, 8]


def test_tokens_per_update_on_the_rollout_benchmark_lengths():
    """32 prompts x 8 replies of geometric length (mean ~118, budget 512): what an update
    processes with one sequence per row, and packed."""
    prompts, replies = long_tailed(256, seed=2)
    padded = packing.tokens_per_update(prompts, replies, 0)
    packed = packing.tokens_per_update(prompts, replies, -1)
    print(f"replies mean {replies.mean():.0f} median {np.median(replies):.0f}; padded {padded}; packed {packed}")
    assert padded["loss_tokens"] == packed["loss_tokens"]
    assert packed["processed"] * 3 < padded["processed"]  # measured 46080 vs 147456
    assert packed["unembedded"] * 3 < padded["unembedded"]  # 40960 vs 131072


# ------------------------------------------------------------------ the same loss on a real model
def ragged_rollout(vocab, seed=0):
    """3 prompts x G=4 of ragged prompt and reply lengths, group 1 dropped."""
    rng = np.random.default_rng(seed)
    n, g, budget = 3, 4, 24
    prompts = [list(rng.integers(1, vocab, k)) for k in (3, 9, 5)]
    lengths = np.array([[1, 24, 7, 3], [5, 5, 5, 5], [12, 2, 19, 9]])
    out = sampler.SampleOutput(tokens=rng.integers(1, vocab, (n, g, budget)).astype(np.int32),
                               logprobs=np.zeros((n, g, budget), np.float32),
                               model_logprobs=np.zeros((n, g, budget), np.float32), lengths=lengths,
                               done=np.ones((n, g), bool))
    advantages = rng.normal(size=(n, g)).astype(np.float32)
    return packing.Sequences.from_rollout(prompts, out, advantages, np.array([True, False, True]))


def layout(seqs, pack_length, multiple=2):
    return packing.lay_out(seqs, pack_length, multiple)


def logprobs_at(model, seqs, pack_length):
    """Each sequence's log-probs under `model`, computed in the given layout."""
    rows, length = layout(seqs, pack_length)
    b = {k: jnp.asarray(v) for k, v in packing.build(seqs, rows, length).items()}
    out = token_logprobs(model, b["tokens"], b["segments"], b["positions"], chunk_size=8, at=b["targets"],
                         sources=b["sources"], prefixes=b["prefixes"])
    return packing.unpack(seqs, rows, np.asarray(out))


def loss_and_grads(graphdef, params, batch, c, accum, tis_cap):
    """Σnumerator / Σdenominator over `accum` microbatches, as the train step computes it."""
    def micro(p, mb):
        num, den, _ = grpo.grpo_loss(nnx.merge(graphdef, p), mb, c, chunk_size=8, tis_cap=tis_cap)
        return num, den
    num, den, grads = 0.0, 0.0, None
    for i in range(accum):
        mb = jax.tree.map(lambda x: jnp.asarray(x)[i], statelib.microbatches(batch, accum))
        (n, d), g = jax.value_and_grad(micro, has_aux=True)(params, mb)
        num, den = num + n, den + d
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    return num / den, jax.tree.map(lambda x: x / den, grads)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("beta,entropy_coef,tis_cap,level", [(0.0, 0.0, 0.0, "token"), (0.1, 0.01, 2.0, "token"),
                                                              (0.0, 0.0, 0.0, "sequence")])
@pytest.mark.slow
def test_packed_equals_one_sequence_per_row(aggregation, beta, entropy_coef, tis_cap, level):
    """fp32, ragged lengths, gradient accumulation over 2 microbatches: packed batches (rows of
    the longest sequence's bucket, alone or with shared prompts, and rows of 64 with shared
    prompts: whole groups after one prompt) give the padded batch's loss and gradient, the KL
    reference, TIS and entropy terms included (reference and trainer log-probs computed in
    each layout, as the RL step does); GSPO's sequence ratios too (several sequences a row)."""
    model, _ = models.build(small_model_cfg(seed=3))
    reference, _ = models.build(small_model_cfg(seed=4))
    graphdef, params = nnx.split(model, nnx.Param)
    seqs = ragged_rollout(256)
    own = logprobs_at(model, seqs, 0)
    rng = np.random.default_rng(1)
    mask = np.arange(seqs.completions.shape[1])[None] < seqs.lengths[:, None]
    # pi_old a little off the current policy (ratios on both sides of the clip range), the
    # rollout's log-probs further off (TIS weights both sides of 1)
    seqs.per_token["old_logprobs"] = np.where(mask, own + rng.normal(0, 0.2, own.shape), 0).astype(np.float32)
    seqs.per_token["rollout_logprobs"] = np.where(mask, own + rng.normal(0, 0.5, own.shape), 0).astype(np.float32)
    c = cfg(aggregation=aggregation, beta=beta, entropy_coef=entropy_coef, loss_normalizer=24.0,
            importance_sampling_level=level, seq_eps_low=0.05, seq_eps_high=0.05)  # some sequences clipped
    results = {}
    for pack_length, share in ((0, False), (-1, False), (-1, True), (64, True)):
        seqs.share_prompts = share
        if beta:
            seqs.per_token["ref_logprobs"] = logprobs_at(reference, seqs, pack_length)
        rows, length = layout(seqs, pack_length)
        batch = packing.build(seqs, rows, length)
        results[pack_length, share] = (int((batch["segments"] > 0).sum()),) + loss_and_grads(
            graphdef, params, batch, c, 2, tis_cap)
    padded_tokens, padded_loss, padded_grads = results[0, False]
    assert np.isfinite(float(padded_loss)) and abs(float(padded_loss)) > 1e-3  # a finite, non-zero loss
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(padded_grads))
    assert scale > 1e-4
    tokens = {k: v[0] for k, v in results.items()}
    print("tokens in rows", tokens)  # 2 groups of 4, prompts of 3 and 5, 77 reply tokens: 109 / 109 / 98 / 85
    assert tokens[-1, True] < tokens[-1, False] == tokens[0, False] == 109
    assert tokens[64, True] == 3 + 5 + 77  # each prompt once
    for key, (_, loss, grads) in results.items():
        np.testing.assert_allclose(loss, padded_loss, rtol=1e-5, atol=1e-7, err_msg=str(key))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(padded_grads)):
            np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-5, err_msg=str(key))


def test_scoring_at_positions_equals_the_completion_window():
    """`at` = the last K positions gives `last=K`'s log-probs and entropies."""
    model, _ = models.build(small_model_cfg())
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (3, 16)), jnp.int32)
    segments = jnp.ones((3, 16), jnp.int32).at[1, :4].set(0)
    at = jnp.broadcast_to(jnp.arange(10, 16), (3, 6))
    a = token_logprobs(model, tokens, segments, chunk_size=4, with_entropy=True, last=6)
    b = token_logprobs(model, tokens, segments, chunk_size=4, with_entropy=True, at=at)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)
