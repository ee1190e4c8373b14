"""Trainers: the supervised trainer (here), the REINFORCE trainer of RAM
(`flax_attention.train.reinforce`), and what every trainer shares (checkpoints, the metrics log,
interruption, progress, data parallelism)."""

from flax_attention.train.checkpoint import (
    CheckpointError,
    Checkpoints,
    Interrupt,
    MetricsLog,
    Throughput,
    prepare_run_dir,
    progress_bar,
    state_digest,
    write_json,
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
from flax_attention.train.supervised import (
    TrainConfig,
    TrainResult,
    evaluate_run,
    load_config,
    train,
)

__all__ = [
    "CheckpointError", "Checkpoints", "Interrupt", "MetricsLog", "Throughput", "TrainConfig",
    "TrainResult", "batch_sharding", "check_batch_size", "data_mesh", "data_parallel",
    "evaluate_run", "initialize_distributed", "load_config", "prepare_run_dir", "progress_bar",
    "replicated", "replicated_init", "state_digest", "to_host", "train", "write_json",
]
