"""The training loop every trainer shares, and what reads a finished run back.

`fit(trainer)` writes `config.out`: `config.json` (the trainer kind and the config,
`run_dir.write_run_config`), `metrics.jsonl` (a loss record every `log_every` steps, with
images/s; an evaluation record after each of the trainer's evaluation points and at the end)
and checkpoints every `checkpoint_every` steps, after each evaluation and on SIGINT/SIGTERM
(then the status is "interrupted"). A lock (`run_dir.RunLock`) keeps a second training out of
the directory. A step whose loss or gradient is NaN or Inf stops the run (`NonFiniteLoss`)
before anything non-finite is saved, or is skipped with the config's `skip_nonfinite`. A resume
takes the newest checkpoint that restores (a corrupt newer one is set aside) with the whole
state (parameters, BatchNorm statistics, optimiser state, step, metric sums, key), skips the
batches of the epoch already seen (the order depends only on (seed, epoch)) and cuts the log
back to the checkpoint: a run killed and resumed ends as an uninterrupted one, log included
(less timings).

`open_run(run_dir)` builds the trainer named by a run's config.json and restores its newest
valid checkpoint; `evaluate_run` evaluates it.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flax_attention.train import parallel
from flax_attention.train.checkpoint import Checkpoints
from flax_attention.train.interrupt import Interrupt
from flax_attention.train.progress import Throughput, progress_bar
from flax_attention.train.run_dir import (
    MetricsLog,
    RunLock,
    prepare_run_dir,
    run_kind,
    write_run_config,
)
from flax_attention.train.trainer import Trainer, TrainState

__all__ = ["NonFiniteLoss", "TrainResult", "evaluate_run", "fit", "open_run", "trainer_class"]

# The trainer of each kind, imported when asked for (they import this module).
_TRAINERS = {"supervised": "flax_attention.train.supervised:SupervisedTrainer",
             "reinforce": "flax_attention.train.reinforce:RamTrainer",
             "detection": "flax_attention.train.detection:DetectionTrainer",
             "segmentation": "flax_attention.train.segmentation:SegmentationTrainer"}


class NonFiniteLoss(ValueError):
    """A training step's loss or gradient was NaN or Inf (and `skip_nonfinite` was off)."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """`status` "completed" or "interrupted"; `metrics` those of the last evaluation record
    (the test metrics, and the trainer's training fields) or only "step" when interrupted
    between evaluations, with "wall_s" and the median "img_per_s" of this process."""

    status: str
    metrics: dict[str, Any]


def trainer_class(kind: str) -> type[Trainer]:
    """The `Trainer` subclass of a kind of `run_dir.KINDS`."""
    module, name = _TRAINERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass
class _Loop:
    """A run in progress: the trainer and what the loop writes to."""

    trainer: Trainer
    checkpoints: Checkpoints
    log: MetricsLog
    interrupt: Interrupt
    step_delay: float
    speed: Throughput = dataclasses.field(default_factory=Throughput)

    def save(self, step: int, state: TrainState) -> None:
        trainer = self.trainer
        self.checkpoints.save(step, state, trainer.config.to_dict(),
                              trainer.checkpoint_extra(step))

    def check_finite(self, step: int, metrics: dict) -> None:
        """Reports a step whose loss or gradient was not finite (the step changed nothing but
        the step count): skipped (`skip_nonfinite`) or, raising `NonFiniteLoss`, the end of the
        run, its last checkpoint the one before."""
        if parallel.to_host(metrics["finite"]):
            return
        loss = float(parallel.to_host(metrics["loss"]))
        if self.trainer.config.skip_nonfinite:
            if jax.process_index() == 0:
                print(f"step {step}: loss {loss}: skipped (--skip-nonfinite)", file=sys.stderr,
                      flush=True)
            return
        kept = self.checkpoints.latest_step()
        where = ("no checkpoint was saved before it" if kept is None else
                 f"its last checkpoint, step {kept}, is finite")
        raise NonFiniteLoss(f"the loss or its gradient is not finite at step {step} (loss "
                            f"{loss}): the run stopped; {where}. Lower the learning rate, or "
                            "skip such steps with --skip-nonfinite (it may be given with "
                            "--resume)")

    def after_step(self, step: int, state: TrainState, metrics: dict, bar) -> dict | None:
        """Logs, evaluates and saves as the config asks; returns the evaluation record, if
        one was made."""
        trainer, config = self.trainer, self.trainer.config
        record = None
        if step % config.log_every == 0:
            logged = {"step": step, **trainer.log_record(step, state, metrics),
                      "img_per_s": self.speed.mark()}
            bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['img_per_s'] or 0:.0f}")
            self.log.write(logged)
        if step == trainer.total_steps or trainer.evaluates_at(step):
            record = trainer.eval_record(step, state)
            self.log.write(record)
        if record or step % config.checkpoint_every == 0 or self.interrupt.requested:
            self.save(step, state)
            self.speed.mark(report=False)
        return record

    def run(self, state: TrainState) -> tuple[str, TrainState, dict[str, Any]]:
        """Steps from the state's to the end or an interrupt (after a save). Returns the
        status, the state and the last evaluation record ({"step"} if none at the last step)."""
        trainer, config = self.trainer, self.trainer.config
        spe, total = trainer.steps_per_epoch, trainer.total_steps
        step = int(parallel.to_host(state.step))
        record: dict[str, Any] = {"step": step}
        with progress_bar(total, step, config.progress) as bar:
            while step < total and not self.interrupt.requested:
                epoch = step // spe
                for images, labels in trainer.epoch_batches(epoch, step - epoch * spe):
                    state, metrics = trainer.train_step(state, images, labels)
                    step += 1
                    self.check_finite(step, metrics)
                    bar.update(1)
                    self.speed.add(images.shape[0])
                    if not self.speed.started:  # the first window holds the compilation
                        jax.block_until_ready(metrics)
                        self.speed.mark(report=False)
                    record = self.after_step(step, state, metrics, bar) or {"step": step}
                    if step == total or self.interrupt.requested:
                        break
                    if self.step_delay:
                        time.sleep(self.step_delay)
        status = "interrupted" if self.interrupt.requested and step < total else "completed"
        return status, state, record


def fit(trainer: Trainer, resume: bool = False, *, step_delay: float = 0.0) -> TrainResult:
    """Trains as `trainer.config` says; see the module docstring.

    Args:
      trainer: the config's trainer (built first: it refuses a bad config before anything is
        written).
      resume: continue from the latest checkpoint in `config.out` (a fresh start if there is
        none); without it, an out dir holding checkpoints is refused.
      step_delay: seconds to sleep after each step (slows a run down, for tests of
        interruption).

    Raises:
      ValueError: an unwritable out dir; (a `RunDirBusy`) another training holds it; (a
        `CheckpointError`) checkpoints in the way, incompatible, none restores, or a save
        failed (a full disk); (a `NonFiniteLoss`) a step not finite without `skip_nonfinite`.
    """
    started = time.perf_counter()
    config = trainer.config
    out = prepare_run_dir(config.out)
    with RunLock(out), Checkpoints(out / "checkpoints", config.keep_checkpoints) as checkpoints:
        start = checkpoints.resume_or_start(config.to_dict(), resume, config.RUNTIME)
        if start is None:
            state = trainer.init_state()
        else:  # the newest checkpoint that restores; the refused newer ones are set aside
            state, meta = checkpoints.restore(trainer.abstract_state())
            start = meta["step"]
            checkpoints.set_aside_after(start)
        write_run_config(out, config)
        log = MetricsLog(out / "metrics.jsonl")
        log.truncate(start or 0)  # before opening it: truncating replaces the file
        with log, Interrupt() as interrupt:
            loop = _Loop(trainer, checkpoints, log, interrupt, step_delay)
            status, state, record = loop.run(state)
    step = record["step"]
    if status == "completed" and len(record) == 1:  # resumed after the end
        record = trainer.eval_record(step, state)
    rates = loop.speed.rates
    return TrainResult(status, {**record, "wall_s": time.perf_counter() - started,
                                "img_per_s": float(np.median(rates)) if rates else None})


def open_run(run_dir: str | Path, data_dir: str | None = None, step: int | None = None
             ) -> tuple[Trainer, TrainState, dict[str, Any]]:
    """The trainer of a run (its config.json's kind and config; the data from `data_dir`
    when given), the state and the metadata of its checkpoint `step` (default the latest)."""
    cls = trainer_class(run_kind(run_dir))
    config = cls.CONFIG.load(run_dir)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    trainer = cls(config)
    with Checkpoints(Path(run_dir) / "checkpoints", read_only=True) as checkpoints:
        state, meta = checkpoints.restore(trainer.abstract_state(), step)
    return trainer, state, meta


def evaluate_run(run_dir: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """The test metrics of the latest checkpoint of a run, with its "trainer" kind, "step",
    "epoch" (steps / steps an epoch) and the trainer's `eval_details`."""
    trainer, state, meta = open_run(run_dir, data_dir)
    return {"trainer": trainer.KIND, "step": meta["step"],
            "epoch": meta["step"] / trainer.steps_per_epoch, **trainer.eval_details(),
            **trainer.evaluate(state)}
