"""Checkpoints of a run: orbax steps holding the state pytree and JSON metadata.

    <run>/checkpoints/<step>/state, meta
                             the state pytree, and the config, a SHA-256 digest of the state
                             and whatever the trainer adds

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
process killed while saving leaves the previous checkpoints as they were and no half-written step
(the temporary directory is removed when the next `Checkpoints` opens the run). A step is never
written twice. `restore` checks the digest, so a checkpoint corrupted afterwards is refused.

    with Checkpoints(run_dir / "checkpoints") as checkpoints:
        start = checkpoints.resume_or_start(config, resume, ignore=("out",))  # None: fresh
        state = init() if start is None else checkpoints.restore(abstract_state, start)[0]
        ...
        checkpoints.save(step, state, config)

The run directory's other files are `train.run_dir`'s; the trainer loop is `train.loop`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpoints", "state_digest"]

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, corrupt, or from an incompatible run."""


def state_digest(state: PyTree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (of this process's first shard,
    the whole array for a replicated one)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _json_safe(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(dict(config)))


class Checkpoints:
    """The checkpoints of a run: orbax's `CheckpointManager` with the state and JSON metadata.

    Args:
      directory: where the steps go (created if missing, unless `read_only`).
      max_to_keep: the newest steps kept; older ones are deleted after a save.
      read_only: only restore: neither create the directory nor clean up its temporary
        steps (a save in progress by another process), and never save.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3, read_only: bool = False):
        self.directory, self.read_only = Path(directory).absolute(), read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints: {self.directory} is not a directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=("state", "meta"))
        except OSError as error:
            message = f"cannot open checkpoints in {self.directory}: {error}"
            raise CheckpointError(message) from error

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, config: Mapping[str, Any],
             extra: Mapping[str, Any] | None = None) -> bool:
        """Saves `state` as `step` with the config, its digest and `extra` (JSON-able).

        Blocks until the step is committed. Returns False (and writes nothing) when `step` is
        already saved.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        if step in self._manager.all_steps():
            return False
        meta = {"config": _json_safe(config), "digest": state_digest(state),
                "step": step, **dict(extra or {})}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        return True

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (default the latest) without reading the state."""
        step = self._step(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except (ValueError, OSError, KeyError) as error:
            raise self._corrupt(step, error) from error

    def restore(self, abstract_state: PyTree, step: int | None = None
                ) -> tuple[PyTree, dict[str, Any]]:
        """The state of `step` (default the latest) and its metadata.

        Args:
          abstract_state: the state's structure, `jax.ShapeDtypeStruct` leaves (with the
            shardings to restore to), e.g. from `jax.eval_shape` of the state's init.

        Raises:
          CheckpointError: no checkpoint; the saved state does not fit `abstract_state` (other
            model); unreadable files or a digest that does not match (corrupt).
        """
        step = self._step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise self._corrupt(step, error) from error
        state, meta = restored.state, restored.meta
        if meta.get("digest") != state_digest(state):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is corrupt: its "
                                  "arrays do not match the digest saved with them")
        return state, meta

    def resume_or_start(self, config: Mapping[str, Any], resume: bool,
                        ignore: Iterable[str] = ()) -> int | None:
        """Decides between a fresh start and a resume; returns the step to resume or None.

        Without `resume`, refuses a directory that already holds checkpoints (they are never
        overwritten). With it, returns the latest step after checking that its config equals
        `config` except for the keys in `ignore`; None when there is no checkpoint yet.

        Raises:
          CheckpointError: with a message naming the run and what to do.
        """
        step = self.latest_step()
        if step is not None and not resume:
            raise CheckpointError(f"{self.directory} already holds checkpoints (latest step "
                                  f"{step}); resume them (--resume) or choose another out dir")
        if step is None:
            return None
        saved = self.metadata(step).get("config", {})
        new = _json_safe(config)
        differ = sorted(k for k in {*saved, *new} - set(ignore) if saved.get(k) != new.get(k))
        if differ:
            listing = ", ".join(f"{k}={saved.get(k)!r} (now {new.get(k)!r})" for k in differ)
            raise CheckpointError(f"cannot resume {self.directory}: its checkpoint was made "
                                  f"with another config: {listing}")
        return step

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint {'' if step is None else step} in "
                                  f"{self.directory}")
        return step

    def _corrupt(self, step: int, error: Exception) -> CheckpointError:
        reason = " ".join(str(error).split())[:300]
        return CheckpointError(f"checkpoint {self.directory / str(step)} is corrupt or does "
                               f"not fit this model: {type(error).__name__}: {reason}")
