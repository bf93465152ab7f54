"""One process of the multi-host test: `python -m tests.multihost_worker PORT PID NPROC OUT`.

Runs 3 sharded SFT train steps of a tiny model on a (data=2, fsdp=4) mesh spanning all
processes, each process feeding only its half of the global batch, and writes the losses.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import ml_collections  # noqa: E402

from fleming_jax import parallel  # noqa: E402
from tests.test_parallel import global_batch_for_test, run_steps  # noqa: E402


def main(port, process_id, num_processes, out):
    os.environ.update(FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      FLEMING_NUM_PROCESSES=num_processes, FLEMING_PROCESS_ID=process_id)
    parallel.initialize_distributed()
    assert jax.process_count() == int(num_processes) and jax.device_count() == 8
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    batch = global_batch_for_test()
    rows = len(batch["tokens"]) // jax.process_count()
    mine = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in batch.items()}
    losses, _ = run_steps(mesh, local_batch=mine)
    with open(out, "w") as f:
        json.dump(losses, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
