"""TensorBoard metric writing without TensorFlow, and a TensorFlow-free `clu.metric_writers`.

`TensorBoardWriter` implements clu's `MetricWriter` interface on TensorBoard's own event
file writer and protocol buffers, so it needs neither TensorFlow nor PyTorch. It writes what
clu's TensorFlow `SummaryWriter` writes: scalars, images (PNG), texts, histograms,
hyperparameters and raw tensor summaries (videos and audios are skipped with a warning).

clu's `metric_writers` package cannot be imported without TensorFlow: its `__init__`
imports `summary_writer`, which imports TensorFlow. Importing this module first registers
`TensorBoardWriter` as `clu.metric_writers.summary_writer.SummaryWriter` when TensorFlow
is not installed, so that `clu.metric_writers`, `clu.periodic_actions` and clu's own
`create_default_writer` import and write real event files. With TensorFlow installed, clu
is left as it is. Import this module before anything imports `clu.metric_writers` (or
`clu.periodic_actions`, which imports it), as `crate_jax.train` does.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import time
import types
from typing import Any, Mapping, Optional, Union

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

Array = Any  # np.ndarray or jax.Array, as in `clu.metric_writers.interface`.
Scalar = Union[int, float, np.number, np.ndarray]

_CLU_SUMMARY_WRITER = "clu.metric_writers.summary_writer"


class TensorBoardWriter:
  """Writes TensorBoard event files to `logdir`, as clu's TensorFlow `SummaryWriter` does.

  Implements `clu.metric_writers.MetricWriter` (registered as a virtual subclass: the
  class must exist before `clu.metric_writers` can be imported, see the module doc).
  Scalars are written as `simple_value`s; images, texts, histograms and hyperparameters in
  the tensor formats of TensorBoard's plugins, tagged by their keys.
  """

  def __init__(self, logdir: str | os.PathLike[str]):
    self._writer = event_file_writer.EventFileWriter(os.fspath(logdir))

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_summaries(self, step: int, values: Mapping[str, Array],
                      metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Writes tensors as they are; `metadata[key]` is a `SummaryMetadata` proto or its bytes."""
    summary = summary_pb2.Summary()
    for key, value in values.items():
      md = (metadata or {}).get(key)
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      summary.value.add(tag=key, metadata=md,
                        tensor=tensor_util.make_tensor_proto(np.asarray(value)))
    self._write(step, summary)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=key, simple_value=float(np.asarray(value).item()))
        for key, value in scalars.items()])
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
        raise ValueError(f"Image {key!r} has shape {batch.shape}; expected [N,] H, W, C with "
                         f"C in (1, 3, 4).")
      height, width = batch.shape[1:3]
      content = [str(width).encode(), str(height).encode()] + [_encode_png(x) for x in batch]
      summary.value.add(
          tag=key, tensor=tensor_util.make_tensor_proto(np.array(content, dtype=object)),
          metadata=image_metadata.create_summary_metadata(display_name=None, description=None))
    self._write(step, summary)

  def write_videos(self, step: int, videos: Mapping[str, Array]) -> None:
    del step, videos
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write videos; skipped.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int) -> None:
    del step, audios, sample_rate
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write audios; skipped.", 1)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts (Markdown) shown by TensorBoard's text dashboard."""
    summary = summary_pb2.Summary()
    for key, value in texts.items():
      summary.MergeFrom(text_summary.text_pb(key, value))
    self._write(step, summary)

  def write_histograms(self, step: int, arrays: Mapping[str, Array],
                       num_buckets: Optional[Mapping[str, int]] = None) -> None:
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
    flat = {key: value if isinstance(value, (bool, int, float, str, np.generic)) else str(value)
            for key, value in clu_utils.flatten_dict(hparams)}
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


def _register_as_clu_summary_writer() -> None:
  """Makes `TensorBoardWriter` clu's `SummaryWriter` when TensorFlow is not installed.

  `clu.metric_writers.__init__` imports `interface` and `async_writer` before it imports
  `summary_writer`, whose module is found already in `sys.modules`.
  """
  if importlib.util.find_spec("tensorflow") is not None or _CLU_SUMMARY_WRITER in sys.modules:
    return
  module = types.ModuleType(_CLU_SUMMARY_WRITER, "TensorFlow-free MetricWriter (crate_jax).")
  module.SummaryWriter = TensorBoardWriter
  sys.modules[_CLU_SUMMARY_WRITER] = module


_register_as_clu_summary_writer()

# Imported only now: without TensorFlow, `clu.metric_writers` needs the registration above.
from clu import metric_writers as clu_metric_writers  # pylint: disable=g-import-not-at-top

clu_metric_writers.MetricWriter.register(TensorBoardWriter)


class _TextLogWriter(clu_metric_writers.LoggingWriter):
  """clu's LoggingWriter, minus raw summaries (TensorBoard layouts): a log line of their
  tensor shapes tells a reader nothing."""

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata


def create_default_writer(logdir: str | os.PathLike[str] | None, *, just_logging: bool = False,
                          asynchronous: bool = True) -> clu_metric_writers.MetricWriter:
  """Logs every value and, unless `just_logging` or `logdir` is None, writes TensorBoard files.

  Pass `just_logging=jax.process_index() > 0` so that only the first process writes event
  files. With `asynchronous`, writes happen on a background thread (`AsyncMultiWriter`);
  call `flush()` or `close()` before reading the files.
  """
  writers = [_TextLogWriter()]
  if logdir is not None and not just_logging:
    writers.append(TensorBoardWriter(logdir))
  if asynchronous:
    return clu_metric_writers.AsyncMultiWriter(writers)
  return clu_metric_writers.MultiWriter(writers)
