"""One process of the multi-host SFT test:
`python -m tests.multihost_sft_worker PORT PID NPROC ROOT WORKDIR OUT [sigterm]`.

Runs `multihost_run` (tests/test_sft.py) in WORKDIR on the tiny preset's data-parallel mesh
over all processes (2 CPU devices each) and writes its result as JSON. With `sigterm`,
process 1 (only) gets SIGTERM during step 1's first eval batch."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402

from fleming_jax import parallel  # noqa: E402


def main(port, process_id, num_processes, root, workdir, out, mode="run"):
    os.environ.update(FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      FLEMING_NUM_PROCESSES=num_processes, FLEMING_PROCESS_ID=process_id)
    parallel.initialize_distributed()
    assert jax.process_count() == int(num_processes) and jax.device_count() == 4
    from tests.test_sft import multihost_run

    sigterm = "" if mode == "run" else "here" if jax.process_index() == 1 else "other"
    result = multihost_run(root, workdir, sigterm)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
