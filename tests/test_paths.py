"""Hub ids resolve from an offline HF cache (built here by hand, in the hub's cache layout)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(hf_home, repo: str, files: dict[str, str]) -> str:
    """`$HF_HOME/hub/models--org--name/{refs/main, snapshots/<commit>/...}` as the hub writes it."""
    root = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", COMMIT)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, src in files.items():
        shutil.copy(src, os.path.join(snapshot, name))
    return snapshot


def resolve(hf_home, code: str):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", "from fleming_jax import paths, tokenizer\n" + code], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_hub_ids_resolve_offline_and_pickle_only_repos_are_refused(hf_dir, tmp_path):
    model_dir = hf_dir("qwen2")
    from fleming_jax import tokenizer as toklib

    toklib.build(["some text for a tokenizer 0123456789"] * 50, str(tmp_path / "tok"), vocab_size=300)
    files = {n: os.path.join(model_dir, n) for n in os.listdir(model_dir)}
    files |= {n: str(tmp_path / "tok" / n) for n in os.listdir(tmp_path / "tok")}
    home = tmp_path / "hf_home"
    snapshot = cached_repo(home, "acme/tiny-qwen", files)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        f.write(b"not unpickled")
    cached_repo(home, "acme/pickled", {"config.json": files["config.json"],
                                       "pytorch_model.bin": str(tmp_path / "pytorch_model.bin")})

    ok = resolve(home, "from fleming_jax.models import hf\n"
                       "print(paths.local_dir('acme/tiny-qwen'))\n"
                       "print(hf.read_config('acme/tiny-qwen').num_layers)\n"
                       "print(len(tokenizer.load('acme/tiny-qwen')))")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split() == [snapshot, "3", str(len(toklib.load(str(tmp_path / "tok"))))]

    refused = resolve(home, "paths.local_dir('acme/pickled')")
    assert refused.returncode != 0
    assert ("ValueError: hub repo acme/pickled has only pickled weights (pytorch_model.bin); fleming-jax reads "
            "safetensors only") in refused.stderr
    missing = resolve(home, "paths.local_dir('acme/absent')")
    assert "acme/absent: not a local path and not found in the local HF cache (HF_HOME)" in missing.stderr


def test_cpu_run_is_quiet_and_a_restart_loads_its_programs_from_the_compile_cache(tmp_path):
    """libtpu is installed (requirements-test): with JAX_PLATFORMS unset, main.py picks the CPU
    on a machine without a TPU, so no TPU-init errors; restoring a run's checkpoint prints no
    orbax metadata warning. The first start caches its programs in `xla_cache` beside the
    workdir (the default); the second, told that directory by `--config.compile_cache`,
    compiles nothing."""
    import re

    import orbax.checkpoint as ocp
    from flax import nnx

    from configs import export
    from fleming_jax import models
    from fleming_jax.train import checkpoint

    cfg = export.get_config("tiny").model
    cfg.num_layers = 1
    model, _ = models.build(cfg)
    manager = checkpoint.manager(str(tmp_path / "run"), keep=1, use_async=False)
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param)))))
    manager.close()
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    outs = []
    cache = tmp_path / "pipeline" / "xla_cache"
    for chosen in ([], [f"--config.compile_cache={cache}"]):
        result = subprocess.run(
            [sys.executable, "main.py", "--config=configs/export.py", "--config.model.num_layers=1",
             f"--config.model.init_from={tmp_path / 'run' / 'checkpoints'}",
             f"--workdir={tmp_path / 'pipeline' / 'export'}", *chosen],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.strip() == "", result.stderr[-3000:]
        outs.append(re.search(r"XLA compilation ([\d.]+) s for (\d+) programs, (\d+) loaded from the cache in (\S+)",
                              result.stdout).groups())
        assert outs[-1][3] == str(cache)
        assert len([n for n in os.listdir(cache) if n.endswith("-cache")]) == int(outs[0][1])  # one entry a program
    (_, programs, hits, _), (_, programs2, hits2, _) = outs
    assert int(hits) < int(programs) and int(hits2) == int(programs2) == int(programs)
