"""Metric writers: TensorBoard event files without TensorFlow, log lines, and both at once.

`MetricWriter` is clu's writer interface (`clu.metric_writers.MetricWriter`), restated here:
clu's `metric_writers` package imports TensorFlow when it is imported (its TensorBoard
writer is TensorFlow's), and so does `clu.periodic_actions`, so crate_jax uses neither.
`TensorBoardWriter` writes what clu's TensorFlow `SummaryWriter` writes (scalars, images
as PNG, texts, histograms, hyperparameters, raw tensor summaries) with TensorBoard's own
event-file writer and protocol buffers; `LoggingWriter` writes log lines;
`create_default_writer` combines them, optionally on a background thread.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
import concurrent.futures
import io
import os
import time
from typing import Any

from absl import logging
from clu.internal import utils as clu_utils  # Imports neither TensorFlow nor clu's writers.
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import event_file_writer
from tensorboard.util import tensor_util

Array = Any  # np.ndarray or jax.Array.
Scalar = int | float | np.number | np.ndarray


class MetricWriter(abc.ABC):
  """clu's `MetricWriter` interface: values keyed by name, written at a step."""

  @abc.abstractmethod
  def write_summaries(
    self, step: int, values: Mapping[str, Array], metadata: Mapping[str, Any] | None = None
  ) -> None:
    """Raw tensor summaries; `metadata[key]` is a `SummaryMetadata` proto or its bytes."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Scalars."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Array]) -> None:
    """Images `[N, H, W, C]` or `[H, W, C]`, C in {1, 3, 4}: uint8, or floats in [0, 1]."""

  @abc.abstractmethod
  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts (Markdown)."""

  @abc.abstractmethod
  def write_histograms(
    self, step: int, arrays: Mapping[str, Array], num_buckets: Mapping[str, int] | None = None
  ) -> None:
    """Histograms of the flattened arrays."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Hyperparameters (nested mappings are flattened to dotted names)."""

  def write_videos(self, step: int, videos: Mapping[str, Array]) -> None:
    del step, videos
    logging.log_first_n(logging.WARNING, "Videos are not written; skipped.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int) -> None:
    del step, audios, sample_rate
    logging.log_first_n(logging.WARNING, "Audios are not written; skipped.", 1)

  def flush(self) -> None:  # noqa: B027  # Optional: writers that buffer override it.
    """Writes out what is buffered."""

  def close(self) -> None:
    """Flushes and releases the writer."""
    self.flush()


class TensorBoardWriter(MetricWriter):
  """Writes TensorBoard event files to `logdir`, as clu's TensorFlow `SummaryWriter` does.

  Scalars are written as `simple_value`s; images, texts, histograms and hyperparameters in
  the tensor formats of TensorBoard's plugins, tagged by their keys.
  """

  def __init__(self, logdir: str | os.PathLike[str]):
    self._writer = event_file_writer.EventFileWriter(os.fspath(logdir))

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_summaries(
    self, step: int, values: Mapping[str, Array], metadata: Mapping[str, Any] | None = None
  ) -> None:
    """Writes tensors as they are; `metadata[key]` is a `SummaryMetadata` proto or its bytes."""
    summary = summary_pb2.Summary()
    for key, value in values.items():
      md = (metadata or {}).get(key)
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      summary.value.add(
        tag=key, metadata=md, tensor=tensor_util.make_tensor_proto(np.asarray(value))
      )
    self._write(step, summary)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(tag=key, simple_value=float(np.asarray(value).item()))
        for key, value in scalars.items()
      ]
    )
    self._write(step, summary)

  def write_images(self, step: int, images: Mapping[str, Array]) -> None:
    """Images `[N, H, W, C]` or `[H, W, C]`, C in {1, 3, 4}: uint8, or floats in [0, 1].

    Each key holds all N images PNG-encoded in one summary (TensorBoard's image plugin
    format: the tensor `[width, height, png_0, ..., png_{N-1}]`).
    """
    summary = summary_pb2.Summary()
    for key, value in images.items():
      batch = _to_uint8(np.asarray(value))
      if batch.ndim == 3:
        batch = batch[None]
      if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(
          f"Image {key!r} has shape {batch.shape}; expected [N,] H, W, C with C in (1, 3, 4)."
        )
      height, width = batch.shape[1:3]
      content = [str(width).encode(), str(height).encode()] + [_encode_png(x) for x in batch]
      summary.value.add(
        tag=key,
        tensor=tensor_util.make_tensor_proto(np.array(content, dtype=object)),
        metadata=image_metadata.create_summary_metadata(display_name=None, description=None),
      )
    self._write(step, summary)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts (Markdown) shown by TensorBoard's text dashboard."""
    summary = summary_pb2.Summary()
    for key, value in texts.items():
      summary.MergeFrom(text_summary.text_pb(key, value))
    self._write(step, summary)

  def write_histograms(
    self, step: int, arrays: Mapping[str, Array], num_buckets: Mapping[str, int] | None = None
  ) -> None:
    """Histograms of the flattened arrays: equal-width buckets (30 unless `num_buckets[key]`)."""
    summary = summary_pb2.Summary()
    for key, value in arrays.items():
      buckets = (num_buckets or {}).get(key) or None
      summary.MergeFrom(histogram_summary.histogram_pb(key, np.asarray(value), buckets=buckets))
    self._write(step, summary)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Hyperparameters for TensorBoard's HParams dashboard, at step 0.

    Nested mappings and sequences are flattened to dotted names as clu does (`None` becomes
    ""); values other than bool, number or string are written as their `str`.
    """
    flat = {
      key: value if isinstance(value, (bool, int, float, str, np.generic)) else str(value)
      for key, value in clu_utils.flatten_dict(hparams)
    }
    self._write(0, hparams_summary.hparams_pb(flat))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """uint8 as it is; floats are clipped to [0, 1] and mapped to 0..255 (as TensorFlow does)."""
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
  raise ValueError(f"Images must be uint8 or floating point in [0, 1], got {images.dtype}.")


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


class LoggingWriter(MetricWriter):
  """One log line per call: `[step] name=value, ...` for scalars, shapes for arrays."""

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata  # Raw summaries (e.g. TensorBoard layouts) tell a reader nothing.

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    values = ", ".join(f"{k}={float(np.asarray(v)):.6g}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, values)

  def write_images(self, step: int, images: Mapping[str, Array]) -> None:
    logging.info(
      "[%d] images %s", step, ", ".join(f"{k} {np.shape(v)}" for k, v in sorted(images.items()))
    )

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for key, value in texts.items():
      logging.info("[%d] %s: %s", step, key, value)

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del num_buckets
    logging.info(
      "[%d] histograms %s", step, ", ".join(f"{k} {np.shape(v)}" for k, v in sorted(arrays.items()))
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("hparams: %s", dict(clu_utils.flatten_dict(hparams)))


class MultiWriter(MetricWriter):
  """Writes to several writers; with `asynchronous`, on one background thread (in order).

  Values are copied to the host before they are queued, so the caller may reuse or donate
  its device arrays. `flush` waits for the queue; exceptions of a write surface there.
  """

  def __init__(self, writers: list[MetricWriter], *, asynchronous: bool = False):
    self._writers = writers
    self._executor = concurrent.futures.ThreadPoolExecutor(1) if asynchronous else None
    self._pending: list[concurrent.futures.Future] = []

  def _call(self, method: str, *args, **kwargs) -> None:
    args = tuple(_to_host(a) for a in args)

    def write():
      for writer in self._writers:
        getattr(writer, method)(*args, **kwargs)

    if self._executor is None:
      write()
    else:
      self._pending = [f for f in self._pending if not f.done() or f.exception()]
      self._pending.append(self._executor.submit(write))

  def write_summaries(self, step, values, metadata=None) -> None:
    self._call("write_summaries", step, values, metadata)

  def write_scalars(self, step, scalars) -> None:
    self._call("write_scalars", step, scalars)

  def write_images(self, step, images) -> None:
    self._call("write_images", step, images)

  def write_texts(self, step, texts) -> None:
    self._call("write_texts", step, texts)

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    self._call("write_histograms", step, arrays, num_buckets)

  def write_hparams(self, hparams) -> None:
    self._call("write_hparams", hparams)

  def flush(self) -> None:
    pending, self._pending = self._pending, []
    for future in pending:
      future.result()
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    self.flush()
    for writer in self._writers:
      writer.close()
    if self._executor is not None:
      self._executor.shutdown()


def _to_host(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: np.asarray(v) if hasattr(v, "__array__") else v for k, v in value.items()}
  return value


def create_default_writer(
  logdir: str | os.PathLike[str] | None, *, just_logging: bool = False, asynchronous: bool = True
) -> MetricWriter:
  """Logs every value and, unless `just_logging` or `logdir` is None, writes TensorBoard files.

  Pass `just_logging=jax.process_index() > 0` so that only the first process writes event
  files. With `asynchronous`, writes happen on a background thread; call `flush()` or
  `close()` before reading the files.
  """
  writers: list[MetricWriter] = [LoggingWriter()]
  if logdir is not None and not just_logging:
    writers.append(TensorBoardWriter(logdir))
  return MultiWriter(writers, asynchronous=asynchronous)
