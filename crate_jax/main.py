r"""Trains a model: `python -m crate_jax.main --config=CONFIG[:ARG] --workdir=DIR [overrides]`.

    python -m crate_jax.main --config=configs/demo.py --workdir=/tmp/crate_demo
    python -m crate_jax.main --config=configs/imagenet.py:variant=S/16 --workdir=$WORKDIR \
        --config.input.data_dir=$TFDS_DATA_DIR --config.total_epochs=10

Any config field can be overridden with `--config.<field>=<value>`; unknown fields and
values of the wrong type are errors. Rerunning a command resumes from the workdir's
latest checkpoint. Multi-process jobs: see `crate_jax.distributed` (flags or detection).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from crate_jax import distributed  # Its flags; it imports JAX only when it initialises.
from crate_jax import preemption

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, optionally with an argument: configs/imagenet.py:variant=B/16.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
_REUSE_HOST_MEMORY = flags.DEFINE_bool(
  "reuse_host_memory",
  True,
  "Set glibc malloc so that XLA:CPU steps reuse their buffers instead of page-faulting "
  "them in every step (crate_jax.xla_cpu.reuse_freed_memory).",
)
_CPU_DEVICES = flags.DEFINE_integer(
  "cpu_devices",
  0,
  "On a CPU host: run XLA:CPU as this many single-threaded devices (one per core) and "
  "train data-parallel over them (crate_jax.xla_cpu.use_cpu_devices; measurements in "
  "benchmarks/README.md). 0: XLA's default, one device.",
  lower_bound=0,
)
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, reporting a missing config file or an unknown `--config.<field>`
  in one line."""
  spec = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), None)
  path = spec.partition(":")[0] if spec else None
  if path and not os.path.isfile(path):
    sys.exit(f"FATAL Flags parsing error: --config={spec}: no such config file {path!r}.")
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    from crate_jax import config_utils  # pylint: disable=g-import-not-at-top

    unknown = config_utils.unknown_overrides(argv)
    if not unknown:
      raise  # An error inside the config file: its traceback says where.
    sys.exit(f"FATAL Flags parsing error: {unknown[0]}")


class _QuietCheckpointLibrary(std_logging.Filter):
  """Hides orbax's INFO lines (dozens per save) so that the training progress stays visible."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  # Imported here, after `preemption.listen()`: a SIGTERM while they load is a clean stop.
  from crate_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from crate_jax import config_utils  # pylint: disable=g-import-not-at-top
  from crate_jax import train  # pylint: disable=g-import-not-at-top
  from crate_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  from crate_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  logging.get_absl_handler().addFilter(_QuietCheckpointLibrary())
  try:
    config_utils.validate(_CONFIG.value)  # Fails fast, before JAX or the data start.
    if _REUSE_HOST_MEMORY.value:  # Before JAX starts its threads.
      xla_cpu.reuse_freed_memory()
    if _CPU_DEVICES.value:  # Before JAX initialises its backends.
      xla_cpu.use_cpu_devices(_CPU_DEVICES.value)
    distributed.initialize_from_flags()
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_utils.ConfigError as e:
    sys.exit(f"FATAL Config error: {e}")
  except (
    pipeline.DatasetNotPreparedError,
    checkpointing.CheckpointError,
    train.TrainingDivergedError,
  ) as e:
    sys.exit(f"FATAL {type(e).__name__}: {e}")


if __name__ == "__main__":
  # First: from here on a SIGTERM is a clean preemption (exit 0). Multi-process jobs hand the
  # signal to JAX's preemption service when jax.distributed initialises.
  preemption.listen()
  app.run(main, flags_parser=_parse_flags)
