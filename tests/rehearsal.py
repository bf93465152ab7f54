"""The rehearsal: a real job's shape on one machine (docs/scale.md, "Rehearsal").

python -m tests.rehearsal [--preset=qwen2.5-7b] [--processes=2] [--devices=2] [--lora [--base-quant=nf4]]
    [--ahead=1]

Every task of the pipeline, synthesize -> distill -> sft -> rl_stage1 (graded) -> rl_stage2 ->
export -> eval (of the exported model), runs as N processes x M CPU devices joined by
jax.distributed on localhost, each process running the command tpu/run.sh sends to every TPU
worker (read from its --dry_run) in its own worker directory (a checkout and a cache of its
own, like a worker's boot disk). Every path is on the GCS emulator; the teacher is a fake
OpenAI-compatible server; each process orders the devices as a shuffled TPU mesh does
(FLEMING_SHUFFLE_DEVICES); the configs are `PRESET@rehearsal`: the real preset's defaults with
only the model shrunk (configs/models.py). With --lora both RL stages train LoRA adapters on
the SFT checkpoint (their checkpoints name it as the base) and export also writes the PEFT adapter;
--base-quant=nf4 holds that base in NF4 (QLoRA). --ahead=K samples both RL stages' rollouts K updates
ahead (`rl.max_staleness`) on half of each host's devices (`rollout.devices`).
Besides paths, the flags in HOW_MUCH are the only changes from the real job (how much work,
never how). A stage passes when every process exits 0 and its outputs are in the bucket.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import NamedTuple

from tests.gcs import Emulator
from tests.test_parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SHUFFLE_SEED = 5  # 4 devices of 2 hosts in the order [3, 1, 2, 0]: hosts interleaved, ids reversed

# How much each task does: the only flags besides paths that differ from the real job (the
# real sizes take hours on a slice). Everything else is the preset's default.
HOW_MUCH = {
    "synthesize": ["--config.synthesis.num_questions=200", "--config.kg.max_diseases=200"],
    "distill": ["--config.max_records=48"],
    "sft": ["--config.optimizer.total_steps=2", "--config.train.seq_len=512"],
    "rl_stage1": ["--config.rl.steps=2", "--config.rl.max_pool=32", "--config.rl.max_new_tokens=32"],
    "rl_stage2": ["--config.rl.steps=2", "--config.rl.max_pool=32", "--config.rl.max_new_tokens=32"],
    "export": [],
    "eval": ["--config.eval.limit=8", "--config.eval.max_new_tokens=32"],
}

# configs/eval.py's paper benchmarks read data/benchmarks/ in the worker's checkout: each gets
# the reader's test fixture, as a user puts the published files there.
BENCHMARK_FIXTURES = {"medxpertqa": "medxpertqa.jsonl", "medqa": "medqa.jsonl", "medmcqa": "medmcqa_hf.jsonl",
                      "mmlu_pro": "mmlu_pro.jsonl", "careqa": "careqa.jsonl", "jmed": "jmed.jsonl",
                      "pubmedqa": "pubmedqa_ori.json", "medbullets": "medbullets.csv"}


class Stage(NamedTuple):
    name: str
    config: str  # main.py's --config
    workdir: str
    flags: list[str]
    outputs: list[str]  # objects under the workdir it must write ("dir/": any object in it)
    says: str = ""  # a line process 0 must print


def stages(preset: str, bucket: str, teacher_url: str, lora: bool = False, base_quant: str = "",
           ahead: int = 0, rollout_devices: int = 0) -> list[Stage]:
    """The pipeline in order, wired the way the configs' docstrings chain a real 7B / 32B job."""
    model = f"{preset}@rehearsal"
    base, synth = f"{bucket}/base_model", f"{bucket}/synthesize"
    data = [f"--config.data.train={synth}/train.jsonl", f"--config.data.eval={synth}/validation.jsonl"]
    rl = [f"--config.tokenizer={base}", *data] + (["--config.model.lora_rank=16", "--config.model.lora_alpha=32",
                                                   f"--config.model.lora_base_quant={base_quant}"] if lora else [])
    rl += [f"--config.rl.max_staleness={ahead}", f"--config.rollout.devices={rollout_devices}"] if ahead else []
    return [
        Stage("synthesize", "configs/synthesize.py", synth, [], ["train.jsonl", "validation.jsonl", "report.json"]),
        Stage("distill", "configs/distill.py", f"{bucket}/distill",
              [f"--config.data.train={synth}/train.jsonl", f"--config.data.validation={synth}/validation.jsonl",
               "--config.teacher.kind=http", f"--config.teacher.base_url={teacher_url}",
               "--config.teacher.model=rehearsal-teacher"], ["train.jsonl", "validation.jsonl", "report.json"]),
        Stage("sft", f"configs/sft.py:{model}", f"{bucket}/sft",
              [f"--config.model.hf_path={base}", f"--config.data.train={bucket}/distill/train.jsonl",
               f"--config.data.eval={bucket}/distill/validation.jsonl"], ["checkpoints/"]),
        Stage("rl_stage1", f"configs/rl_stage1.py:{model}", f"{bucket}/rl_stage1",
              [f"--config.model.init_from={bucket}/sft/checkpoints", *rl], ["checkpoints/", "metrics.jsonl"],
              says="[rl stage 1] graded "),
        Stage("rl_stage2", f"configs/rl_stage2.py:{model}", f"{bucket}/rl_stage2",
              [f"--config.model.init_from={bucket}/rl_stage1/checkpoints", *rl], ["checkpoints/", "metrics.jsonl"],
              says="[rl stage 2] scored the pool"),
        Stage("export", f"configs/export.py:{model}", f"{bucket}/export",
              [f"--config.model.init_from={bucket}/rl_stage2/checkpoints", f"--config.export.tokenizer={base}"],
              ["hf/config.json", "hf/model.safetensors.index.json", "hf/model-00001-of-00001.safetensors",
               "hf/tokenizer.json"] + (["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
                                       if lora else [])),
        Stage("eval", f"configs/eval.py:{model}", f"{bucket}/eval", [f"--config.model.hf_path={bucket}/export/hf"],
              ["results.json", "results.md"]),
    ]


class Teacher(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint that answers the gold answer the answer-conditioned
    prompt states, in the reply format; counts how often each first prompt is asked."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), TeacherHandler)
        self.asks, self.lock = collections.Counter(), threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class TeacherHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        from fleming_jax.data.records import format_reply

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        first = body["messages"][0]["content"]
        with self.server.lock:
            if len(body["messages"]) == 1:
                self.server.asks[first] += 1
        gold = re.search(r"The correct answer is (.*?)\. Write a concise", first, re.DOTALL).group(1)
        letter = re.match(r"([A-Z])\. ", gold + " ")
        text = format_reply("The findings point to one answer; the others do not fit them.",
                            letter.group(1) if letter else gold)
        data = json.dumps({"choices": [{"index": i, "message": {"role": "assistant", "content": text}}
                                       for i in range(body.get("n", 1))]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def base_model(preset: str, out_dir: str) -> None:
    """The stand-in for the HF base model: `PRESET@rehearsal`'s architecture written by
    transformers with the small offline tokenizer. Its weights make it a next-token table
    that writes `<think> words </think><answer>LETTER</answer><|im_end|>` with a random letter
    (the real base follows the format too), so RL's groups get rewards that differ and every
    program of an update runs; the layers stay random, small beside the table."""
    import torch
    import transformers

    from configs import models as presets
    from fleming_jax import models, tokenizer as toklib
    from fleming_jax.data.records import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

    cfg = models.config_from(presets.get(f"{preset}@rehearsal"))
    texts = [open(os.path.join(ROOT, "data", "curated", f), encoding="utf-8").read()
             for f in sorted(os.listdir(os.path.join(ROOT, "data", "curated")))]
    tok = toklib.build(texts, out_dir, cfg.vocab_size)
    hf = cfg.to_hf()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"}))
    ids = tok.convert_tokens_to_ids
    words = tok.encode(" the findings", add_special_tokens=False)
    # state -> ({next token: probability}); state 0 is every token not named here
    table = [({ids(THINK_OPEN): 1.0}, []),
             ({w: 1 / len(words) for w in words}, [ids(THINK_OPEN)]),
             ({ids(THINK_CLOSE): 0.6} | {w: 0.4 / len(words) for w in words}, words),
             ({ids(ANSWER_OPEN): 1.0}, [ids(THINK_CLOSE)]),
             ({ids(c): 0.25 for c in "ABCD"}, [ids(ANSWER_OPEN)]),
             ({ids(ANSWER_CLOSE): 1.0}, [ids(c) for c in "ABCD"]),
             ({tok.eos_token_id: 1.0}, [ids(ANSWER_CLOSE)])]
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    scale = cfg.hidden_size ** 0.5  # the final norm's output for a one-hot residual
    with torch.no_grad():
        embed.zero_()
        head.zero_()
        embed[:, 0] = 4.0
        for state, (following, tokens) in enumerate(table):
            for t in tokens:
                embed[t, 0], embed[t, state] = 0.0, 4.0
            for t, p in following.items():
                head[t, state] = (16.0 + float(torch.tensor(p).log())) / scale
    model.save_pretrained(out_dir)


def worker_dir(home: str) -> str:
    """A worker's `~/fleming-jax`: this checkout's files, and data/benchmarks/ with the fixtures."""
    from configs.eval import PAPER_BENCHMARKS

    checkout = os.path.join(home, "fleming-jax")
    os.makedirs(os.path.join(checkout, "data", "benchmarks"))
    for name in os.listdir(ROOT):
        if name not in ("data", ".git"):
            os.symlink(os.path.join(ROOT, name), os.path.join(checkout, name))
    os.symlink(os.path.join(ROOT, "data", "curated"), os.path.join(checkout, "data", "curated"))
    for b in PAPER_BENCHMARKS:
        target = os.path.join(checkout, b["path"])
        if not os.path.exists(target):
            os.symlink(os.path.join(FIXTURES, BENCHMARK_FIXTURES[b["format"]]), target)
    return checkout


def worker_command(config: str, workdir: str, flags: list[str], processes: int, tmp: str) -> str:
    """The shell command tpu/run.sh runs on every worker for this job (from its --dry_run)."""
    env_file = os.path.join(tmp, "empty.env")  # not the user's tpu/tpu.env
    open(env_file, "w").close()
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "tpu", "run.sh"), "--project=rehearsal", "--zone=localhost",
         f"--accelerator_type=v5p-{8 * processes}", f"--python={sys.executable}", f"--env_file={env_file}",
         f"--config={config}", f"--workdir={workdir}", "--dry_run", "--", *flags],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout
    ssh = next(shlex.split(line) for line in out.splitlines() if " tpu-vm ssh " in line)
    return next(a for a in ssh if a.startswith("--command="))[len("--command="):]


class StageFailed(RuntimeError):
    pass


def run_stage(name: str, command: str, homes: list[str], env: dict, log_dir: str, timeout: float) -> float:
    """`command` in every worker's home as one jax.distributed job; its wall seconds. A process
    that fails stops the others (they would wait for it in a collective)."""
    os.makedirs(log_dir, exist_ok=True)
    port, procs, logs = free_port(), [], []
    for i, home in enumerate(homes):
        logs.append(os.path.join(log_dir, f"{i}.log"))
        host_env = dict(env, FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", FLEMING_NUM_PROCESSES=str(len(homes)),
                        FLEMING_PROCESS_ID=str(i), FLEMING_JAX_CACHE=os.path.join(home, ".cache", "fleming_jax"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=host_env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    start, failed, late = time.monotonic(), None, False
    while [p.poll() for p in procs].count(None):
        if failed is None:
            failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
        late = time.monotonic() - start > timeout
        if late or failed is not None:
            # a hang: SIGABRT makes each process print its Python stacks (PYTHONFAULTHANDLER);
            # a failure: the others get time to print their own error line
            stop = signal.SIGABRT if late else signal.SIGKILL
            time.sleep(0 if late else 15)
            for sig in (stop, signal.SIGKILL):
                running = [p for p in procs if p.poll() is None]
                for p in running:
                    os.killpg(p.pid, sig)
                time.sleep(5 if running else 0)
            break
        time.sleep(0.5)
    seconds = time.monotonic() - start
    codes = [p.wait() for p in procs]
    if any(codes):
        i = failed if failed is not None else next((i for i, c in enumerate(codes) if c), 0)
        tail = open(logs[i], errors="replace").read().strip().splitlines()[-25:]
        why = f"still running after {timeout:.0f}s (a hang?), stopped" if late else "failed"
        raise StageFailed(f"{name}: {why}, exit codes {codes} after {seconds:.0f}s; process {i}'s log {logs[i]} "
                          "ends:\n" + "\n".join(tail))
    return seconds


def run_checked(stage: Stage, processes: int, homes: list[str], env: dict, tmp: str, timeout: float,
                emulator: Emulator, teacher: Teacher, log) -> float:
    """`run_stage` launched as tpu/run.sh launches it, then its outputs checked."""
    flags = stage.flags + HOW_MUCH[stage.name]
    command = worker_command(stage.config, stage.workdir, flags, processes, tmp)
    log(f"[rehearsal] {stage.name}: {command}")
    log_dir = os.path.join(tmp, "logs", stage.name)
    seconds = run_stage(stage.name, command, homes, env, log_dir, timeout)
    bucket, prefix = stage.workdir.removeprefix("gs://").split("/", 1)
    have = [o[len(prefix) + 1:] for o in emulator.objects(bucket) if o.startswith(prefix + "/")]
    missing = [o for o in stage.outputs if not any(h == o or (o.endswith("/") and h.startswith(o)) for h in have)]
    if missing:
        raise StageFailed(f"{stage.name}: every process exited 0 but {stage.workdir} lacks {missing}")
    if stage.says and stage.says not in open(os.path.join(log_dir, "0.log"), errors="replace").read():
        raise StageFailed(f"{stage.name}: process 0 never printed '{stage.says}' (see {log_dir}/0.log)")
    if stage.name == "distill" and max(teacher.asks.values(), default=0) != 1:
        raise StageFailed(f"distill: the teacher was asked some records {max(teacher.asks.values())} times "
                          f"({sum(teacher.asks.values())} asks for {len(teacher.asks)} records)")
    log(f"[rehearsal] {stage.name}: ok in {seconds:.0f}s")
    return seconds


def rehearse(preset: str = "qwen2.5-7b", processes: int = 2, devices: int = 2, tmp: str | None = None,
             timeout: float = 900.0, log=print, lora: bool = False, base_quant: str = "",
             ahead: int = 0) -> dict[str, float]:
    """Runs the whole pipeline; each stage's wall seconds (StageFailed at the first failure)."""
    tmp = tmp or tempfile.mkdtemp(prefix="rehearsal-")
    emulator, teacher = Emulator(), Teacher()
    try:
        bucket = emulator.create_bucket("rehearsal")
        env = dict(os.environ, **emulator.env, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONFAULTHANDLER="1",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   FLEMING_SHUFFLE_DEVICES=str(SHUFFLE_SEED))
        start = time.monotonic()
        local_base = os.path.join(tmp, "base_model")
        base_model(preset, local_base)
        for name in sorted(os.listdir(local_base)):  # this process keeps gcsfs off the emulator
            with open(os.path.join(local_base, name), "rb") as f:
                urllib.request.urlopen(urllib.request.Request(
                    f"{emulator.url}/upload/storage/v1/b/rehearsal/o?uploadType=media&name=base_model/{name}",
                    data=f.read(), method="POST"), timeout=60).read()
        times = {"base model": time.monotonic() - start}
        homes = [os.path.join(tmp, f"worker{i}") for i in range(processes)]
        for home in homes:
            worker_dir(home)
        log(f"[rehearsal] {preset}@rehearsal, {processes} processes x {devices} CPU devices, {bucket} on "
            f"{emulator.url}, logs in {tmp}/logs")
        for stage in stages(preset, bucket, teacher.url, lora, base_quant, ahead, processes * devices // 2):
            times[stage.name] = run_checked(stage, processes, homes, env, tmp, timeout, emulator, teacher, log)
    finally:
        teacher.shutdown()
        emulator.stop()
    log("[rehearsal] wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; total {time.monotonic() - start:.0f}")
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-7b", help="a real preset of configs/models.py")
    parser.add_argument("--processes", type=int, default=2, help="hosts (jax.distributed processes)")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    parser.add_argument("--lora", action="store_true", help="both RL stages train LoRA adapters")
    parser.add_argument("--base-quant", default="", help="with --lora: the base held in int8 or nf4 (QLoRA)")
    parser.add_argument("--ahead", type=int, default=0, help="RL rollouts sampled this many updates ahead, on "
                        "half of each host's devices")
    args = parser.parse_args()
    try:
        rehearse(args.preset, args.processes, args.devices, timeout=args.timeout, lora=args.lora,
                 base_quant=args.base_quant, ahead=args.ahead)
    except StageFailed as e:
        sys.exit(f"[rehearsal] failed: {e}")


if __name__ == "__main__":
    main()
