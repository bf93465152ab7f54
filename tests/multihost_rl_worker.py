"""One process of the multi-host RL test:
`python -m tests.multihost_rl_worker PORT PID NPROC ROOT WORKDIR OUT [MODE]`, MODE: run, or any
of sigterm, lora, ahead joined by "+".

Runs `multihost_run` (tests/test_rl_stages.py) in WORKDIR on a (data=2, fsdp=4) mesh spanning
all processes and writes its metrics rows, final params and the rows each step saw. With
`sigterm`, process 1 (only) gets SIGTERM as step 2's rollout starts; like main.py, the worker
then exits 0 on `Preempted`. With `lora`, the run trains LoRA adapters on the frozen base; with
`ahead`, rollouts are sampled one update ahead on a device group of their own."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fleming_jax import parallel, preemption  # noqa: E402


def main(port, process_id, num_processes, root, workdir, out, mode="run"):
    os.environ.update(FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      FLEMING_NUM_PROCESSES=num_processes, FLEMING_PROCESS_ID=process_id)
    parallel.initialize_distributed()
    assert jax.process_count() == int(num_processes) and jax.device_count() == 8
    from tests.test_rl_stages import multihost_run

    modes = mode.split("+")
    signal_at = 2 if "sigterm" in modes and jax.process_index() == 1 else None
    try:
        rows, params, seen = multihost_run(root, workdir, signal_step=signal_at, lora="lora" in modes,
                                           ahead="ahead" in modes)
    except preemption.Preempted as e:
        print(f"preempted at {time.time():.3f}: {e}", flush=True)
        return
    np.savez(out, rows=np.array(rows, dtype=object), seen=np.array(seen, dtype=object), **params)


if __name__ == "__main__":
    main(*sys.argv[1:])
