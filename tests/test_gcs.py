"""The tiny pipeline with every path on gs:// (a real GCS emulator, no mocks): sft -> rl_stage1
(stopped by SIGTERM, resumed) -> rl_stage2 -> export -> eval, storage errors in one line, and
the walk-back over damaged checkpoints (and nothing else) on gs://."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from tests import gcs  # noqa: F401  (sets the gcsfs switch before anything imports gcsfs)
from configs import eval as eval_config
from configs import export as export_config
from configs import rl_stage1, rl_stage2
from configs import sft as sft_config
from fleming_jax import paths, preemption
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import write_jsonl
from fleming_jax.distill import collect, teachers

BUCKET = "fleming-test"
ARCH = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=1024)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator with a bucket; gcsfs (via STORAGE_EMULATOR_HOST) and tensorstore (via
    TENSORSTORE_GCS_HTTP_URL) point at it; local copies of gs:// dirs go to a temp cache."""
    server = gcs.Emulator()
    saved = {k: os.environ.get(k) for k in [*server.env, "FLEMING_JAX_CACHE"]}
    os.environ.update(server.env, FLEMING_JAX_CACHE=str(tmp_path_factory.mktemp("cache")))
    server.create_bucket(BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _rl_config(module, init_from, **rl):
    config = module.get_config("tiny")
    config.model.update(ARCH, init_from=init_from)
    config.tokenizer = f"gs://{BUCKET}/sft/tokenizer"
    config.data.update(train=f"gs://{BUCKET}/data/train.jsonl", eval="")
    config.rl.update(dict(prompts_per_step=2, group_size=4, max_new_tokens=8, grade_k=0, score_k=1, max_pool=8,
                          sparsity_patience=1000) | rl)
    config.checkpoint.every = 1
    return config


@pytest.mark.slow
def test_pipeline_runs_with_every_path_on_gcs(emulator, kg_records, tmp_path, monkeypatch):
    from fleming_jax import evaluate
    from fleming_jax.models import hf
    from fleming_jax.train import rl, sft

    monkeypatch.chdir(tmp_path)  # nothing may appear here under a `gs:` name
    g = f"gs://{BUCKET}"
    records = kg_records[:40]
    chats = [s for o in collect.collect_chunk(records, teachers.KGTeacher(records), collect.CollectConfig(k=1))
             for s in o["sft"]]
    write_jsonl(f"{g}/data/sft.jsonl", chats)
    write_jsonl(f"{g}/data/train.jsonl", records[:32])
    write_jsonl(f"{g}/data/validation.jsonl", records[32:])

    # sft: 3 steps; the tokenizer is built from the chats into gs://…/sft/tokenizer
    config = sft_config.get_config("tiny")
    config.model.update(ARCH)
    config.train.update(seq_len=384, batch_size=8, log_every=1, eval_every=1000)
    config.data.update(train=f"{g}/data/sft.jsonl", eval="")
    config.optimizer.update(total_steps=3, warmup_steps=1)
    config.checkpoint.update(every=2, keep=2)
    sft.run(config, f"{g}/sft")
    assert paths.exists(f"{g}/sft/tokenizer/tokenizer.json")

    # rl stage 1, 2 steps: uninterrupted, and stopped by SIGTERM after step 1 then resumed
    full = rl.RLTrainer(_rl_config(rl_stage1, f"{g}/sft/checkpoints", steps=2), f"{g}/rl1_full")
    full.train()
    cut = rl.RLTrainer(_rl_config(rl_stage1, f"{g}/sft/checkpoints", steps=2), f"{g}/rl1")
    with pytest.raises(preemption.Preempted):
        cut.train(on_step=lambda step: step == 1 and signal.raise_signal(signal.SIGTERM))
    assert [json.loads(line)["step"] for line in paths.read_text(f"{g}/rl1/metrics.jsonl").splitlines()] == [1]
    resumed = rl.RLTrainer(_rl_config(rl_stage1, f"{g}/sft/checkpoints", steps=2), f"{g}/rl1")
    assert [r["step"] for r in resumed.train()] == [2]
    jax.tree.map(np.testing.assert_array_equal, _params(resumed.model()), _params(full.model()))
    # TensorBoard: each run's event files (the preempted one's and the rerun's) uploaded beside it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = tmp_path / "events"
    for f in paths.path(f"{g}/rl1/tensorboard").iterdir():
        (events / f.name).parent.mkdir(exist_ok=True)
        (events / f.name).write_bytes(f.read_bytes())
    assert len(list(events.iterdir())) == 2
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("reward_mean")] == [1, 2]

    # rl stage 2, 1 step, from stage 1's gs:// checkpoints; then export and eval
    rl.run(_rl_config(rl_stage2, f"{g}/rl1/checkpoints", steps=1), f"{g}/rl2")
    config = export_config.get_config("tiny")
    config.model.update(ARCH, init_from=f"{g}/rl2/checkpoints")
    config.export.update(tokenizer=f"{g}/sft/tokenizer", out_dir=f"{g}/export/hf")
    hf.export_task(config, f"{g}/export")
    config = eval_config.get_config("tiny")
    config.model.update(ARCH, init_from=f"{g}/rl2/checkpoints")
    config.tokenizer = f"{g}/sft/tokenizer"
    config.benchmarks = [dict(format="jsonl", path=f"{g}/data/validation.jsonl", name="held-out")]
    config.eval.update(max_new_tokens=8, batch_size=8)
    results = evaluate.run(config, f"{g}/eval")
    assert results["benchmarks"]["held-out"]["n"] == 8

    objects = set(emulator.objects(BUCKET))
    steps = lambda run: sorted({int(o.split("/")[2]) for o in objects if o.startswith(f"{run}/checkpoints/")})
    assert steps("sft") == [2, 3] and steps("rl1") == [1, 2] and steps("rl2") == [1]
    for run, n in (("sft", 3), ("rl1", 2), ("rl2", 1)):
        rows = [json.loads(line) for line in paths.read_text(f"{g}/{run}/metrics.jsonl").splitlines()]
        assert [r["step"] for r in rows if "loss" in r or "reward_mean" in r][-n:] == list(range(1, n + 1)), run
    assert {"eval/results.json", "eval/results.md", "eval/outputs/held-out.jsonl",
            "export/hf/config.json", "export/hf/model.safetensors.index.json", "export/hf/tokenizer.json",
            "sft/tokenizer/tokenizer.json"} <= objects
    assert any(o.startswith("export/hf/model-") and o.endswith(".safetensors") for o in objects)

    import transformers

    local = paths.local_dir(f"{g}/export/hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(local)
    assert model.config.num_hidden_layers == 2
    from fleming_jax.models import config_from
    from fleming_jax.train import checkpoint

    stage2 = checkpoint.restore_model(f"{g}/rl2/checkpoints", config_from(config.model))
    exported, _ = hf.load(f"{g}/export/hf")  # read back from gs:// (copied to the local cache)
    jax.tree.map(np.testing.assert_array_equal, _params(exported), _params(stage2))
    assert transformers.AutoTokenizer.from_pretrained(local).chat_template == toklib.CHAT_TEMPLATE
    leaked = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files if n.startswith("gs:")]
    assert not leaked and not os.path.exists("gs:")


def test_storage_errors_are_one_line_and_name_the_path(emulator):
    with pytest.raises(FileNotFoundError, match=r"config.data.train=gs://fleming-test/none.jsonl does not exist; "
                                                r"run `python main.py --config=configs/synthesize.py"):
        from fleming_jax.train import rl

        rl.read_records(f"gs://{BUCKET}/none.jsonl", "data.train",
                        "python main.py --config=configs/synthesize.py --workdir=runs/synthesize")


def run_main(env, *args):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="", **env)
    return subprocess.run([sys.executable, "main.py", "--config=configs/export.py", "--config.model.num_layers=1",
                           "--config.compile_cache=none", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


class _Refusing:
    """An HTTP endpoint answering as GCS does to a caller without credentials (401, GCS's
    JSON error body), to see what a run without credentials prints."""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have "
                                             "storage.objects.get access to the Google Cloud Storage object."}})
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_POST = do_PUT = do_DELETE = _refuse

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()


def test_bad_buckets_and_credentials_fail_in_one_line(emulator, tmp_path):
    # a bucket that does not exist: one line, nothing created (gcsfs's mkdir would create it)
    result = run_main(emulator.env, "--workdir=gs://no-such-bucket/run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot access gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist or these "
        "credentials cannot see it; fix the path, or create it (`gcloud storage buckets create gs://no-such-bucket`)")
    assert "Traceback" not in result.stderr
    assert "no-such-bucket" not in json.dumps(emulator.objects(BUCKET))
    assert not paths.path("gs://no-such-bucket").exists()
    # a missing input object in an existing bucket names the config key and its producer
    result = run_main(emulator.env, f"--workdir=gs://{BUCKET}/export_bad",
                      f"--config.model.init_from=gs://{BUCKET}/rl_stage2/checkpoints")
    assert result.returncode != 0 and f"gs://{BUCKET}/rl_stage2/checkpoints" in result.stderr
    # no credentials: GCS answers 401 to an anonymous caller
    with _Refusing() as url:
        result = run_main({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url},
                          f"--workdir=gs://{BUCKET}/run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot access gs://{BUCKET}") and "gcloud auth application-default login" in line


def test_local_copies_follow_the_bucket(emulator):
    """A gs:// directory read by a local-only library (tokenizers, safetensors memory maps) is
    copied to the cache; a rewritten object (same size) is fetched again, pickles never are."""
    d = f"gs://{BUCKET}/copies"
    paths.write_text(f"{d}/config.json", "{1}")
    paths.write_text(f"{d}/sub/a.txt", "a")
    paths.write_text(f"{d}/pytorch_model.bin", "pickle")
    local = paths.local_dir(d)
    assert not paths.is_remote(local) and "gs:" not in local
    assert open(os.path.join(local, "config.json")).read() == "{1}"
    assert open(os.path.join(local, "sub", "a.txt")).read() == "a"
    assert not os.path.exists(os.path.join(local, "pytorch_model.bin"))
    paths.write_text(f"{d}/config.json", "{2}")
    assert paths.local_dir(d) == local and open(os.path.join(local, "config.json")).read() == "{2}"
    with pytest.raises(FileNotFoundError, match="gs://fleming-test/none does not exist"):
        paths.local_dir(f"gs://{BUCKET}/none")


@pytest.mark.slow
def test_an_unreachable_endpoint_fails_in_one_line_after_the_retries(tmp_path):
    """Nothing listens at the storage endpoint (a network that drops GCS): gcsfs retries with
    backoff (~1 min), then the run stops with one line naming the path, not a traceback."""
    from tests.test_parallel import free_port

    url = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    result = run_main({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}, f"--workdir=gs://{BUCKET}/run")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot access gs://{BUCKET}/run (") and line.endswith(
        f"check the network and that gs://{BUCKET} is reachable (`gcloud storage ls gs://{BUCKET}`)"), line


def test_compile_cache_defaults_beside_a_gcs_workdir_and_a_restart_loads_from_it(emulator):
    """The default cache is `xla_cache` beside the workdir, here on gs:// (JAX writes it through
    epath): it outlives the VM, and a second start loads every program from it."""
    import re

    outs = []
    for _ in range(2):
        result = run_main(emulator.env, f"--workdir=gs://{BUCKET}/pipeline/export", "--config.compile_cache=")
        assert result.returncode == 0, result.stderr[-3000:]
        outs.append(re.search(r"XLA compilation [\d.]+ s for (\d+) programs, (\d+) loaded from the cache in (\S+)",
                              result.stdout).groups())
    (programs, hits, where), (programs2, hits2, _) = outs
    assert where == f"gs://{BUCKET}/pipeline/xla_cache"
    cached = [o for o in emulator.objects(BUCKET) if o.startswith("pipeline/xla_cache/")]
    assert len(cached) == int(programs) > 0 and all(o.endswith("-cache") for o in cached)
    assert int(hits) == 0 and int(hits2) == int(programs2) == int(programs)


# ------------------------------------------------------------------ damaged checkpoints on gs://
def test_move_on_gcs_copies_every_object_then_deletes_it(emulator):
    """GCS has no rename and no directories: epath's rename into a folder that holds no object
    fails ("folder … does not exist"); `paths.move` copies each object, then deletes it, and
    epath's cached listing sees the move."""
    g = f"gs://{BUCKET}/move"
    for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        paths.write_text(f"{g}/src/{name}", name)
    assert paths.path(f"{g}/src").exists()  # listed (and cached) before the move
    paths.move(f"{g}/src", f"{g}/aside/1-2")
    assert sorted(o for o in emulator.objects(BUCKET) if o.startswith("move/")) == [
        "move/aside/1-2/a.txt", "move/aside/1-2/sub/b.txt", "move/aside/1-2/sub/deeper/c.txt"]
    assert paths.read_text(f"{g}/aside/1-2/sub/deeper/c.txt") == "sub/deeper/c.txt"
    assert not paths.path(f"{g}/src").exists()
    with pytest.raises(FileNotFoundError, match="move/src does not exist"):
        paths.move(f"{g}/src", f"{g}/aside/1-3")
    # what another host sees after process 0 moved a step: a stale listing, until it forgets it
    import fsspec

    assert [p.name for p in paths.path(f"{g}/aside").iterdir()] == ["1-2"]
    fsspec.filesystem("gs", token="anon").rm(f"{BUCKET}/move/aside/1-2", recursive=True)  # another client
    assert [p.name for p in paths.path(f"{g}/aside").iterdir()] == ["1-2"]
    paths.forget_listings(f"{g}/aside/1-2")
    assert not paths.path(f"{g}/aside").exists() and not paths.path(f"{g}/aside/1-2").exists()


def _rl_like_run(root, steps):
    """RL's checkpoints of a sharded small model (8 devices, fsdp) at `steps`: params, Adam state
    and RL's meta (stage, reference, pool, counters, the RNG)."""
    from fleming_jax.train import loop
    from tests.test_checkpoint import small_state

    state, shardings = small_state()
    ckpt = loop.Checkpoints(root, 10, shardings, print)
    for step in steps:
        ckpt.save(step, state, dict(stage=1, reference="gs://x/sft", sparse_steps=step,
                                    pool=dict(passes=[[step, 4]], levels=["Easy"]),
                                    rng=np.random.default_rng(step).bit_generator.state))
    ckpt.wait()
    return state, shardings


def _damage(emulator, prefix, how):
    """Damages the step saved under object `prefix` as a failed write or a bad disk does; returns
    the step's objects after."""
    import fsspec

    fs = fsspec.filesystem("gs", token="anon")
    names = [o for o in emulator.objects(BUCKET) if o.startswith(prefix + "/")]
    arrays = [o for o in names if "/params/ocdbt.process_" in o and "/d/" in o]
    biggest = f"{BUCKET}/" + max(arrays, key=lambda o: fs.size(f"{BUCKET}/{o}"))
    if how == "deleted array file":
        fs.rm(biggest)
    elif how == "truncated array file":
        fs.pipe_file(biggest, fs.cat_file(biggest)[:fs.size(biggest) // 2])
    elif how == "no meta item":
        fs.rm(f"{BUCKET}/{prefix}/meta/metadata")
    elif how == "meta of another step":
        fs.pipe_file(f"{BUCKET}/{prefix}/meta/metadata", json.dumps({"step": 7}).encode())
    return sorted(o for o in emulator.objects(BUCKET) if o.startswith(prefix + "/"))


DAMAGE = {5: "deleted array file", 4: "truncated array file", 3: "no meta item", 2: "meta of another step"}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no late pages
@pytest.mark.slow
def test_damaged_steps_on_gcs_are_moved_aside_down_to_the_newest_that_restores(emulator):
    """Steps 5..2 damaged four ways: each is moved whole to checkpoints_skipped/<step>-<time>/
    with one line, and step 1 (params, Adam state, RL's meta) restores."""
    from fleming_jax.train import loop

    root, prefix = f"gs://{BUCKET}/walk", "walk"
    state, shardings = _rl_like_run(root, range(1, 6))
    damaged = {step: _damage(emulator, f"{prefix}/checkpoints/{step}", how) for step, how in DAMAGE.items()}
    lines = []
    step, restored, got = loop.Checkpoints(root, 10, shardings, lines.append).restore(state)
    assert step == 1 and got["meta"]["sparse_steps"] == 1 and got["meta"]["pool"]["passes"] == [[1, 4]]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.params),
                 jax.tree.map(np.asarray, state.params))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.opt_state),
                 jax.tree.map(np.asarray, state.opt_state))
    assert len(lines) == 5 and lines[4] == f"resumed from {root}/checkpoints/1", lines
    objects = emulator.objects(BUCKET)
    for line, (step, how) in zip(lines, DAMAGE.items()):
        assert line.startswith(f"checkpoint step {step} in {root}/checkpoints does not restore (") and line.endswith(
            "trying the previous step") and f"moved it to {root}/checkpoints_skipped/{step}-" in line, line
        assert len(line) < 450 and "TensorStore" not in line and "tensorstore_spec" not in line, line
        assert not [o for o in objects if o.startswith(f"{prefix}/checkpoints/{step}/")]
        moved = sorted(o for o in objects if o.startswith(f"{prefix}/checkpoints_skipped/{step}-"))
        assert [o.split("/", 3)[3] for o in moved] == [o.split("/", 3)[3] for o in damaged[step]], how
    for why in ("FAILED_PRECONDITION", "OUT_OF_RANGE", "FileNotFoundError", "its meta item says step 7"):
        assert sum(why in line for line in lines) == 1, (why, lines)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no late pages
@pytest.mark.slow
def test_a_read_that_fails_for_another_reason_moves_nothing(emulator, monkeypatch):
    """A config for another model, or the store failing (503) mid-read: one line, every step kept."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    from fleming_jax.train import loop
    from tests.test_checkpoint import small_state

    root = f"gs://{BUCKET}/not-damage"
    state, shardings = _rl_like_run(root, (1, 2))
    prefix = root[len(f"gs://{BUCKET}/"):]
    before = sorted(o for o in emulator.objects(BUCKET) if o.startswith(prefix + "/"))

    other, other_shardings = small_state(hidden_size=32)
    with pytest.raises(ValueError) as e:
        loop.Checkpoints(root, 10, other_shardings, print).restore(other)
    assert str(e.value).startswith(f"checkpoint {root}/checkpoints/2 holds a different model than this config (")
    assert str(e.value).endswith("run with the config (preset and model sizes) that wrote it, or give this config "
                                 "its own --workdir") and "\n" not in str(e.value)

    # tensorstore retries a 503 32 times over minutes; a test waits for 2 quick ones
    for table in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        monkeypatch.setitem(getattr(tensorstore_utils, table), "gcs_request_retries",
                            {"max_retries": 2, "initial_delay": "10ms", "max_delay": "20ms"})
    flaky = gcs.Flaky(emulator.url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", flaky.url)
    try:
        ckpt = loop.Checkpoints(root, 10, shardings, print)
        flaky.down = True
        with pytest.raises(loop.RestoreFailed) as e:
            ckpt.restore(state)
    finally:
        flaky.stop()
    message = str(e.value)
    assert message.startswith(f"could not read checkpoint {root}/checkpoints/2 (") and "\n" not in message
    assert "Service Unavailable" in message, message
    assert message.endswith(f"nothing was moved aside: the storage failed: check it (`gcloud storage ls "
                            f"{root}/checkpoints/2`) and rerun to resume"), message
    assert sorted(o for o in emulator.objects(BUCKET) if o.startswith(prefix + "/")) == before


def test_a_gcs_model_copy_that_does_not_fit_is_refused_in_one_line_and_configs_read_in_place(emulator, hf_dir,
                                                                                            monkeypatch):
    """A gs:// model directory is copied to the local cache to be memory-mapped: with less free
    space than its objects (faked: the defect lives in the comparison) the load stops before
    copying a byte, naming both sizes, the path and what to do. config.json is read on gs://
    itself, by `configs/models.get` and `hf.read_config`, with no copy at all."""
    import collections
    import shutil

    from configs import models as presets
    from fleming_jax.models import hf

    local = hf_dir("qwen3")
    d = f"gs://{BUCKET}/models/tiny-qwen3"
    paths.upload_dir(local, d)
    dest = os.path.join(os.environ["FLEMING_JAX_CACHE"], "gs", BUCKET, "models", "tiny-qwen3")

    want = presets.get(local).to_dict() | {"preset": d}
    assert presets.get(d).to_dict() == want
    assert presets.get(f"{d}/config.json").to_dict() == want | {"preset": f"{d}/config.json"}
    assert vars(hf.read_config(d)) == vars(hf.read_config(local))
    assert not os.path.exists(dest)  # read in place

    size = sum(os.path.getsize(os.path.join(local, n)) for n in os.listdir(local))  # every object gets copied
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - size // 2, size // 2))
    with pytest.raises(paths.StorageError) as e:
        hf.load(d)
    mb = lambda n: f"{n / 1e6:.1f} MB"
    assert str(e.value) == (f"copying {d} to {dest} needs {mb(size)} but {os.path.dirname(dest)} has "
                            f"{mb(size // 2)} free; use a bigger disk, or set FLEMING_JAX_CACHE to a directory on "
                            "a disk with room")
    assert not os.path.exists(dest)  # refused before a byte was copied
    tokenizer_files = os.listdir(paths.local_dir(d, kind="tokenizer"))  # never the weights: it fits
    assert "config.json" in tokenizer_files and not any(n.endswith(".safetensors") for n in tokenizer_files)
    monkeypatch.undo()
    model, _ = hf.load(d)
    jax.tree.map(np.testing.assert_array_equal, _params(model), _params(hf.load(local)[0]))


@pytest.mark.slow
def test_sft_rerun_on_gcs_walks_back_over_a_damaged_step_in_one_line(emulator, kg_records):
    """`python main.py` SFT on gs://, its newest step's biggest array file deleted: the same
    command resumes from the step before, says so in one line (no tracebacks) and finishes with
    the loss the first run had."""
    import subprocess
    import sys

    g = f"gs://{BUCKET}/sft-walk"
    records = kg_records[:40]
    write_jsonl(f"{g}/sft.jsonl", [s for o in collect.collect_chunk(records, teachers.KGTeacher(records),
                                                                     collect.CollectConfig(k=1)) for s in o["sft"]])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "main.py", "--config=configs/sft.py:tiny", f"--workdir={g}/run",
            "--config.compile_cache=none",
            *(f"--config.model.{k}={v}" for k, v in ARCH.items()), "--config.train.seq_len=256",
            "--config.train.batch_size=8", "--config.train.log_every=1", f"--config.data.train={g}/sft.jsonl",
            "--config.data.eval=", "--config.optimizer.total_steps=3", "--config.optimizer.warmup_steps=1",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=3"]
    run = lambda: subprocess.run(args, cwd=root, env=dict(os.environ, XLA_FLAGS=""), capture_output=True,
                                 text=True, timeout=600)
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    losses = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in paths.read_text(f"{g}/run/metrics.jsonl").splitlines()}
    _damage(emulator, "sft-walk/run/checkpoints/3", "deleted array file")

    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in (again.stdout + again.stderr).splitlines() if "does not restore" in line]
    assert len(said) == 1, said
    assert said[0].startswith(f"[sft] checkpoint step 3 in {g}/run/checkpoints does not restore ("), said
    assert f"moved it to {g}/run/checkpoints_skipped/3-" in said[0] and said[0].endswith("trying the previous step")
    assert f"[sft] resumed from {g}/run/checkpoints/2" in again.stdout
    for noise in ("Traceback", "Event loop is closed", "Exception ignored", "TensorStore", "ERROR"):
        assert noise not in again.stdout + again.stderr, (noise, (again.stdout + again.stderr)[-3000:])
    rows = [json.loads(line) for line in paths.read_text(f"{g}/run/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == losses[3]  # resumed exactly
    objects = emulator.objects(BUCKET)
    assert sorted({o.split("/")[3] for o in objects if o.startswith("sft-walk/run/checkpoints/")}) == ["1", "2", "3"]
    assert [o.split("/")[3].split("-")[0] for o in objects if o.startswith("sft-walk/run/checkpoints_skipped/")
            and o.endswith("/_CHECKPOINT_METADATA")] == ["3"]
