"""Our params checkpoints: exact round trip, manager layout, clear mismatch errors."""

import os
import sys

import numpy as np
import pytest

from configs import models
from fleming_jax import models as fm
from fleming_jax.train import checkpoint
from tests.test_hf import params_of


def tiny(**changes):
    cfg = models.get("tiny")
    cfg.update(dict(num_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256) | changes)
    return cfg


def small_state(**arch):
    """A TrainState (params + Adam state) of a small model sharded over 8 devices (fsdp), and
    its shardings."""
    import ml_collections

    from fleming_jax import parallel
    from fleming_jax.train import state as statelib

    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)))
    cfg = tiny(**dict(dict(num_heads=4, num_kv_heads=2, head_dim=16), **arch))
    tx = statelib.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=1, total_steps=10, final_lr_fraction=0.1, max_grad_norm=1.0, b1=0.9,
        b2=0.95, eps=1e-8, weight_decay=0.1)))
    _, state = statelib.init_state(fm.build(cfg, mesh)[0], tx, mesh)
    return state, statelib.state_shardings(state, mesh)


def test_params_round_trip_and_init_from(tmp_path):
    model, config = fm.build(tiny(seed=3))
    # A training run's manager layout: <root>/<step>/params; the newest step wins.
    checkpoint.save_params(str(tmp_path / "run" / "5" / "params"), fm.build(tiny(seed=4))[0])
    checkpoint.save_params(str(tmp_path / "run" / "12" / "params"), model)
    restored, _ = fm.build(tiny(init_from=str(tmp_path / "run")))
    for name, value in params_of(model).items():
        np.testing.assert_array_equal(value, params_of(restored)[name], err_msg=name)


def test_restore_refuses_other_architectures_and_missing_paths(tmp_path):
    model, _ = fm.build(tiny())
    checkpoint.save_params(str(tmp_path / "p"), model)
    with pytest.raises(ValueError, match="does not match the model config"):
        fm.build(tiny(hidden_size=32, init_from=str(tmp_path / "p")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fm.build(tiny(init_from=os.path.join(str(tmp_path), "nowhere")))


# ------------------------------------------------------------------ what a failed read means
def test_only_damage_moves_a_step_aside():
    """Missing, short or undecodable files are damage; a store outage, running out of memory or
    a bug are not: those become one line (or keep their traceback) and move nothing."""
    import json

    import jax

    from fleming_jax.train import loop

    def raised(inner, outer="Encountered error while reading array index"):
        try:
            try:
                raise inner
            except Exception as e:
                raise Exception(outer) from e
        except Exception as e:
            return e
    assert loop.damaged(raised(ValueError('OUT_OF_RANGE: Error reading "layers.q_proj/0.0" in OCDBT database at '
                                          'gs://b/run/checkpoints/4/params/: Requested byte range [0, 9) is not '
                                          'valid [tensorstore_spec=\'{"driver":"zarr"}\']'))) == (
        'ValueError: OUT_OF_RANGE: Error reading "layers.q_proj/0.0": Requested byte range [0, 9) is not valid')
    assert loop.damaged(FileNotFoundError("File gs://b/run/checkpoints/4/meta/metadata not found."))
    assert loop.damaged(json.JSONDecodeError("Unterminated string", "{", 1))
    assert loop.damaged(KeyError('Item "meta" was not found in the checkpoint. Available items: []'))
    assert loop.damaged(KeyError("meta")) is None
    for code in ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION"):
        assert loop.damaged(raised(ValueError(f"{code}: Error reading x")))
    outage = raised(ValueError("UNAVAILABLE: Error reading x: All 32 retry attempts failed: Service Unavailable"))
    oom = raised(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1073741824 bytes."))
    bug = raised(TypeError("unsupported operand"))
    for error in (outage, oom, bug, ConnectionError("reset by peer"), MemoryError()):
        assert loop.damaged(error) is None, error
    said = str(loop.unreadable("gs://b/run/checkpoints/4", outage))
    assert said.startswith("could not read checkpoint gs://b/run/checkpoints/4 (ValueError: UNAVAILABLE: ")
    assert said.endswith("nothing was moved aside: the storage failed: check it "
                         "(`gcloud storage ls gs://b/run/checkpoints/4`) and rerun to resume")
    tpu_oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to "
                                         "allocate 1.00G. That was not possible. There are 512.00M free.")
    for error in (oom, tpu_oom, MemoryError()):
        assert isinstance(loop.unreadable("/r/checkpoints/4", error), loop.RestoreFailed)
        assert str(loop.unreadable("/r/checkpoints/4", error)).endswith(
            "it does not fit in memory here: use more devices (mesh.fsdp) or hosts")
    assert loop.unreadable("/r/checkpoints/4", bug) is bug  # a bug keeps its traceback


def _restore_worker(port, process_id, root, phase, out):
    """One of 2 processes x 4 devices: `save` steps 1 and 2, or `restore` (the step, the lines it
    logged and the steps its manager lists after go to `out`)."""
    import json

    from fleming_jax import parallel
    from fleming_jax.train import loop

    os.environ.update(FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", FLEMING_NUM_PROCESSES="2",
                      FLEMING_PROCESS_ID=process_id)
    parallel.initialize_distributed()
    state, shardings = small_state()
    lines = []
    ckpt = loop.Checkpoints(root, 10, shardings, lines.append)
    if phase == "save":
        for step in (1, 2):
            ckpt.save(step, state, {})
        ckpt.wait()
        return
    step, _, _ = ckpt.restore(state)
    with open(out, "w") as f:
        json.dump(dict(step=step, lines=lines, steps=ckpt.manager.all_steps()), f)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "gcs"])
def test_hosts_agree_when_only_one_finds_the_step_damaged(tmp_path, monkeypatch, store):
    """Params sharded over both processes; a data file only process 1 reads is deleted: both
    skip step 2 (process 0 moves it, once), restore step 1 and list only step 1 after, instead
    of one host going on while the other walks back (a hang)."""
    import json
    import subprocess

    import fsspec

    from tests import gcs
    from tests.test_parallel import ROOT, free_port

    server = gcs.Emulator() if store == "gcs" else None
    if server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
    root = server.create_bucket("hosts") + "/run" if server else str(tmp_path / "run")

    def run(phase):
        port = free_port()
        env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs = [subprocess.Popen([sys.executable, "-m", "tests.test_checkpoint", str(port), str(i), root, phase,
                                   str(tmp_path / f"out{i}.json")], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        for p in procs:
            try:
                out, _ = p.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AssertionError(f"{phase}: a process hung")
            assert p.returncode == 0, out[-3000:]
        return [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)] if phase == "restore" else None
    try:
        run("save")
        fs, base = fsspec.core.url_to_fs(root, **({"token": "anon"} if server else {}))
        data = fs.ls(f"{base}/checkpoints/2/params/ocdbt.process_1/d", detail=True)
        fs.rm(max(data, key=lambda f: f["size"])["name"])
        first, second = run("restore")
        listed = lambda d: sorted(name.rstrip("/").rsplit("/", 1)[1] for name in fs.ls(f"{base}/{d}", refresh=True))
        assert listed("checkpoints") == ["1"] and [d.split("-")[0] for d in listed("checkpoints_skipped")] == ["2"]
    finally:
        if server:
            server.stop()
    assert first["step"] == second["step"] == 1 and first["steps"] == second["steps"] == [1]
    assert first["lines"][0].startswith(f"checkpoint step 2 in {root}/checkpoints does not restore "
                                        "(damaged as process 1 read it; its log says why)"), first["lines"]


if __name__ == "__main__":
    _restore_worker(*sys.argv[1:])
