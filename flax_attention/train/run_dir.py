"""A run directory: its config (with the trainer kind), its metrics log, writing it safely.

    <run>/config.json        {"trainer": "supervised" | "reinforce", **the config's fields}
    <run>/metrics.jsonl      one JSON record a line (`MetricsLog`), each with a "step"
    <run>/checkpoints/       `train.checkpoint.Checkpoints`

`eval`, `visualize` and `train --resume` read the kind from `config.json` (`run_kind`). A
config.json without "trainer" was written before the key existed, when the supervised trainer
was the only one that wrote it bare: it counts as "supervised".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["KINDS", "MetricsLog", "prepare_run_dir", "read_run_config", "run_kind",
           "write_json", "write_run_config"]

KINDS = ("supervised", "reinforce")
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
    """"supervised" or "reinforce": the trainer that made the run (`read_run_config`)."""
    return read_run_config(run_dir)[0]


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
