"""A run directory: its config (with the trainer kind), its metrics log, writing it safely.

    <run>/config.json        {"trainer": a kind of KINDS, **the config's fields}
    <run>/metrics.jsonl      one JSON record a line (`MetricsLog`), each with a "step"
    <run>/checkpoints/       `train.checkpoint.Checkpoints`
    <run>/.lock              the pid of the training that holds the run (`RunLock`)

`eval`, `visualize` and `train --resume` read the kind from `config.json` (`run_kind`). A
config.json without "trainer" was written before the key existed, when the supervised trainer
was the only one that wrote it bare: it counts as "supervised".
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["KINDS", "MetricsLog", "RunDirBusy", "RunLock", "pick_run_dir", "prepare_run_dir",
           "read_run_config", "run_kind", "write_json", "write_run_config"]

KINDS = ("supervised", "reinforce", "detection", "segmentation")
_KIND_KEY = "trainer"


def prepare_run_dir(out: str) -> Path:
    """Creates the run directory `out`; ValueError if it cannot be written."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to the out dir {out}: {error.strerror or error}") from None
    return path


class RunDirBusy(ValueError):
    """Another training holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory for one training, held while it runs.

    `fcntl.flock` on `<run>/.lock`, which then holds the holder's pid: the kernel drops the
    lock when its process ends in any way (kill -9 included), so a stale lock is simply taken
    over. Only process 0 of a multi-host run locks (the others write nothing).

    Raises:
      RunDirBusy: (on enter) another process holds the lock; the message names its pid.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if jax.process_index() != 0:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusy(f"{self.path.parent} is in use by another training (pid "
                             f"{holder}); wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the lock
            self._fd = None


def write_json(path: str | Path, record: Mapping[str, Any]) -> None:
    """Writes `record` to `path` atomically (temporary file, then rename); process 0 only."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(record), indent=2) + "\n")
    tmp.replace(path)


def write_run_config(run_dir: str | Path, config: Any) -> None:
    """Writes `<run_dir>/config.json`: the trainer kind (`config.KIND`) and `config.to_dict()`."""
    write_json(Path(run_dir) / "config.json", {_KIND_KEY: config.KIND, **config.to_dict()})


def read_run_config(run_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The trainer kind and the config fields of a run's `config.json`.

    Raises:
      ValueError: no config.json, not JSON, or an unknown kind.
    """
    path = Path(run_dir) / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a run config: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a run config: not a JSON object")
    kind = values.pop(_KIND_KEY, KINDS[0])
    if kind not in KINDS:
        raise ValueError(f"{path} names an unknown trainer {kind!r}; known: {', '.join(KINDS)}")
    return kind, values


def run_kind(run_dir: str | Path) -> str:
    """The kind (one of `KINDS`) of the trainer that made the run (`read_run_config`)."""
    return read_run_config(run_dir)[0]


def pick_run_dir(config: Any) -> tuple[Any, bool, str]:
    """Where a run goes when no out dir was asked for: `config.out` when free or holding a run
    of the same config (then it resumes: a finished one just reports its result), else the
    first `<out>-2`, `<out>-3`, ... that is. Returns the config with that `out`, whether to
    resume, and a line saying which."""
    saved_fields = {k: v for k, v in config.to_dict().items() if k not in config.RUNTIME}
    base = config.out
    for attempt in itertools.count(1):
        out = base if attempt == 1 else f"{base}-{attempt}"
        if not (Path(out) / "config.json").exists():
            action = f"starting a new run in {out}"
            if attempt > 1:
                action += f" ({base} holds another one)"
            return dataclasses.replace(config, out=out), False, action
        try:
            kind, values = read_run_config(out)
        except ValueError:
            continue
        if kind == config.KIND and all(values.get(k) == v for k, v in saved_fields.items()):
            return (dataclasses.replace(config, out=out), True,
                    f"{out} holds a run of this config: resuming it (--out DIR to start anew)")


class MetricsLog:
    """Appends JSON records (each with an int "step") to a file, one a line.

    Only process 0 writes, so a multi-host run keeps one log. `truncate(step)` drops the
    records after `step`, so a resumed run's log equals an uninterrupted run's.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> MetricsLog:
        if jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 (closed in __exit__)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(dict(record)) + "\n")
            self._file.flush()

    def read(self) -> list[dict[str, Any]]:
        """Every record, skipping a torn last line (a process killed while writing)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate(self, step: int) -> None:
        """Keeps the records with "step" <= `step` (records start at step 1)."""
        if jax.process_index() != 0 or not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
