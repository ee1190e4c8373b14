"""Checkpoints of a run: orbax steps holding the state pytree and JSON metadata.

    <run>/checkpoints/<step>/state, meta
                             the state pytree, and the config, a SHA-256 digest of the state
                             and whatever the trainer adds

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
process killed while saving leaves the previous checkpoints as they were and no half-written step
(the temporary directory is removed when the next `Checkpoints` opens the run). A step is never
written twice. `restore` checks the digest, so a checkpoint corrupted afterwards is refused;
without a step it falls back to the newest checkpoint that restores, saying which. A save that
fails (a full disk) raises a one-line `CheckpointError`, the previous checkpoints unchanged.

    with Checkpoints(run_dir / "checkpoints") as checkpoints:
        start = checkpoints.resume_or_start(config, resume, ignore=("out",))  # None: fresh
        state = init() if start is None else checkpoints.restore(abstract_state, start)[0]
        ...
        checkpoints.save(step, state, config)

The run directory's other files are `train.run_dir`'s; the trainer loop is `train.loop`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
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


def _say(message: str) -> None:
    """One line on stderr, from process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Without orbax's error logs (tracebacks from its threads): the failure they describe is
    raised as one CheckpointError line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        if (read_only or self.directory.exists()) and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints: {self.directory} is not a directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False)
        try:
            with _quiet_orbax():
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

        Raises:
          CheckpointError: the step cannot be written (a full disk, no permission): one line
            naming the reason and the last good step, which stays as it was (the unfinished
            step is removed).
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        if step in self._manager.all_steps():
            return False
        meta = {"config": _json_safe(config), "digest": state_digest(state),
                "step": step, **dict(extra or {})}
        try:
            with _quiet_orbax():
                self._manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
                self._manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as error:  # a full disk, no permission, ...
            reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
            if jax.process_index() == 0:  # the unfinished step: free what it took
                for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest_step()
            raise CheckpointError(
                f"cannot save checkpoint {step} in {self.directory}: {reason}; "
                + ("no checkpoint was saved before" if kept is None else
                   f"the last good checkpoint is step {kept}")) from error
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
        """The state of `step` and its metadata; without `step`, those of the newest checkpoint
        that restores: then each newer one refused is reported on stderr in one line, and the
        step used (`set_aside_after` moves the refused ones out of a run's way).

        Args:
          abstract_state: the state's structure, `jax.ShapeDtypeStruct` leaves (with the
            shardings to restore to), e.g. from `jax.eval_shape` of the state's init.

        Raises:
          CheckpointError: no checkpoint; the saved state does not fit `abstract_state` (other
            model); unreadable files or a digest that does not match (corrupt). Without `step`:
            the newest checkpoint's error, when none restores.
        """
        if step is not None:
            return self._restore(abstract_state, self._step(step))
        refused = []
        for candidate in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, meta = self._restore(abstract_state, candidate)
            except CheckpointError as error:
                refused.append(error)
                continue
            for error in refused:
                _say(str(error))
            if refused:
                _say(f"using checkpoint {self.directory / str(candidate)}, the newest valid one")
            return state, meta
        raise refused[0] if refused else CheckpointError(f"no checkpoint in {self.directory}")

    def set_aside_after(self, step: int) -> list[int]:
        """Renames the steps after `step` (refused by `restore`) to `<step>.corrupt`, so the run
        resumed from `step` saves them anew; returns them."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        later = sorted(s for s in self._manager.all_steps() if s > step)
        if jax.process_index() == 0:
            for s in later:
                aside = self.directory / f"{s}.corrupt"
                shutil.rmtree(aside, ignore_errors=True)
                (self.directory / str(s)).rename(aside)
                _say(f"moved the refused checkpoint {s} to {aside}")
        self._manager.reload()
        return later

    def _restore(self, abstract_state: PyTree, step: int) -> tuple[PyTree, dict[str, Any]]:
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
        saved = self._newest_metadata().get("config", {})
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

    def _newest_metadata(self) -> dict[str, Any]:
        """The metadata of the newest step whose metadata reads ({} when none does)."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self.metadata(step)
            except CheckpointError:
                continue
        return {}

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
