"""The one path layer: every path a user gives may be local, `gs://` (or any fsspec URL), or,
for model and tokenizer directories, a Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`).

`path()` wraps `etils.epath` (gs:// through gcsfs). Libraries that need local files
(safetensors memory maps, HF tokenizers) get `local_dir()`: a `gs://` directory is copied
once into a local cache (`$FLEMING_JAX_CACHE`, default `~/.cache/fleming_jax`), a hub id is
resolved by `huggingface_hub.snapshot_download` (safetensors, config and tokenizer files
only; `HF_HOME` and `HF_HUB_OFFLINE` are honoured). On a multi-host slice every worker
resolves its own copy onto its own disk (no cross-host waiting). Storage failures surface as
`StorageError`: one line naming the path and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

from etils import epath

# gcsfs logs a traceback per failed retry; StorageError carries the one line that matters.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

# Files a model or tokenizer directory needs; pickled weights are never fetched.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                "*.model", "added_tokens.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class StorageError(OSError):
    """A path could not be reached or read; the message says which and what to do."""


def is_remote(p) -> bool:
    return "://" in str(p)


def path(p) -> epath.Path:
    """`p` as an epath.Path (local or remote)."""
    return epath.Path(p)


def join(p, *parts) -> str:
    """`p/parts` as a string, without touching the storage (`gs://` stays `gs://`)."""
    return str(epath.Path(p).joinpath(*parts))


def absolute(p) -> str:
    """Local paths made absolute; remote ones as they are (never `<cwd>/gs:/…`)."""
    return str(p) if is_remote(p) else os.path.abspath(p)


def exists(p) -> bool:
    with storage_errors(p):
        return epath.Path(p).exists()


def require(p, what: str, fix: str) -> None:
    """FileNotFoundError `<what>=<p> does not exist; <fix>` when `p` is missing (a StorageError
    when its bucket is missing or unreachable)."""
    if not exists(p):
        check_bucket(p)
        raise FileNotFoundError(f"{what}={p} does not exist; {fix}")


def check_bucket(p) -> None:
    """For a remote `p`: StorageError unless its bucket exists and answers."""
    if not is_remote(p):
        return
    scheme, rest = str(p).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    with storage_errors(p):
        found = epath.Path(bucket).exists()
    if not found:
        raise StorageError(f"cannot access {p}: bucket {bucket} does not exist or these credentials cannot see "
                           f"it; fix the path, or create it (`gcloud storage buckets create {bucket}`)")


def makedirs(p) -> None:
    """Creates local directory `p`; nothing for object stores, which have no directories
    (gcsfs's mkdir would create a missing bucket)."""
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)


def move(src, dst) -> None:
    """Moves directory `src` to `dst` (which must not exist; parents are created). Local: one
    rename. Object stores have no rename and no directories (a rename into a folder that holds
    no object yet fails): every object is copied, then the originals are deleted."""
    if not is_remote(src):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        os.rename(src, dst)
        return
    from etils.epath import backend

    with storage_errors(src):
        fs = backend.fsspec_backend.fs(src)  # epath's own client: its cached listings must see the move
        source, target = (fs._strip_protocol(str(p)).rstrip("/") for p in (src, dst))
        names = fs.find(source)
        if not names:
            raise FileNotFoundError(f"{src} does not exist")
        fs.copy(names, [target + name[len(source):] for name in names])
        fs.rm(names)
    forget_listings(src)


def forget_listings(p) -> None:
    """Drops the listings of remote `p` and its parents that epath's client cached (gcsfs keeps
    them for the life of the process): after another host added or removed objects there."""
    if is_remote(p):
        from etils.epath import backend

        fs = backend.fsspec_backend.fs(p)
        fs.invalidate_cache(fs._strip_protocol(str(p)))


def open_file(p, mode: str = "r"):
    """`open()` for local or remote files; parents are created when writing."""
    p = epath.Path(p)
    with storage_errors(p):
        if any(m in mode for m in "wa"):
            makedirs(p.parent)
        return p.open(mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def read_text(p) -> str:
    with storage_errors(p):
        return epath.Path(p).read_text(encoding="utf-8")


def write_text(p, text: str) -> None:
    p = epath.Path(p)
    with storage_errors(p):
        makedirs(p.parent)
        p.write_text(text, encoding="utf-8")


class Appender:
    """A text file opened for appending that survives restarts: a real append locally; for
    object stores (no append) the whole file is rewritten on each `flush()` (fine for logs of
    up to a few MB, such as metrics and distill logs)."""

    def __init__(self, p):
        self.p = epath.Path(p)
        self.remote = is_remote(p)
        if self.remote:
            self.text = read_text(p) if exists(p) else ""
            self.dirty = False
        else:
            makedirs(self.p.parent)
            self.f = open(self.p, "a", encoding="utf-8")

    def write(self, s: str) -> None:
        if self.remote:
            self.text, self.dirty = self.text + s, True
        else:
            self.f.write(s)

    def flush(self) -> None:
        if not self.remote:
            self.f.flush()
        elif self.dirty:
            write_text(self.p, self.text)
            self.dirty = False

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_hub_id(p) -> bool:
    """`org/name` that is not an existing local path."""
    p = str(p)
    return not is_remote(p) and bool(_HUB_ID.match(p)) and not os.path.exists(p)


def local_dir(p, kind: str = "model") -> str:
    """A local directory holding what `p` holds (`kind`: "model", "tokenizer", or "data",
    which is never a hub id).

    Local: `p` itself. `gs://…`: a copy under the cache (a file is fetched again only when its
    object generation changed; pickles skipped, and weights for a tokenizer), refused in one
    line when it would not fit the cache's disk. Hub id: `snapshot_download` of the
    safetensors, config and tokenizer files; a model repo with only pickled weights is refused.
    """
    p = str(p)
    if kind != "data" and is_hub_id(p):
        return _hub_snapshot(p, kind)
    if not is_remote(p):
        return p
    import fsspec

    scheme, rest = p.split("://", 1)
    dest = os.path.join(cache_root(), scheme, rest.strip("/"))
    manifest_file = os.path.join(dest, ".fleming_jax_source.json")
    manifest = json.load(open(manifest_file)) if os.path.exists(manifest_file) else {}
    with storage_errors(p):
        fs, root = fsspec.core.url_to_fs(p)
        found = fs.find(root, detail=True) if fs.isdir(root) else {}
        if not found:
            raise FileNotFoundError(f"{p} does not exist (or is not a directory)")
        todo = {}  # object -> (relative name, version) of what is not here yet
        skipped = PICKLE_SUFFIXES + ((".safetensors",) if kind == "tokenizer" else ())
        for name, info in found.items():
            rel = os.path.relpath(name, root.rstrip("/"))
            version = [info.get("size"), info.get("generation") or info.get("etag") or info.get("mtime")]
            here = manifest.get(rel) == version and os.path.exists(os.path.join(dest, rel))
            if not (rel.endswith(skipped) or here):
                todo[name] = (rel, version)
        _check_room(p, dest, sum(int(found[name].get("size") or 0) for name in todo))
        for name, (rel, version) in todo.items():
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, part = tempfile.mkstemp(dir=os.path.dirname(target))
            os.close(fd)
            fs.get_file(name, part)  # streamed in chunks: a 4 GB shard never sits whole in memory
            os.replace(part, target)
            manifest[rel] = version
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    return dest


def _check_room(p: str, dest: str, size: int) -> None:
    """Refuses to copy `size` bytes of `p` into `dest` when its disk has less free (a Qwen3-32B
    directory is ~65 GB, a TPU VM's boot disk often 100 GB): one line, before a byte is copied."""
    disk = os.path.abspath(dest)
    while not os.path.exists(disk):
        disk = os.path.dirname(disk)
    free = shutil.disk_usage(disk).free
    if size > free:
        gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
        raise StorageError(f"copying {p} to {dest} needs {gb(size)} but {disk} has {gb(free)} free; use a "
                           "bigger disk, or set FLEMING_JAX_CACHE to a directory on a disk with room")


def upload_dir(local: str, p) -> None:
    """Copies the files of local directory `local` into `p` (local or remote)."""
    out = epath.Path(p)
    with storage_errors(p):
        for root, _, files in os.walk(local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), local)
                makedirs((out / rel).parent)
                epath.Path(os.path.join(root, name)).copy(out / rel, overwrite=True)


def cache_root() -> str:
    return os.environ.get("FLEMING_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fleming_jax")


def _hub_snapshot(repo: str, kind: str) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        snapshot = huggingface_hub.snapshot_download(repo, allow_patterns=HUB_PATTERNS,
                                                     local_files_only=offline)
    except (errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.HfHubHTTPError,
            OSError) as e:
        where = "the local HF cache (HF_HOME)" if offline else "the Hugging Face hub"
        raise StorageError(f"{repo}: not a local path and not found in {where} ({type(e).__name__}); "
                           f"pass an existing directory, or download it first with "
                           f"`hf download {repo}` (unset HF_HUB_OFFLINE to fetch)") from None
    files = set(os.listdir(snapshot))
    if kind == "model" and not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(_repo_pickles(repo, snapshot))
        if pickles:
            raise ValueError(f"hub repo {repo} has only pickled weights ({', '.join(pickles)}); fleming-jax "
                             "reads safetensors only and never unpickles: pick a repo with .safetensors "
                             "or convert it once with transformers (save_pretrained(out, "
                             "safe_serialization=True)) and pass that directory")
        raise FileNotFoundError(f"hub repo {repo} has no .safetensors weights")
    return snapshot


def _repo_pickles(repo: str, snapshot: str) -> list[str]:
    """Pickled weight files the repo holds: from the hub when online, else from the cache."""
    names = []
    try:
        import huggingface_hub

        if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
            names = huggingface_hub.list_repo_files(repo)
    except Exception:  # offline or unreachable: what the cache knows is enough for the message
        pass
    names = names or os.listdir(snapshot)
    return [n for n in names if n.endswith(PICKLE_SUFFIXES)]


class storage_errors:
    """Turns an object-store failure on `p` into a one-line StorageError (missing files stay
    FileNotFoundError, so callers can name the command that makes them)."""

    def __init__(self, p):
        self.p = str(p)

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not is_remote(self.p) or isinstance(e, (FileNotFoundError, StorageError)):
            return False
        raise StorageError(describe(self.p, e)) from None


def describe(p: str, e: BaseException) -> str:
    """One line: which path failed, why (briefly) and what to do."""
    text = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    scheme, rest = p.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    lowered = text.lower()
    if any(s in lowered for s in ("credential", "unauthorized", "401", "403", "forbidden", "permission",
                                  "anonymous caller", "does not have storage", "refresh", "invalid_grant")):
        fix = (f"check access to {bucket}: run `gcloud auth application-default login` or set "
               "GOOGLE_APPLICATION_CREDENTIALS (on a TPU VM: the VM's service account needs storage access)")
    elif any(s in lowered for s in ("bucket", "404", "not found", "nosuchbucket")):
        fix = f"check that bucket {bucket} exists (`gcloud storage ls {bucket}`)"
    else:
        fix = f"check the network and that {bucket} is reachable (`gcloud storage ls {bucket}`)"
    return f"cannot access {p} ({text}); {fix}"
