"""fleming-jax entry point: `python main.py --config=configs/<job>.py[:preset] --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.model.hf_path=/models/Qwen2.5-7B-Instruct`.
"""

import importlib
import os
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from fleming_jax import config_check
from fleming_jax.distill.teachers import TeacherError

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

# What a task raises for bad input (a missing file, a bad value, an unreachable teacher):
# printed as one line. Any other exception is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, TeacherError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Job config file (configs/<job>.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory, local or gs:// (default: runs/<task>).")
flags.mark_flags_as_required(["config"])


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
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
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
    try:
        run_task(config, workdir)
    except USER_ERRORS as e:
        if FLAGS.verbosity >= 1:
            raise
        message = " ".join(str(e).split())  # one line, whatever the message's layout
        print(f"{type(e).__name__}: {message} (--verbosity=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def parse_flags(argv):
    """absl's parser; an override of a key the config does not have (`--config.rl.group_sise=4`)
    is one line too, not the traceback ml_collections raises it with."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
        message = " ".join(str(inner.args[0] if inner.args else inner).split())
        print(f"UsageError: a --config override names a key the config does not have: {message}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
