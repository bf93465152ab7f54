"""One host of the multi-host task tests:
`python -m tests.multihost_task_worker OUT PORT PID NPROC <main.py flags>...`.

Runs a task as main.py does (its flags, jax.distributed from the FLEMING_* variables when
NPROC > 1, SIGTERM heard as a preemption) on 2 CPU devices, and writes to OUT the task's
returned report (or the preemption) and every file this process opened for writing.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import main as entry  # noqa: E402
from fleming_jax import paths, preemption  # noqa: E402


def record_writes(writes: set[str]) -> None:
    """Notes each file opened for writing through `fleming_jax.paths` (every task's file
    writes go through it: write_text, open_file, Appender)."""
    open_file, write_text, appender = paths.open_file, paths.write_text, paths.Appender

    def opened(p, mode="r"):
        if any(m in mode for m in "wa"):
            writes.add(str(p))
        return open_file(p, mode)

    def written(p, text):
        writes.add(str(p))
        write_text(p, text)

    class Appending(appender):
        def __init__(self, p):
            writes.add(str(p))
            super().__init__(p)

    paths.open_file, paths.write_text, paths.Appender = opened, written, Appending


def main(out, port, process_id, num_processes, *flags):
    if int(num_processes) > 1:
        os.environ.update(FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                          FLEMING_NUM_PROCESSES=num_processes, FLEMING_PROCESS_ID=process_id)
    writes = set()
    record_writes(writes)
    entry.parse_flags(["main.py", *flags])
    try:  # listening first, then joining (in run_task), as main.py does
        with preemption.listening():
            result = entry.run_task(entry.FLAGS.config, entry.FLAGS.workdir)
    except preemption.Preempted as e:
        result = {"preempted": str(e)}
    with open(out, "w") as f:
        json.dump({"result": result, "writes": sorted(writes)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
