"""Trainers: the supervised trainer (`train.supervised`), the REINFORCE trainer of RAM
(`train.reinforce`) and the detection and segmentation trainers (`train.detection`,
`train.segmentation`, on `train.dense`), all subclasses of one skeleton
(`train.trainer.Trainer`, looped by `train.loop.fit`), and what they share: checkpoints
(`train.checkpoint`), the run directory and its metrics log (`train.run_dir`), interruption
(`train.interrupt`), progress (`train.progress`), data parallelism (`train.parallel`) and the
configs of the command's options (`train.options`)."""

from flax_attention.train.checkpoint import CheckpointError, Checkpoints, state_digest
from flax_attention.train.interrupt import Interrupt
from flax_attention.train.loop import (
    NonFiniteLoss,
    TrainResult,
    evaluate_run,
    fit,
    open_run,
    trainer_class,
)
from flax_attention.train.parallel import (
    batch_sharding,
    check_batch_size,
    data_mesh,
    data_parallel,
    initialize_distributed,
    replicated,
    replicated_init,
    to_host,
)
from flax_attention.train.progress import Throughput, progress_bar
from flax_attention.train.run_dir import (
    KINDS,
    MetricsLog,
    RunDirBusy,
    RunLock,
    prepare_run_dir,
    read_run_config,
    run_kind,
    write_json,
    write_run_config,
)
from flax_attention.train.supervised import TrainConfig, load_config, train
from flax_attention.train.trainer import RunConfig, Trainer, TrainState

__all__ = [
    "KINDS", "CheckpointError", "Checkpoints", "Interrupt", "MetricsLog", "NonFiniteLoss",
    "RunConfig", "RunDirBusy", "RunLock", "Throughput", "TrainConfig", "TrainResult",
    "TrainState", "Trainer", "batch_sharding",
    "check_batch_size", "data_mesh", "data_parallel", "evaluate_run", "fit",
    "initialize_distributed", "load_config", "open_run", "prepare_run_dir", "progress_bar",
    "read_run_config", "replicated", "replicated_init", "run_kind", "state_digest", "to_host",
    "train", "trainer_class", "write_json", "write_run_config",
]
