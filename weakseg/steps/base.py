"""The step model: one name per step, and the bookkeeping every step shares.

A step's name is at once its YAML key, its run folder and (with `-` for `_`) its command:

    train_cam       RUN/train_cam/       weakseg train-cam CONFIG
    infer_cam       RUN/infer_cam/       weakseg infer-cam CONFIG
    ...

A `Step` holds that name, its config dataclass (defined in the step's own module), the steps
whose folders it reads, and `run(config, dataset, run_dir, progress) -> dict`, the result
saved in its done.json. Steps talk only through the run directory: a step reads
`run_dir/<upstream name>/...` and writes `run_dir/<its name>/...`, nothing else.

Bookkeeping (`StepFolder`, `execute`), the same for `weakseg run`, `weakseg sweep` and the
single-step commands:
- `started.json` is written when a step starts, `done.json` when it has finished; both hold
  the step's hash: its config section and dataset chained with the hashes of the steps
  before it (`step_hashes`), so a change anywhere invalidates exactly what follows.
- A step started again with the same hash keeps its folder, so a training resumes from its
  last per-epoch checkpoint; with another hash (or when forced) the folder is cleared.
- `run.json` in the step folder records the step's config, versions, host and a manifest of
  its outputs (`weakseg.record.run_record`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from weakseg.config import to_dict
from weakseg.data.io import write_text_atomic
from weakseg.errors import ConfigError, WeaksegError
from weakseg.record import run_record

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Step:
    name: str  # YAML key and run-folder name; the command is `command`
    config: type  # the step's config dataclass
    run: Callable[..., dict]  # run(config, dataset, run_dir, progress) -> JSON-able result
    summary: str  # one line: what the step makes (the command's help)
    reads: tuple[str, ...] = ()  # the steps whose folders it reads
    dataset: Literal["train", "eval"] = "train"  # which of the pipeline's datasets it runs on
    # Under torchrun: True runs it on rank 0 while the other ranks wait; False runs it on
    # every rank (the trainers use DDP, the image loops shard the images).
    rank_zero: bool = False
    # Keys of `run`'s result that `weakseg run` reports as this step's stage metrics, and the
    # stage's name in results.json (the stages keep their names: cam, refined, pseudo_labels, final).
    stage: str | None = None

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def reads_for(self, config: Any) -> tuple[str, ...]:
        """The steps whose outputs this step reads under `config` (a config may add one:
        refine's affinity random walk reads train_affinity)."""
        extra = getattr(config, "extra_reads", None)
        return self.reads + (tuple(extra()) if callable(extra) else ())


def _without_nulls(value: Any) -> Any:
    """Mappings without their null-valued keys, recursively. An optional key left unset (null)
    then does not enter a step's hash, so a release that adds an optional config key does not
    invalidate the finished steps of existing runs."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def chain_hash(previous: str, section: Any) -> str:
    text = json.dumps(_without_nulls(section), sort_keys=True, default=str)
    return hashlib.sha256((previous + "\n" + text).encode()).hexdigest()[:16]


def step_hashes(steps: list[Step], sections: dict[str, Any], datasets: dict[str, Any]) -> dict[str, str]:
    """Each present step's hash: its config section (a dataclass) and the dataset mapping it
    runs on (resolved paths), chained with every step before it in `steps` order."""
    hashes, previous = {}, ""
    for step in steps:
        if sections.get(step.name) is None:
            continue
        previous = hashes[step.name] = chain_hash(previous, [to_dict(sections[step.name]), datasets[step.dataset]])
    return hashes


class StepFolder:
    """started.json / done.json of one step folder."""

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = Path(folder), digest

    def _read(self, name: str) -> dict | None:
        path = self.folder / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None  # a torn marker counts as absent (markers are written atomically anyway)

    def finished(self) -> dict | None:
        """done.json when the step finished with this hash, else None."""
        done = self._read("done.json")
        return done if done is not None and done.get("hash") == self.digest else None

    def state(self) -> str:
        """In words, for error messages: why this folder is not a finished step of this hash."""
        if self.finished() is not None:
            return "finished"
        if not self.folder.exists():
            return "not run yet"
        done = self._read("done.json")
        if done is not None:
            return "made with another config (its hash differs)"
        started = self._read("started.json")
        if started is not None:
            return "started but not finished" + ("" if started.get("hash") == self.digest else ", with another config")
        return "not a step folder (no started.json)"

    def begin(self, clear: bool) -> None:
        """Clear outputs of a different config (or all, with `clear`); keep those of an
        interrupted run of this same config, so that its training resumes."""
        started = self._read("started.json")
        if started is None and self.folder.is_dir() and any(self.folder.iterdir()):
            # Only what weakseg made is ever deleted: a folder without its marker is someone's.
            raise ConfigError(f"{self.folder}: exists and is not a step folder (no started.json); remove it or give "
                              "the run another `out`")
        if self.folder.exists() and (clear or started is None or started.get("hash") != self.digest):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "done.json").unlink(missing_ok=True)
        write_text_atomic(self.folder / "started.json", json.dumps({"hash": self.digest}) + "\n")

    def finish(self, result: dict, seconds: float) -> None:
        record = {"hash": self.digest, "seconds": round(seconds, 1), "result": result}
        write_text_atomic(self.folder / "done.json", json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def execute(step: Step, config: Any, dataset: Any, run_dir: Path, digest: str, clear: bool, main: bool = True,
            progress: Progress | None = None) -> dict | None:
    """Run one step into run_dir/<name> with the shared bookkeeping: clear or keep its folder
    (`StepFolder.begin`), record it (run.json), run it, mark it done. Returns its result
    (None on the ranks that do not run a rank-zero step). The caller holds the run folder's
    lock and, under torchrun, the barriers around this."""
    from weakseg.train import distributed

    folder = StepFolder(run_dir / step.name, digest)
    if main:
        folder.begin(clear)
    distributed.barrier()
    if step.rank_zero and not main:
        distributed.barrier()
        return None
    started = time.perf_counter()
    record_config = {"step": step.name, step.name: to_dict(config), "hash": digest}
    with run_record(folder.folder, step.name, record_config) as record:
        try:
            result = step.run(config, dataset, run_dir, progress)
        except WeaksegError as exc:
            # Its folder keeps what was written, marked started and not done: no later step
            # reads it, and the same command starts it again (training from its checkpoint).
            # (__notes__ as Python 3.11's add_note keeps them; set by hand for 3.10.)
            exc.__notes__ = [*getattr(exc, "__notes__", []),
                             f"{folder.folder} is left incomplete (started, not finished); fix the problem and run "
                             "the same command again: the step runs again (a training step resumes from its last epoch)"]
            raise
        record["result"] = result
    if main:
        folder.finish(result, time.perf_counter() - started)
    distributed.barrier()
    return result


def config_keys(cls: type, prefix: str) -> list[str]:
    """`prefix.key=default` lines of a config dataclass, nested dataclasses expanded (for a
    command's --help; values as they would be written after `key=`)."""
    lines = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = f"{prefix}.{field.name}"
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            lines.append(f"{key} (required)")
            continue
        if dataclasses.is_dataclass(default):
            lines += config_keys(type(default), key)
        else:
            value = to_dict(default)
            lines.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return lines
