"""Checkpoints of the train state and the input pipeline, and preemption handling.

A checkpoint `workdir/checkpoints/<step>/` holds two orbax items: `state` (params,
optimizer state, step and RNG, saved asynchronously from the devices) and `data` (the
grain iterator's position, one small JSON file per process). Restoring both continues a
run exactly where it stopped: a resumed run ends with the parameters of an uninterrupted
one (bitwise on CPU).

Every process calls every method here: orbax coordinates the processes, writes each
array shard from the process that holds it and the metadata from process 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import grain.checkpoint
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

UNREADABLE_DIR = "unreadable_checkpoints"


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be read."""


class Checkpointer:
  """Saves and restores `(train state, data iterator)` under `directory`.

  Keeps the `max_to_keep` latest checkpoints and, with `keep_period`, also every step
  that is a multiple of it. A checkpoint that cannot be read (empty, truncated, ...) is
  skipped in favour of the previous readable one, and moved to a sibling
  `unreadable_checkpoints/` directory for inspection: never deleted.
  """

  def __init__(
    self,
    directory: epath.PathLike,
    *,
    max_to_keep: int,
    keep_period: int = 0,
    async_save: bool = True,
  ):
    self.directory = epath.Path(directory)
    policies = [checkpoint_managers.LatestN(max_to_keep)]
    if keep_period:
      policies.append(checkpoint_managers.EveryNSteps(keep_period))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )  # Saves cut short (crash, kill -9) leave tmp dirs.
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
    """Starts saving; returns once the arrays are copied off the devices."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> Any | None:
    """Restores the latest readable checkpoint into the shapes and shardings given.

    Args:
      abstract_state: `jax.ShapeDtypeStruct` tree (with shardings) of the state.
      data_iterator: a grain iterator whose position is restored in place.

    Returns:
      The restored state, or None when there is no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none is readable; typically the config
        changed (another model or optimizer) since they were written.
    """
    unreadable: list[tuple[int, Exception]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except  # Any failure: try the previous.
        logging.warning(
          "Checkpoint %s is unreadable (%s: %s); trying the previous one.",
          self.directory / str(step),
          type(e).__name__,
          e,
        )
        unreadable.append((step, e))
        continue
      if unreadable:
        self._move_aside([s for s, _ in unreadable])
      logging.info("Restored checkpoint %s.", self.directory / str(step))
      return restored["state"]
    if unreadable:
      step, error = unreadable[0]
      raise CheckpointError(
        f"None of the checkpoints {[s for s, _ in unreadable]} in {self.directory} can be "
        f"read into the current config's state; the latest failed with {type(error).__name__}: "
        f"{error}. If the config changed, use a new workdir."
      ) from error
    return None

  def _move_aside(self, steps: list[int]) -> None:
    """Moves unreadable step directories out of the manager's sight, keeping them."""
    if jax.process_index() == 0:
      target = self.directory.parent / UNREADABLE_DIR
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        destination = target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(destination)
        logging.warning("Moved unreadable checkpoint %d to %s.", step, destination)
    multihost_utils.sync_global_devices("crate_jax_move_aside_unreadable_checkpoints")
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until the pending asynchronous save, if any, is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


class PreemptionWatcher:
  """Tells the training loop when to save and stop because the job is being preempted.

  In a single process, SIGTERM (what schedulers send before killing a job) sets a flag
  that the loop checks after every step. With several processes, JAX's preemption
  service (through orbax) decides the step at which all processes stop together, so
  that they all take part in the final save.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._signalled = threading.Event()
    self._previous_handler = None

  def __enter__(self) -> PreemptionWatcher:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning(
      "Received SIGTERM (pid %d): saving a checkpoint and stopping after this step.", os.getpid()
    )
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process must call it at every step."""
    return self._signalled.is_set() or self._manager.reached_preemption(step)
