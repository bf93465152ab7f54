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
