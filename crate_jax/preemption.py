"""Preemption: SIGTERM (or JAX's preemption notice) means "save and stop", at any moment.

In a single process, `listen()` turns SIGTERM into a request that the training loop
honours at its next step boundary, from the moment it is called to the end of the process:
during start-up (nothing new to save: the run stops before training), between steps (it
saves and stops), after the final checkpoint (there is nothing left to do: it exits
normally). `crate_jax.main` calls it first thing; this module imports nothing heavy at
import time so that it can. With several processes, JAX's preemption service (through
orbax) receives the SIGTERM and picks the step at which all processes stop together, so
that they all take part in the final save; a per-process flag could stop them at
different steps, so it is not consulted there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

_requested = threading.Event()


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  # print, not logging: a handler may run while the logging lock is held.
  print(
    f"Received SIGTERM (pid {os.getpid()}): stopping at the next step boundary, saving "
    "if there is anything new to save.",
    file=sys.stderr,
    flush=True,
  )
  _requested.set()


def listen() -> Any:
  """Makes SIGTERM a preemption request (main thread only); returns the previous handler."""
  if threading.current_thread() is not threading.main_thread():
    return None
  return signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
  """Whether a SIGTERM has been received since `listen()`."""
  return _requested.is_set()


class Watcher:
  """Tells the training loop when to save and stop; listens for SIGTERM while active.

  `reached(step)` must be called by every process at every step (with several processes
  it takes part in JAX's agreement on the stopping step).
  """

  def __init__(self, manager: Any = None):
    self._manager = manager  # An orbax CheckpointManager, once there is one.
    self._previous_handler = None
    self._single_process = True

  def attach(self, manager: Any) -> None:
    self._manager = manager

  def __enter__(self) -> Watcher:
    import jax  # pylint: disable=g-import-not-at-top  # Here: the module must import fast.

    self._single_process = jax.process_count() == 1
    if self._single_process:  # Several processes: JAX's preemption service has the signal.
      self._previous_handler = listen()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (saving it, if it is new)."""
    if self._single_process and requested():
      return True
    return self._manager is not None and bool(self._manager.reached_preemption(step))
