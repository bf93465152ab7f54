"""Distill and synthesize as 2 hosts x 2 CPU devices (jax.distributed on localhost, the way a
TPU slice's hosts run them): process 0 alone asks the HTTP teacher and writes the shared
outputs; the other host writes nothing, keeps step at the preemption checks and returns the
same report. Each 2-host run is checked against a 1-host run of the same command. An error on
process 0 stops every host at once; the local teacher is refused on several hosts."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fleming_jax.data.records import read_jsonl, write_jsonl
from tests.test_distill import Handler, Server, record
from tests.test_parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, VALIDATION = range(60), range(60, 72)
# A record i with i % 3 == 0 is answered wrong once, then refined (tests/test_distill.py's server).
REQUESTS = sum(1 + (i % 3 == 0) for i in [*TRAIN, *VALIDATION])  # 72 first asks + 24 refinements


class Counting(Handler):
    """Counts every request (first asks and refinements), after `server.delay` seconds."""

    def do_POST(self):
        with self.server.lock:
            self.server.requests += 1
        time.sleep(self.server.delay)
        super().do_POST()


@pytest.fixture
def teacher(tmp_path):
    """The fake OpenAI-compatible teacher, and the distill flags that point at it."""
    server = Server()
    server.RequestHandlerClass, server.requests, server.delay = Counting, 0, 0.0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    write_jsonl(tmp_path / "train_qa.jsonl", [record(i) for i in TRAIN])
    write_jsonl(tmp_path / "validation_qa.jsonl", [record(i) for i in VALIDATION])
    server.flags = ["--config=configs/distill.py", f"--config.data.train={tmp_path}/train_qa.jsonl",
                    f"--config.data.validation={tmp_path}/validation_qa.jsonl", "--config.teacher.kind=http",
                    "--config.teacher.model=scripted",
                    f"--config.teacher.base_url=http://127.0.0.1:{server.server_address[1]}/v1",
                    "--config.teacher.max_concurrency=4", "--config.collect.chunk=4", "--config.collect.k=2"]
    yield server
    server.shutdown()


def run_hosts(tmp_path, hosts: int, flags: list[str], tag: str, during=None) -> list[dict]:
    """Each host's {"result", "writes"} (tests/multihost_task_worker.py); `during(procs)` runs
    while they do."""
    port, outs = free_port(), [tmp_path / f"{tag}_{i}.json" for i in range(hosts)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_task_worker", str(outs[i]), str(port), str(i),
                               str(hosts), *flags], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(hosts)]
    try:
        if during:
            during(procs)
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
    return [json.loads(o.read_text()) for o in outs]


def local(value, workdir) -> str:
    """`value` as JSON with `workdir` written as WORKDIR, to compare runs in two directories."""
    return json.dumps(value, sort_keys=True).replace(str(workdir), "WORKDIR")


def outputs(workdir) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*.json*"))}


@pytest.mark.slow
def test_two_hosts_ask_each_record_once_and_write_what_one_host_writes(tmp_path, teacher):
    one = run_hosts(tmp_path, 1, teacher.flags + [f"--workdir={tmp_path}/one"], "one")
    assert teacher.requests == REQUESTS and set(teacher.first_asks.values()) == {1}
    teacher.requests, teacher.first_asks = 0, type(teacher.first_asks)()
    two = run_hosts(tmp_path, 2, teacher.flags + [f"--workdir={tmp_path}/two"], "two")
    assert teacher.requests == REQUESTS, f"{teacher.requests} requests for {REQUESTS} (1 host)"
    assert set(teacher.first_asks.values()) == {1} and len(teacher.first_asks) == len(TRAIN) + len(VALIDATION)
    # the same bytes in every output file (SFT chats, trajectory logs, report)
    files = outputs(tmp_path / "two")
    assert set(files) == {"train.jsonl", "validation.jsonl", "report.json", "trajectories/train.jsonl",
                          "trajectories/validation.jsonl"}
    assert files.pop("report.json").decode().replace(str(tmp_path / "two"), "W") == \
        (tmp_path / "one" / "report.json").read_text().replace(str(tmp_path / "one"), "W")
    assert files == {k: v for k, v in outputs(tmp_path / "one").items() if k in files}
    # process 0 wrote them all, the other host none, and both returned the 1-host report
    assert local(two[0]["writes"], tmp_path / "two") == local(one[0]["writes"], tmp_path / "one")
    assert two[1]["writes"] == []
    assert two[0]["result"] == two[1]["result"]
    assert local(two[0]["result"], tmp_path / "two") == local(one[0]["result"], tmp_path / "one")
    assert two[0]["result"]["train"]["kept"] == len(TRAIN)


@pytest.mark.slow
def test_sigterm_on_the_waiting_host_stops_both_at_a_chunk_and_the_rerun_asks_the_rest(tmp_path, teacher):
    flags, log = teacher.flags + [f"--workdir={tmp_path}/out"], tmp_path / "out" / "trajectories" / "train.jsonl"
    teacher.delay = 0.1  # ~0.3 s a chunk of 4 records: time to signal mid-split

    def signal_host_1(procs):
        deadline = time.time() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 8):
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)

    first = run_hosts(tmp_path, 2, flags, "first", during=signal_host_1)
    assert [r["result"] for r in first] == [{"preempted": "SIGTERM during distillation"}] * 2
    done = len(log.read_text().splitlines())
    assert 8 <= done < len(TRAIN) and done % 4 == 0  # stopped together at a chunk boundary
    teacher.delay = 0.0
    second = run_hosts(tmp_path, 2, flags, "second")
    assert second[0]["result"] == second[1]["result"]
    assert second[0]["result"]["train"]["resumed_from_log"] == done
    assert set(teacher.first_asks.values()) == {1}  # over both runs: no record asked twice
    assert [s["id"] for s in read_jsonl(tmp_path / "out" / "train.jsonl")] == [f"q{i}" for i in TRAIN]


@pytest.mark.slow
def test_two_hosts_synthesize_on_process_0_and_return_its_report(tmp_path):
    flags = ["--config=configs/synthesize.py", "--config.synthesis.num_questions=100", "--config.kg.max_diseases=200"]
    one = run_hosts(tmp_path, 1, flags + [f"--workdir={tmp_path}/one"], "one")
    two = run_hosts(tmp_path, 2, flags + [f"--workdir={tmp_path}/two"], "two")
    assert two[1]["writes"] == [] and len(two[0]["writes"]) == 4
    assert local(two[0]["writes"], tmp_path / "two") == local(one[0]["writes"], tmp_path / "one")
    assert two[0]["result"] == two[1]["result"]  # timings included: the same report, not a recomputed one
    for r in (one[0]["result"], two[0]["result"]):
        r.pop("timings_s")
    assert two[0]["result"] == one[0]["result"]
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def main_hosts(flags: list[str]) -> tuple[list[int], list[str], float]:
    """main.py as 2 hosts (the FLEMING_* variables): exit codes, last stderr lines, seconds."""
    port, start = free_port(), time.time()
    procs = [subprocess.Popen([sys.executable, "main.py", *flags], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(
                                  os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                  FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", FLEMING_NUM_PROCESSES="2",
                                  FLEMING_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        errors = [p.communicate(timeout=120)[1].strip().splitlines()[-1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], errors, time.time() - start


@pytest.mark.slow
def test_an_error_on_process_0_stops_every_host_at_once_in_one_line(tmp_path, teacher):
    """The teacher unreachable: process 0's TeacherError reaches the waiting host too, instead
    of that host sitting in a collective until jax's shutdown barrier gives up (5 minutes, then
    an abort)."""
    closed = f"--config.teacher.base_url=http://127.0.0.1:{free_port()}/v1"
    flags = [f for f in teacher.flags if "base_url" not in f] + [closed, "--config.teacher.max_retries=0",
                                                                  f"--workdir={tmp_path}/out"]
    codes, errors, seconds = main_hosts(flags)
    assert codes == [1, 1] and seconds < 100
    assert errors[0].startswith("error: POST http://127.0.0.1:") and "failed after 1 attempts" in errors[0]
    assert errors[1] == errors[0].replace("error: ", "error: process 0 stopped: ", 1)


@pytest.mark.slow
def test_the_local_teacher_is_refused_on_several_hosts(tmp_path, teacher):
    """Its engine's preemption checks are collectives the waiting hosts never join: asked on
    process 0 alone it hangs (seen: 20 minutes, stuck in an all-gather), so it is refused."""
    flags = [f for f in teacher.flags if "teacher" not in f] + [
        "--config.teacher.kind=local", f"--config.teacher.hf_path={tmp_path}", f"--workdir={tmp_path}/out"]
    codes, errors, _ = main_hosts(flags)
    assert codes == [1, 1] and errors[0] == errors[1]
    assert errors[0].startswith("error: config.teacher.kind='local' cannot run in a job of 2 processes")
