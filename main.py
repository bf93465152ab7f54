"""fleming-jax entry point: `python main.py --config=configs/<job>.py[:preset] --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.model.hf_path=/models/Qwen2.5-7B-Instruct`.
"""

import glob
import importlib
import os
import sys


def _default_platforms() -> None:
    """libtpu (installed for `task=plan`) prints TPU-init errors on a machine without a TPU: when
    no TPU (/dev/accel*, /dev/vfio/<n>) and no NVIDIA GPU is present, JAX runs on CPU. An
    explicit JAX_PLATFORMS always wins; TPU VMs and GPU nodes keep JAX's own choice."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*")):
        os.environ["JAX_PLATFORMS"] = "cpu"


_default_platforms()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fleming_jax import config_check, preemption
from fleming_jax.openai_api import ServerError

# task name -> "module:function"; each function is `run(config, workdir)`.
TASKS = {
    "export": "fleming_jax.models.hf:export_task",
    "synthesize": "fleming_jax.data.rods:run",
    "plan": "fleming_jax.plan:run",
    "rl": "fleming_jax.train.rl:run",
    "distill": "fleming_jax.distill.collect:run",
    "sft": "fleming_jax.train.sft:run",
    "demo": "fleming_jax.demo:run",
    "eval": "fleming_jax.evaluate:run",
}

# What a task raises for bad input (a missing file, a bad value, an unreachable server):
# printed as one line (paths.StorageError is an OSError). Any other exception is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ServerError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Job config file (configs/<job>.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory, local or gs:// (default: runs/<task>).")
flags.mark_flags_as_required(["config"])


def compile_cache_dir(config, workdir: str) -> str | None:
    """`config.compile_cache` (local or gs://); "" (the default): `xla_cache` beside the workdir,
    on the run's own storage so it outlives a preempted VM, and shared by every stage of a
    pipeline under one prefix (gs://b/run/sft, gs://b/run/rl_stage1 -> gs://b/run/xla_cache);
    "none": off (None)."""
    from fleming_jax import paths

    chosen = config.get("compile_cache") or ""
    if chosen.lower() == "none":
        return None
    if chosen:
        return chosen
    workdir = paths.absolute(workdir).rstrip("/")
    scheme, _, rest = workdir.rpartition("://")
    parent = workdir if scheme and "/" not in rest else os.path.dirname(workdir)  # a bucket root: inside it
    return paths.join(parent, "xla_cache")


def setup_compile_cache(directory: str | None) -> dict:
    """Turns on JAX's persistent compilation cache in `directory` (every program is cached) and
    returns counters of compile time and cache hits, filled as programs compile."""
    import jax

    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        if "://" in directory:  # XLA's own GPU caches write local files only
            jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    stats = {"seconds": 0.0, "programs": 0, "hits": 0}

    def on_duration(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":  # compiling or loading from the cache
            stats["seconds"] += seconds
            stats["programs"] += 1

    def on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            stats["hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return stats


def split_cpu(config) -> None:
    """`config.cpu_devices=N` (N > 0) makes JAX see the host's CPU as N devices, before any backend
    starts. XLA:CPU leaves cores idle inside much of one device's programs; the demo on 2 cores
    runs ~20% faster as 2 devices (docs/demo_rl.md). GPUs and TPUs are not affected; 0 keeps
    JAX's default (one device, or XLA_FLAGS' --xla_force_host_platform_device_count)."""
    count = config.get("cpu_devices") or 0
    if count:
        import jax

        jax.config.update("jax_num_cpu_devices", int(count))


def keep_compile_cache_in_step() -> None:
    """Turns the persistent compile cache off on several CPU processes (the hosts a test or the
    rehearsal stands in for). Only process 0 writes the cache and the processes' keys differ, so
    process 0 loads a program while the others compile it; XLA:CPU's cross-process collectives
    (gloo) give a program's first run 30 s for every process to arrive, and a skew past that
    kills or hangs the step (rl_stage2 after rl_stage1 did, 3 of 3 runs). TPU hosts share their
    cache keys; GPU is left as it is until it is seen there."""
    import jax

    if jax.process_count() > 1 and jax.default_backend() == "cpu" and jax.config.jax_compilation_cache_dir:
        print(f"[main] compile cache off ({jax.process_count()} CPU processes would load and compile "
              "different programs and miss XLA:CPU's 30 s collective start)", flush=True)
        jax.config.update("jax_compilation_cache_dir", None)


def run_task(config, workdir: str):
    """Runs `config.task`; unknown tasks fail naming the ones that exist."""
    task = config.get("task")
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is not a task; tasks: {', '.join(TASKS)}")
    config_check.check(config)
    module, function = TASKS[task].split(":")
    if task != "plan":  # plan compiles for fake or described devices, never joins a cluster
        from fleming_jax import parallel

        parallel.initialize_distributed(config.get("distributed"))
        keep_compile_cache_in_step()
    from fleming_jax import paths

    paths.check_bucket(workdir)  # a missing bucket or no access fails here, in one line
    paths.makedirs(workdir)
    return getattr(importlib.import_module(module), function)(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        # Library INFO logs (orbax writes several lines per checkpoint) would bury the
        # progress lines each task prints; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", str(config.get("task")))
    logging.info("task=%s workdir=%s", config.get("task"), workdir)
    split_cpu(config)
    cache = compile_cache_dir(config, workdir)
    stats = setup_compile_cache(cache)
    try:
        with preemption.listening():
            run_task(config, workdir)
    except preemption.Preempted as e:
        # Every host got here at the same check and saved what there was: exit 0, so the
        # job's runner (tpu/run.sh) starts the same command again and it resumes.
        print(f"[main] preempted ({e}); exit 0: rerun the same command to resume", flush=True)
        return
    except USER_ERRORS as e:
        if FLAGS.verbosity >= 1:
            raise
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message's layout
    if stats["programs"]:
        import jax

        cache = jax.config.jax_compilation_cache_dir  # None when run_task turned it off
        print(f"[main] XLA compilation {stats['seconds']:.1f} s for {stats['programs']} programs"
              + (f", {stats['hits']} loaded from the cache in {cache}" if cache else ""), flush=True)


def parse_flags(argv):
    """absl's parser; an override of a key the config does not have (`--config.rl.group_sise=4`)
    is one line too, not the traceback ml_collections raises it with."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
        message = " ".join(str(inner.args[0] if inner.args else inner).split())
        sys.exit(f"error: a --config override names a key the config does not have: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
