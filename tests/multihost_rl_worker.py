"""One process of the multi-host RL test: `python -m tests.multihost_rl_worker PORT PID NPROC ROOT OUT`.

Runs `rl_run` (tests/test_rl_stages.py) on a (data=2, fsdp=4) mesh spanning all processes
and writes its metrics rows, final params and the rows each step saw."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fleming_jax import parallel  # noqa: E402


def main(port, process_id, num_processes, root, out):
    os.environ.update(FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      FLEMING_NUM_PROCESSES=num_processes, FLEMING_PROCESS_ID=process_id)
    parallel.initialize_distributed()
    assert jax.process_count() == int(num_processes) and jax.device_count() == 8
    from tests.test_rl_stages import multihost_run

    rows, params, seen = multihost_run(root, os.path.join(root, "mh_run"))
    np.savez(out, rows=np.array(rows, dtype=object), seen=np.array(seen, dtype=object), **params)


if __name__ == "__main__":
    main(*sys.argv[1:])
