"""LoRA adapters: exact at initialisation, the only thing trained, and round trips through
PEFT's format onto the transformers base (peft itself is the reference)."""

import jax
import numpy as np
import pytest
import qwix
import torch
import transformers
from flax import nnx

from configs import models
from fleming_jax import models as fm
from fleming_jax import parallel
from fleming_jax.models import hf, decoder
from fleming_jax.train import sft
from fleming_jax.train import state as train_state
from tests.test_models import padded_batch
from tests.test_parallel import OPTIMIZER, global_batch_for_test, small_model_cfg

ALL = ",".join(decoder.LORA_TARGETS)


def lora_cfg(targets=ALL, **changes):
    return small_model_cfg(lora_rank=4, lora_alpha=8.0, lora_targets=targets, **changes)


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def randomise_adapters(model, seed=0, scale=0.1):
    """Nonzero A and B, so an adapter that is applied wrong shows in the logits."""
    adapters = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    nnx.update(model, jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape, x.dtype), adapters))
    return model


def ours(model, ids, mask):
    return np.asarray(model(ids, attention_mask=mask))


def sft_steps(graphdef, tx, state, n: int = 6):
    """`state` after `n` real SFT steps on the test batch, and their losses."""
    step = train_state.make_train_step(graphdef, tx, sft.sft_loss)
    losses = []
    for _ in range(n):
        state, metrics = step(state, global_batch_for_test())
        losses.append(float(metrics["loss"]))
    return state, losses


def test_fresh_adapters_leave_the_logits_exactly_and_only_they_train():
    ids, mask = padded_batch()
    base, _ = fm.build(small_model_cfg())
    model, config = fm.build(lora_cfg())
    np.testing.assert_array_equal(ours(model, ids, mask), ours(base, ids, mask))  # B = 0

    tx = train_state.make_optimizer(OPTIMIZER)
    graphdef, state = train_state.init_state(model, tx)
    trained, frozen = flat(state.params), flat(state.frozen)
    assert sorted(trained) == sorted(f"layers/{t}_lora_{x}" for t in decoder.LORA_TARGETS for x in "ab")
    assert sorted(frozen) == sorted(flat(nnx.state(base, nnx.Param)))
    adapter_size = sum(x.size for x in trained.values())
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) < 3 * adapter_size  # Adam's moments of adapters only
    state, losses = sft_steps(graphdef, tx, state)
    assert losses[-1] < losses[0] - 0.1, losses
    jax.tree.map(np.testing.assert_array_equal, flat(state.frozen), frozen)  # the base never moves
    assert all(np.abs(v).max() > 0 for k, v in flat(state.params).items() if k.endswith("_b"))


@pytest.mark.parametrize("spec", ["bte,ehd->bthd", "bthd,hde->bte", "bhd,hde->be", "btm,me->bte"])
def test_adapter_path_equals_the_merged_weight(spec):
    """x W + s (x A) B == x (W + s A B) for every projection layout the model uses."""
    config = decoder.DecoderConfig(vocab_size=8, hidden_size=6, intermediate_size=10, num_layers=1, num_heads=2,
                             num_kv_heads=2, head_dim=3, lora_rank=2, lora_alpha=3.0, lora_targets=("o_proj",))
    rng = np.random.default_rng(0)
    x_idx, w_idx = spec.split("->")[0].split(",")
    size = dict(b=2, t=3, e=6, h=2, d=3, m=10)
    x = rng.normal(size=[size[i] for i in x_idx]).astype(np.float32)
    w = rng.normal(size=[size[i] for i in w_idx]).astype(np.float32)
    down, up = decoder.lora_specs(spec)
    n = len([i for i in w_idx if i not in spec.split("->")[1]])
    a = rng.normal(size=(1, *w.shape[:n], 2)).astype(np.float32)
    b = rng.normal(size=(1, 2, *w.shape[n:])).astype(np.float32)
    name = "o_proj" if n == 2 else "q_proj"
    p = {name: w, f"{name}_lora_a": a[0], f"{name}_lora_b": b[0]}
    merged = decoder.merged_weight(config, name, w[None], a, b)[0]
    np.testing.assert_allclose(decoder.linear(p, name, spec, x, config), np.einsum(spec, x, merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,tie", [("qwen2", False), ("qwen3", True)])
def test_peft_loads_our_adapter_onto_the_transformers_base_and_we_load_it_back(hf_dir, tmp_path, model_type, tie):
    import peft

    source = hf_dir(model_type, tie)
    cfg = models.get(source)
    cfg.update(hf_path=source, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    model, config = fm.build(cfg)
    randomise_adapters(model)
    adapter = hf.save_adapter(model, config, str(tmp_path / "adapter"), base=source)
    ids, mask = padded_batch()
    expected = ours(model, ids, mask)

    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, adapter).eval()
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(positions)).logits.numpy()
    real = mask.astype(bool)  # padded positions' logits are not defined the same way
    np.testing.assert_allclose(expected[real], logits[real], atol=1e-4, rtol=0)

    merged = hf.save(decoder.merge_lora(model), config.without_lora(), str(tmp_path / "merged"))
    again = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              position_ids=torch.tensor(positions)).logits.numpy()
    np.testing.assert_allclose(expected[real], merged_logits[real], atol=1e-4, rtol=0)

    cfg.init_from = adapter  # a PEFT adapter to continue training from
    imported, imported_config = fm.build(cfg)
    assert imported_config == config
    np.testing.assert_array_equal(ours(imported, ids, mask), expected)


@pytest.mark.slow  # the fast tier's mesh case: test_lora_steps_on_a_mesh_equal_one_device
def test_a_sharded_lora_model_places_adapters_and_matches_one_device():
    import ml_collections

    ids, mask = padded_batch()
    one = randomise_adapters(fm.build(lora_cfg())[0])
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    placed, _ = fm.build(lora_cfg(), mesh)
    nnx.update(placed, jax.device_put(nnx.state(one, nnx.LoRAParam), parallel.tree_shardings(
        nnx.state(placed, nnx.LoRAParam), mesh)))
    a = nnx.state(placed, nnx.LoRAParam)["layers"]["q_proj_lora_a"][...]
    assert a.sharding.spec == parallel.logical_to_spec(("layers", "embed", "lora"))
    expected = ours(one, ids, mask)
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(ours(placed, ids, mask), expected, atol=1e-5)


def test_bad_lora_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown: qkv_proj"):
        fm.build(lora_cfg(targets="q_proj,qkv_proj"))
    with pytest.raises(ValueError, match="non-empty subset"):
        fm.build(lora_cfg(targets=""))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 1, 2), (1, 4, 1, 2)])  # (data, fsdp, expert, tensor)
def test_lora_steps_on_a_mesh_equal_one_device(shape):
    import ml_collections

    from tests.test_parallel import flat_params, run_steps

    lora = dict(lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    ref_losses, ref_state = run_steps(None, **lora)
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape))))
    losses, state = run_steps(mesh, **lora)
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-5)
    assert ref_losses[2][0] < ref_losses[0][0]
    ref, got = flat_params(ref_state), flat_params(state)
    assert ref and all("lora" in name for name in ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-3, err_msg=name)


# QLoRA. NF4's 16 values as the QLoRA paper publishes them (Dettmers et al. 2023, appendix E):
# the reference the quantized base is checked against, independent of qwix.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171066284, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def quantized_by_hand(w: np.ndarray, qtype: str, in_axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """`w` through absmax quantization per block of `block` along `in_axis`, decoded, and where
    the code is a tie (int8 maps each block's absmax to 127.5: rounding may go either way)."""
    blocks = np.moveaxis(w, in_axis, -1).astype(np.float64)
    blocks = blocks.reshape(*blocks.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    if qtype == "int8":  # the range [-absmax, absmax] onto [-127.5, 127.5], rounded into int8
        scale = absmax / 127.5
        decoded = np.clip(np.round(blocks / scale), -128, 127) * scale
        ties = np.abs(blocks) == absmax
    else:  # the nearest of the 16 values to each weight over its block's absmax
        decoded = NF4[np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(-1)] * absmax
        ties = np.zeros(blocks.shape, bool)
    back = lambda x: np.moveaxis(x.reshape(*x.shape[:-2], -1), -1, in_axis)
    return back(decoded), back(ties)


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_quantized_base_weights_decode_as_absmax_blocks_by_hand(qtype):
    model, _ = fm.build(lora_cfg(lora_base_quant=qtype))
    base, _ = fm.build(small_model_cfg())
    for name, in_axis, block in (("q_proj", 1, 64), ("o_proj", 2, 16), ("down_proj", 1, 64)):  # head_dim 16
        q = model.layers.arrays()[name]
        assert q.qvalue.dtype == (np.int8 if qtype == "int8" else jax.numpy.uint4)
        expected, ties = quantized_by_hand(np.asarray(base.layers.arrays()[name]), qtype, in_axis, block)
        got = np.asarray(decoder.dequantized(q, "float32"))
        np.testing.assert_allclose(got[~ties], expected[~ties], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[ties], expected[ties], rtol=1.01 / 127, err_msg=name)  # one code apart at most


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_qlora_is_lora_on_the_decoded_base(qtype):
    ids, mask = padded_batch()
    qlora = randomise_adapters(fm.build(lora_cfg(lora_base_quant=qtype))[0])
    lora = randomise_adapters(fm.build(lora_cfg())[0])
    nnx.update(lora, nnx.State({"layers": {name: decoder.dequantized(w, "float32")
                                           for name, w in qlora.layers.arrays().items() if "lora" not in name}}))
    expected = ours(lora, ids, mask)
    np.testing.assert_allclose(ours(qlora, ids, mask), expected, atol=1e-5)
    np.testing.assert_allclose(ours(decoder.merge_lora(qlora), ids, mask), expected, atol=1e-5)  # what export writes


@pytest.mark.slow  # real steps on a quantized base (the fast tier: test_qlora_is_lora_on_the_decoded_base)
@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_qlora_trains_only_adapters(qtype):
    tx = train_state.make_optimizer(OPTIMIZER)
    graphdef, state = train_state.init_state(fm.build(lora_cfg(lora_base_quant=qtype))[0], tx)
    frozen = flat(state.frozen)
    state, losses = sft_steps(graphdef, tx, state)
    assert losses[-1] < losses[0] - 0.1, losses
    jax.tree.map(np.testing.assert_array_equal, flat(state.frozen), frozen)  # codes and scales never move


def test_our_nf4_decoder_uses_the_code_qwix_encodes_to():
    codes = qwix.QArray(jax.numpy.arange(16, dtype=jax.numpy.uint4), jax.numpy.ones((1,)), qtype="nf4")
    np.testing.assert_array_equal(decoder.NF4_VALUES, np.asarray(qwix.dequantize(codes)))
    np.testing.assert_allclose(decoder.NF4_VALUES, NF4, rtol=1e-7)


def test_an_nf4_base_decodes_in_its_shards():
    """Through a tensor-parallel NF4 weight (the rollout's layout) a projection moves no weight
    between devices, as with a plain weight (qwix's own NF4 decoder flattens the codes, which
    gathers them whole)."""
    import ml_collections

    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=2)))
    model, _ = fm.build(lora_cfg(lora_base_quant="nf4"), mesh)
    w = model.layers.arrays()["gate_proj"]
    assert w.qvalue.sharding.spec == parallel.logical_to_spec(("layers", "embed", "mlp"))
    x = jax.device_put(np.ones((8, 64), np.float32), parallel.batch_sharding(mesh, 2))
    gathers = lambda decode: jax.jit(lambda x, w: x @ decode(w)[0]).lower(x, w).compile().as_text().count("all-gather(")
    with jax.set_mesh(mesh):
        assert gathers(lambda w: decoder.dequantized(w, "float32")) == 0
        assert gathers(qwix.dequantize) > 0  # what this guards against


@pytest.mark.slow  # the fast tier's QLoRA mesh case: test_an_nf4_base_decodes_in_its_shards
def test_qlora_steps_on_a_mesh_equal_one_device():
    import ml_collections

    from tests.test_parallel import flat_params, run_steps

    qlora = dict(lora_rank=4, lora_alpha=8.0, lora_targets=ALL, lora_base_quant="nf4")
    ref_losses, ref_state = run_steps(None, **qlora)
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    losses, state = run_steps(mesh, **qlora)
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-5)
    ref, got = flat_params(ref_state), flat_params(state)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-3, err_msg=name)


def test_a_quantized_base_needs_adapters():
    with pytest.raises(ValueError, match="lora_base_quant='int4'"):
        fm.build(lora_cfg(lora_base_quant="int4"))
    with pytest.raises(ValueError, match="needs adapters"):
        decoder.DecoderConfig(**{**vars(fm.config_from(small_model_cfg())), "lora_base_quant": "nf4"})


def test_lora_dropout_drops_the_adapter_input_with_a_key_only():
    """Inverted dropout on x before A: each key draws its own mask, the mean over masks is the
    undropped projection, and without a key (evaluation, sampling, RL's log-probs) none."""
    c = fm.config_from(lora_cfg(lora_dropout=0.5))
    keys = iter(jax.random.split(jax.random.key(0), 4))
    p = {name: jax.random.normal(next(keys), shape) for name, shape in
         (("q_proj", (16, 2, 4)), ("q_proj_lora_a", (16, 4)), ("q_proj_lora_b", (4, 2, 4)))}
    x = jax.random.normal(next(keys), (3, 5, 16))
    undropped = np.asarray(decoder.linear(p, "q_proj", "bte,ehd->bthd", x, c))
    dropped = [np.asarray(decoder.linear(p | {"dropout_key": jax.random.key(i)}, "q_proj", "bte,ehd->bthd", x, c))
               for i in range(400)]
    assert not np.allclose(dropped[0], dropped[1]) and not np.allclose(dropped[0], undropped)
    base = np.asarray(decoder.project("bte,ehd->bthd", x, p["q_proj"]))
    spread = np.abs(np.stack(dropped) - undropped).mean()
    np.testing.assert_allclose(np.mean(dropped, axis=0), undropped, atol=0.2 * spread)  # E[mask / keep] = 1
    a_only = np.asarray(decoder.linear(p | {"q_proj_lora_b": jax.numpy.zeros((4, 2, 4)), "dropout_key": jax.random.key(0)},
                                    "q_proj", "bte,ehd->bthd", x, c))
    np.testing.assert_allclose(a_only, base, atol=1e-5)  # the base projection is never dropped


@pytest.mark.slow  # real steps with dropout: deterministic per step (resume draws the same masks)
def test_lora_dropout_steps_are_reproducible_and_differ_from_none():
    from tests.test_parallel import run_steps

    lora = dict(lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    dropped, _ = run_steps(None, lora_dropout=0.3, **lora)
    again, _ = run_steps(None, lora_dropout=0.3, **lora)
    none, _ = run_steps(None, **lora)
    assert dropped == again
    # [loss, grad norm] a step: with B = 0 the first loss is the same, its gradient (of B) is not
    assert dropped[0][0] == none[0][0] and dropped[0][1] != none[0][1] and dropped[2][0] != none[2][0]
    assert dropped[2][0] < dropped[0][0]
