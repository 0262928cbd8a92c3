"""Periodic actions of the training loop: progress reports and profiles (clu's, TF-free).

clu's `periodic_actions` imports TensorFlow through `clu.metric_writers`; these are the
two the loop uses, with the same behaviour: call the action after every step, and it
acts every `every_steps` steps (and at the last one).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import time

from absl import logging
from etils import epath
import jax

from crate_jax import writers


def _format_secs(secs: float) -> str:
  minutes, secs = divmod(int(round(secs)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ReportProgress:
  """Logs `x steps/s, p% (step/total), ETA` and the share of time spent in `timed` parts.

  Writes the scalar `steps_per_sec` at every report. The rate counts the time between
  reports, timed parts included (they are listed as shares of the elapsed time).
  """

  def __init__(
    self, *, num_train_steps: int, writer: writers.MetricWriter | None, every_steps: int
  ):
    self._num_train_steps = num_train_steps
    self._writer = writer
    self._every_steps = every_steps
    self._previous: tuple[int, float] | None = None  # (step, time) of the last report.
    self._time_per_part: dict[str, float] = {}
    self._start = time.monotonic()

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._previous is None:
      self._previous = (step - 1, self._start)
    if step % self._every_steps and step != self._num_train_steps:
      return
    steps_per_sec = (step - self._previous[0]) / max(now - self._previous[1], 1e-9)
    self._previous = (step, now)
    message = f"{steps_per_sec:.1f} steps/s"
    if self._num_train_steps:
      eta = (self._num_train_steps - step) / steps_per_sec
      message += (
        f", {100 * step / self._num_train_steps:.1f}% ({step}/{self._num_train_steps})"
        f", ETA: {_format_secs(eta)}"
      )
    if self._time_per_part:
      total = now - self._start
      parts = ", ".join(
        f"{100 * t / total:.1f}% {name}" for name, t in sorted(self._time_per_part.items())
      )
      message += f" ({_format_secs(total)}: {parts})"
    logging.info("Progress: %s", message)
    if self._writer is not None:
      self._writer.write_scalars(step, {"steps_per_sec": steps_per_sec})

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Adds the wall time of the block to part `name` (blocks that fetch their results)."""
    start = time.monotonic()
    yield
    self._time_per_part[name] = self._time_per_part.get(name, 0.0) + time.monotonic() - start


class Profile:
  """Records a `num_steps` profiler trace (TensorBoard's profile plugin) into `logdir`.

  The first from `first_step` on, then again after `every_secs` seconds.
  """

  def __init__(self, *, logdir: epath.PathLike, num_steps: int, first_step: int, every_secs: float):
    self._logdir = str(logdir)
    self._num_steps = num_steps
    self._first_step = first_step
    self._every_secs = every_secs
    self._started_at: int | None = None  # Step the running trace started at.
    self._last_time: float | None = None

  def __call__(self, step: int) -> None:
    if self._started_at is not None:
      if step - self._started_at >= self._num_steps:
        jax.profiler.stop_trace()
        logging.info("Wrote a profile of steps %d-%d to %s.", self._started_at, step, self._logdir)
        self._started_at, self._last_time = None, time.monotonic()
      return
    due = (
      step >= self._first_step
      if self._last_time is None
      else time.monotonic() - self._last_time >= self._every_secs
    )
    if due:
      jax.profiler.start_trace(self._logdir)
      self._started_at = step


class Throughput:
  """Images/s, model TFLOP/s and MFU per device, over the steps since the last report.

  `restart(step)` after work that is not training (evaluation, checkpoints) keeps it out.
  """

  def __init__(
    self, *, batch_size: int, flops_per_step: float | None, peak_tflops: float, step: int
  ):
    self._batch_size = batch_size
    self._flops_per_step = flops_per_step
    self._peak_tflops = peak_tflops
    self.restart(step)

  def restart(self, step: int) -> None:
    self._start = (time.perf_counter(), step)

  def __call__(self, step: int) -> dict[str, float]:
    elapsed = time.perf_counter() - self._start[0]
    steps_per_sec = (step - self._start[1]) / max(elapsed, 1e-9)
    self.restart(step)
    devices = jax.device_count()
    scalars = {"perf/images_per_sec_per_device": steps_per_sec * self._batch_size / devices}
    if self._flops_per_step:
      tflops = steps_per_sec * self._flops_per_step / 1e12
      scalars["perf/model_tflops_per_sec_per_device"] = tflops
      if self._peak_tflops:
        scalars["perf/mfu"] = tflops / self._peak_tflops
    return scalars
