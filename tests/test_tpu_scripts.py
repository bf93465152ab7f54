"""tpu/*.sh: the exact commands they run, under --dry_run and against a fake `gcloud`.

The fake gcloud (first on PATH) appends its arguments to a log, one JSON list a line, and
answers `describe` from a list of states (one per call, the last one repeats); NOT_FOUND and
PERMISSION_DENIED fail the way gcloud does. Nothing here needs the network or a cloud account.
"""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "tpu", "*.sh")))
JAX = next(line.split("==")[1].strip() for line in open(os.path.join(ROOT, "requirements.txt"))
           if line.startswith("jax=="))

FAKE_GCLOUD = """#!{python} -S
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[3:4] == ["scp"] and os.path.isfile(args[4]):  # keep what was uploaded
    shutil.copy(args[4], os.environ["FAKE_LOG"] + ".upload")
if "describe" in args:
    with open(os.environ["FAKE_STATES"]) as f:
        states = f.read().split()
    if len(states) > 1:
        with open(os.environ["FAKE_STATES"], "w") as f:
            f.write(" ".join(states[1:]))
    if states[0] in ("NOT_FOUND", "PERMISSION_DENIED"):
        sys.exit("ERROR: (gcloud.compute.tpus.describe) " + states[0] + ": Resource "
                 "'projects/proj/locations/zone/nodes/x' was not found or is not yours")
    print(states[0])
"""

PROJECT, ZONE = "proj", "us-central2-b"
LOC = [f"--project={PROJECT}", f"--zone={ZONE}"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


def describe(name="fleming-jax", queued=False):
    if queued:
        return QR + ["describe", name, *LOC, "--format=value(state.state)"]
    return TPU + ["describe", name, *LOC, "--format=value(state)"]


def ssh(command, *extra, name="fleming-jax"):
    return TPU + ["ssh", name, *LOC, "--worker=all", f"--command={command}", *extra]


PIP = (f"python3 -m pip install -q -r requirements.txt && python3 -m pip install -q "
       f"'jax[tpu]=={JAX}'")
SETUP_COPY = f"mkdir -p fleming-jax && tar -xzf fleming-jax.tar.gz -C fleming-jax && cd fleming-jax && {PIP}"


def setup_copy(tmp, name="fleming-jax", post_setup=""):
    """The commands of setup in copy mode (TMPDIR=tmp)."""
    tarball = f"{tmp}/fleming-jax-{name}.tar.gz"
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
            TPU + ["scp", tarball, f"{name}:fleming-jax.tar.gz", *LOC, "--worker=all"],
            ["rm", "-f", tarball],
            ssh(SETUP_COPY + (f" && {post_setup}" if post_setup else ""), name=name)]


class Shell:
    """Runs the scripts with the fake gcloud on PATH, TMPDIR and cwd in a temp folder."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)
        self.log = tmp / "gcloud.log"
        self.states = tmp / "states"
        self.env_file = tmp / "empty.env"
        self.env_file.write_text("")

    def __call__(self, script, *args, states=("READY",), env=None, env_file=True):
        self.log.write_text("")
        self.states.write_text(" ".join(states))
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "FLEMING_", "TORCHELASTIC_"))
                and k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
        full_env = dict(base, PATH=f"{self.bin}:{os.environ['PATH']}", TMPDIR=str(self.tmp),
                        FAKE_LOG=str(self.log), FAKE_STATES=str(self.states), **(env or {}))
        flags = [f"--env_file={self.env_file}"] if env_file else []
        result = subprocess.run([os.path.join(ROOT, "tpu", script), *flags, *args], cwd=self.tmp,
                                env=full_env, capture_output=True, text=True, timeout=60)
        return result

    def calls(self):
        """The gcloud commands the fake received, each as an argv list."""
        return [["gcloud", *json.loads(line)] for line in self.log.read_text().splitlines()]

    def dry(self, script, *args, **kw):
        """The commands --dry_run prints; checks they are shlex-quoted and nothing ran."""
        result = self(script, "--dry_run", *args, **kw)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        commands = [shlex.split(line) for line in lines]
        assert lines == [shlex.join(c) for c in commands]
        assert self.calls() == []
        return commands


@pytest.fixture
def sh(tmp_path):
    return Shell(tmp_path)


def gcloud_only(commands):
    return [c for c in commands if c[0] == "gcloud"]


# --- every script ----------------------------------------------------------------------------

@pytest.mark.parametrize("script", [os.path.basename(s) for s in SCRIPTS if not s.endswith("common.sh")])
def test_every_script_has_help_and_runs_nothing_for_it(sh, script):
    result = sh(script, "--help", env_file=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: tpu/{script}")
    assert sh.calls() == []


def test_shellcheck_passes_on_every_script():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is missing in CI (.ci/run installs it)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck); CI installs it")
    result = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=os.path.join(ROOT, "tpu"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- create ----------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_dry_run_checks_then_creates_with_the_generation_runtime(sh, accelerator, version):
    assert sh.dry("create.sh", *LOC, f"--accelerator_type={accelerator}") == [
        describe(),
        TPU + ["create", "fleming-jax", *LOC, f"--accelerator-type={accelerator}", f"--version={version}"]]


@pytest.mark.parametrize("capacity", ["--spot", "--preemptible"])
def test_create_spot_and_preemptible(sh, capacity):
    args = [*LOC, "--name=big", "--accelerator_type=v4-32", "--version=my-runtime", capacity]
    expected = [describe("big"),
                TPU + ["create", "big", *LOC, "--accelerator-type=v4-32", "--version=my-runtime", capacity]]
    assert sh.dry("create.sh", *args) == expected
    result = sh("create.sh", *args, states=["NOT_FOUND"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == expected


def test_create_leaves_a_ready_vm_alone(sh):
    result = sh("create.sh", *LOC, "--accelerator_type=v4-8", states=["READY"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [describe()]
    assert "fleming-jax is READY" in result.stderr


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED"])
def test_create_recreates_a_preempted_vm(sh, state):
    result = sh("create.sh", *LOC, "--accelerator_type=v4-8", "--spot", states=[state])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [
        describe(), TPU + ["delete", "fleming-jax", *LOC, "--quiet"],
        TPU + ["create", "fleming-jax", *LOC, "--accelerator-type=v4-8",
               "--version=tpu-ubuntu2204-base", "--spot"]]
    assert f"fleming-jax is {state}: deleting and recreating it" in result.stderr


def test_create_starts_a_stopped_vm(sh):
    result = sh("create.sh", *LOC, "--accelerator_type=v4-8", states=["STOPPED"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [describe(), TPU + ["start", "fleming-jax", *LOC]]


@pytest.mark.parametrize("state,message", [
    ("CREATING", "fleming-jax is CREATING; run this again once it is READY"),
    ("REPAIRING", "fleming-jax is 'REPAIRING'; run this again once it is READY"),
    ("PERMISSION_DENIED", "could not read the state of fleming-jax")])
def test_create_stops_on_a_state_it_cannot_fix(sh, state, message):
    result = sh("create.sh", *LOC, "--accelerator_type=v4-8", states=[state])
    assert result.returncode != 0
    assert message in result.stderr
    assert sh.calls() == [describe()]


def test_create_queued_spot_waits_until_active(sh):
    args = [*LOC, "--accelerator_type=v5p-128", "--queued", "--spot", "--poll_seconds=0"]
    create = QR + ["create", "fleming-jax", *LOC, "--node-id=fleming-jax",
                   "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert sh.dry("create.sh", *args) == [describe(queued=True), create, describe(queued=True)]
    result = sh("create.sh", *args,
                states=["NOT_FOUND", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [describe(queued=True), create] + [describe(queued=True)] * 4
    assert "queued resource fleming-jax is WAITING_FOR_RESOURCES; checking again in 0s" in result.stderr


def test_create_queued_recreates_a_suspended_resource(sh):
    result = sh("create.sh", *LOC, "--accelerator_type=v6e-8", "--queued", states=["SUSPENDED", "ACTIVE"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [
        describe(queued=True), QR + ["delete", "fleming-jax", *LOC, "--force", "--quiet"],
        QR + ["create", "fleming-jax", *LOC, "--node-id=fleming-jax", "--accelerator-type=v6e-8",
              "--runtime-version=v2-alpha-tpuv6e"],
        describe(queued=True)]


def test_create_queued_fails_when_the_request_fails(sh):
    result = sh("create.sh", *LOC, "--accelerator_type=v4-8", "--queued", "--poll_seconds=0",
                states=["NOT_FOUND", "ACCEPTED", "FAILED"])
    assert result.returncode != 0
    assert "queued resource fleming-jax is FAILED" in result.stderr
    assert len(sh.calls()) == 4


# --- setup -----------------------------------------------------------------------------------

def test_setup_copies_the_checkout_to_every_worker_and_installs_jax_tpu(sh, tmp_path):
    assert sh.dry("setup.sh", *LOC) == setup_copy(tmp_path)
    result = sh("setup.sh", *LOC)
    assert result.returncode == 0, result.stderr
    assert sh.calls() == gcloud_only(setup_copy(tmp_path))
    with tarfile.open(f"{sh.log}.upload") as tar:  # what was uploaded is this checkout
        assert {"requirements.txt", "main.py", "tpu/common.sh"} <= set(tar.getnames())
    assert not os.path.exists(tmp_path / "fleming-jax-fleming-jax.tar.gz")


def test_setup_from_a_git_repo(sh):
    commands = sh.dry("setup.sh", *LOC, "--repo=https://example.com/me/fleming-jax.git",
                      "--ref=v1.2", "--python=python3.11", "--post_setup=ls ../models")
    pip = PIP.replace("python3 ", "python3.11 ")
    assert commands == [ssh(
        "{ [ -d fleming-jax/.git ] || git clone -q https://example.com/me/fleming-jax.git fleming-jax; }"
        " && git -C fleming-jax fetch -q origin v1.2 && git -C fleming-jax checkout -q --force FETCH_HEAD"
        f" && cd fleming-jax && {pip} && ls ../models")]


# --- run -------------------------------------------------------------------------------------

RUN = ["--config=configs/sft.py:qwen2.5-7b", "--workdir=gs://bucket/runs/sft", "--log_dir=logs/sft"]
RUN_COMMAND = ("cd fleming-jax && python3 main.py --config=configs/sft.py:qwen2.5-7b "
               "--workdir=gs://bucket/runs/sft")


def test_run_on_a_ready_vm_runs_on_all_workers_with_a_log_each(sh, tmp_path):
    args = [*LOC, "--accelerator_type=v4-32", *RUN, "--", "--config.mesh.fsdp=16", "--config.note=two words"]
    command = RUN_COMMAND + " --config.mesh.fsdp=16 '--config.note=two words'"
    expected = [describe(), ["mkdir", "-p", "logs/sft"], ssh(command, "--output-directory=logs/sft")]
    assert sh.dry("run.sh", *args) == expected
    assert not os.path.exists(tmp_path / "logs")
    result = sh("run.sh", *args, states=["READY"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == gcloud_only(expected)
    assert os.path.isdir(tmp_path / "logs" / "sft")



def test_readme_rl_command_starts_the_distributed_runtime_with_no_extra_flag(sh, monkeypatch):
    """The README's stage-1 command on a v5p-32 (4 workers): the job that run.sh starts passes
    no distributed flag, and its config initialises jax.distributed on a faked 4-worker slice."""
    import jax
    from absl import flags
    from ml_collections import config_flags

    from fleming_jax import parallel

    args = [*LOC, "--accelerator_type=v5p-32", "--config=configs/rl_stage1.py:qwen2.5-7b",
            "--workdir=gs://b/rl_stage1", "--", "--config.model.init_from=gs://b/sft/checkpoints",
            "--config.mesh.fsdp=16"]
    ssh_command = [c for c in sh.dry("run.sh", *args) if "ssh" in c][0]
    job = shlex.split(next(a for a in ssh_command if a.startswith("--command=")).split("&&", 1)[1])
    assert job[:2] == ["python3", "main.py"] and not any("distributed" in a for a in job)
    argv = ["main.py", *(a for a in job[2:] if a.startswith("--config"))]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    monkeypatch.chdir(ROOT)
    flag_values(argv)
    assert flag_values.config.model.init_from == "gs://b/sft/checkpoints"
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    workers = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "1"}
    parallel.initialize_distributed(flag_values.config.distributed, environ=workers)
    assert calls == [{}]

DOWNLOAD = "python3 -m huggingface_hub.cli.hf download Qwen/Qwen2.5-7B-Instruct --local-dir ../models/q"


def test_run_after_preemption_recreates_sets_up_and_runs_again(sh, tmp_path):
    sh.env_file.write_text(f"POST_SETUP={DOWNLOAD}\n")
    args = [*LOC, "--accelerator_type=v4-32", "--spot", *RUN]
    result = sh("run.sh", *args, states=["PREEMPTED"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [
        describe(), TPU + ["delete", "fleming-jax", *LOC, "--quiet"],
        TPU + ["create", "fleming-jax", *LOC, "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base", "--spot"],
        *gcloud_only(setup_copy(tmp_path, post_setup=DOWNLOAD)),
        ssh(RUN_COMMAND, "--output-directory=logs/sft")]


def test_run_queued_spot_slice(sh):
    args = [*LOC, "--name=pod", "--accelerator_type=v5litepod-64", "--queued", "--spot", *RUN]
    expected = [describe("pod", queued=True), ["mkdir", "-p", "logs/sft"],
                ssh(RUN_COMMAND, "--output-directory=logs/sft", name="pod")]
    assert sh.dry("run.sh", *args) == expected
    result = sh("run.sh", *args, states=["ACTIVE"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == gcloud_only(expected)


def test_run_default_log_dir_is_per_vm_and_time(sh):
    commands = sh.dry("run.sh", *LOC, "--accelerator_type=v4-8", *RUN[:2])
    log_dir = commands[1][2]
    assert commands[1][:2] == ["mkdir", "-p"] and log_dir.startswith("logs/fleming-jax/20")
    assert commands[2][-1] == f"--output-directory={log_dir}"


@pytest.mark.parametrize("args,message", [
    (["--workdir=gs://b/x"], "missing --config, e.g. --config=configs/sft.py:qwen2.5-7b"),
    (["--config=configs/sft.py", "--workdir=runs/sft"], "--workdir must be a gs:// path"),
    (["--config=configs/sft.py"], "--workdir must be a gs:// path")])
def test_run_refuses_bad_job_flags(sh, args, message):
    result = sh("run.sh", *LOC, "--accelerator_type=v4-8", *args)
    assert result.returncode == 2 and message in result.stderr
    assert sh.calls() == []


# --- fetch and delete --------------------------------------------------------------------------

def test_fetch_from_gcs_needs_no_tpu(sh):
    expected = [["gcloud", "storage", "cp", "--recursive", "gs://bucket/hf/fleming-7b", "out"]]
    assert sh.dry("fetch.sh", "--src=gs://bucket/hf/fleming-7b", "--dest=out") == expected
    result = sh("fetch.sh", "--src=gs://bucket/hf/fleming-7b", "--dest=out")
    assert result.returncode == 0, result.stderr
    assert sh.calls() == expected


@pytest.mark.parametrize("src,remote", [("runs/export/hf", "fleming-jax/runs/export/hf"),
                                        ("/tmp/profile", "/tmp/profile")])
def test_fetch_from_a_worker(sh, src, remote):
    assert sh.dry("fetch.sh", *LOC, f"--src={src}", "--worker=3") == [
        TPU + ["scp", f"fleming-jax:{remote}", ".", *LOC, "--worker=3", "--recurse"]]


def test_delete_an_existing_vm(sh):
    expected = [describe(), TPU + ["delete", "fleming-jax", *LOC, "--quiet"]]
    assert sh.dry("delete.sh", *LOC) == expected
    result = sh("delete.sh", *LOC, states=["READY"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == expected


def test_delete_a_queued_resource_with_its_node(sh):
    result = sh("delete.sh", *LOC, "--queued", states=["ACTIVE"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [describe(queued=True),
                          QR + ["delete", "fleming-jax", *LOC, "--force", "--quiet"]]


def test_delete_when_gone_is_a_no_op(sh):
    result = sh("delete.sh", *LOC, states=["NOT_FOUND"])
    assert result.returncode == 0, result.stderr
    assert sh.calls() == [describe()]
    assert "fleming-jax does not exist: nothing to delete" in result.stderr


# --- bad input: a clear error and nothing run ----------------------------------------------------

VALID_TYPES = "valid: v4-8 v4-16 v4-32 v4-64 v4-128 v4-256 v4-512 v5litepod-1 v5litepod-4"


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--zone=z", "--accelerator_type=v4-8"], "missing --project (or PROJECT= in the env file)"),
    ("run.sh", ["--zone=z", "--accelerator_type=v4-8", *RUN], "missing --project"),
    ("setup.sh", ["--zone=z"], "missing --project"),
    ("delete.sh", ["--zone=z"], "missing --project"),
    ("fetch.sh", ["--zone=z", "--src=runs/x"], "missing --project"),
    ("create.sh", ["--project=p", "--accelerator_type=v4-8"], "missing --zone"),
    ("create.sh", [*LOC, "--accelerator_type=v9-8"], f"unknown --accelerator_type=v9-8; {VALID_TYPES}"),
    ("run.sh", [*LOC, "--accelerator_type=v5e-8", *RUN], f"unknown --accelerator_type=v5e-8; {VALID_TYPES}"),
    ("create.sh", [*LOC], f"missing --accelerator_type (or ACCELERATOR_TYPE= in the env file); {VALID_TYPES}"),
    ("create.sh", [*LOC, "--accelerator_type=v4-8", "--spot", "--preemptible"],
     "--spot and --preemptible exclude each other"),
    ("create.sh", [*LOC, "--accelerator_type=v4-8", "--queued", "--preemptible"],
     "queued resources take --spot, not --preemptible"),
    ("create.sh", [*LOC, "--accelerator_type=v4-8", "--spot=yes"], "--spot takes true or false, not 'yes'"),
    ("create.sh", [*LOC, "--accelerator_type=v4-8", "--name=My_TPU"], "--name='My_TPU' must be lower-case"),
    ("create.sh", [*LOC, "--acelerator_type=v4-8"], "unknown flag --acelerator_type; flags: --project --zone"),
    ("create.sh", [*LOC, "--project"], "--project needs a value: --project=VALUE"),
    ("create.sh", [*LOC, "us-central1-a"], "unexpected argument 'us-central1-a'"),
    ("setup.sh", [*LOC, "--", "x"], "unexpected arguments after --: x"),
    ("fetch.sh", [*LOC], "missing --src"),
])
def test_bad_input_names_the_problem_and_runs_nothing(sh, script, args, message):
    for extra in ([], ["--dry_run"]):
        result = sh(script, *args, *extra, states=["NOT_FOUND"])
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert result.stdout == ""
        assert sh.calls() == []


def test_unknown_accelerator_message_lists_every_valid_choice(sh):
    result = sh("create.sh", *LOC, "--accelerator_type=v3-8")
    listed = result.stderr.split("valid: ")[1].split()
    assert listed[0] == "v4-8" and "v5litepod-8" in listed and "v5p-8" in listed and listed[-1] == "v6e-256"


# --- env file --------------------------------------------------------------------------------

def test_env_file_sets_defaults_and_flags_win(sh, tmp_path):
    env = tmp_path / "tpu.env"
    env.write_text("# my project\nPROJECT=proj\nZONE='us-central2-b'\n\nACCELERATOR_TYPE=\"v6e-8\"\n"
                   "SPOT=true\nNAME=from-file\n")
    commands = sh.dry("create.sh", f"--env_file={env}", "--name=from-flag", env_file=False)
    assert commands == [describe("from-flag"),
                        TPU + ["create", "from-flag", *LOC, "--accelerator-type=v6e-8",
                               "--version=v2-alpha-tpuv6e", "--spot"]]


def test_example_env_file_is_valid(sh):
    example = os.path.join(ROOT, "tpu", "tpu.env.example")
    assert sh.dry("create.sh", f"--env_file={example}", env_file=False)[1][:5] == TPU + ["create"]


@pytest.mark.parametrize("text,message", [
    ("PROJECT=p\nWORKDIR=gs://x\n", "empty.env:2: unknown key WORKDIR; keys: PROJECT ZONE NAME"),
    ("project p\n", "empty.env:1: expected KEY=value, got: project p")])
def test_bad_env_file(sh, text, message):
    sh.env_file.write_text(text)
    result = sh("create.sh", "--zone=z", "--accelerator_type=v4-8")
    assert result.returncode == 2 and message in result.stderr
    assert sh.calls() == []


# --- gpu_launch.sh ---------------------------------------------------------------------------

def launch(sh, env, *command):
    return sh("gpu_launch.sh", "--dry_run", *command, env=env, env_file=False)


def test_gpu_launch_from_slurm(sh):
    scontrol = sh.bin / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(0o755)
    env = dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="4242",
               SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_NODELIST="gpu[01-09]")
    result = launch(sh, env, "python", "main.py", "--config=configs/sft.py:qwen2.5-7b")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("env FLEMING_COORDINATOR_ADDRESS=gpu07:24242 FLEMING_NUM_PROCESSES=2 "
                             "FLEMING_PROCESS_ID=1 python main.py --config=configs/sft.py:qwen2.5-7b\n")
    result = launch(sh, dict(env, MASTER_PORT="5000"), "true")
    assert "FLEMING_COORDINATOR_ADDRESS=gpu07:5000 " in result.stdout


@pytest.mark.parametrize("agent,port", [("", "29500"), ("True", "29501")])
def test_gpu_launch_from_torchrun_style_variables(sh, agent, port):
    env = dict(MASTER_ADDR="node0", MASTER_PORT="29500", WORLD_SIZE="4", RANK="3",
               TORCHELASTIC_USE_AGENT_STORE=agent)
    result = sh("gpu_launch.sh", "sh", "-c",
                'echo "$FLEMING_COORDINATOR_ADDRESS $FLEMING_NUM_PROCESSES $FLEMING_PROCESS_ID"',
                env=env, env_file=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"node0:{port} 4 3\n"


def test_gpu_launch_keeps_given_fleming_variables_and_runs_one_process_without_any(sh):
    env = dict(FLEMING_COORDINATOR_ADDRESS="10.0.0.1:1234", FLEMING_NUM_PROCESSES="8",
               FLEMING_PROCESS_ID="0", RANK="5", WORLD_SIZE="6", MASTER_ADDR="x", MASTER_PORT="1")
    assert launch(sh, env, "run").stdout == (
        "env FLEMING_COORDINATOR_ADDRESS=10.0.0.1:1234 FLEMING_NUM_PROCESSES=8 FLEMING_PROCESS_ID=0 run\n")
    result = launch(sh, {}, "python", "main.py")
    assert result.stdout == "env python main.py\n"
    assert "running one process" in result.stderr


@pytest.mark.parametrize("env,message", [
    (dict(FLEMING_NUM_PROCESSES="2"), "FLEMING_COORDINATOR_ADDRESS is not set (needed with FLEMING_* variables)"),
    (dict(MASTER_ADDR="h", WORLD_SIZE="2", RANK="0"), "MASTER_PORT is not set (needed with torchrun-style"),
    (dict(MASTER_ADDR="h", MASTER_PORT="1", WORLD_SIZE="2", RANK="2"), "process id '2' is not in 0..1"),
    (dict(MASTER_ADDR="h", MASTER_PORT="1", WORLD_SIZE="0", RANK="0"), "number of processes '0'"),
    (dict(MASTER_ADDR="h", MASTER_PORT="x", WORLD_SIZE="2", RANK="0"), "'h:x' is not host:port"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="2"), "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
])
def test_gpu_launch_refuses_incomplete_or_bad_variables(sh, env, message):
    result = launch(sh, env, "true")
    assert result.returncode == 2 and message in result.stderr
    assert result.stdout == ""


def test_gpu_launch_needs_a_command(sh):
    result = sh("gpu_launch.sh", env_file=False)
    assert result.returncode == 2 and "no command given" in result.stderr
