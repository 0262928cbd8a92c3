"""The TensorFlow-free metric writers and progress reports, read back from event files."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from crate_jax import writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _read(logdir) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
    str(logdir), size_guidance={event_accumulator.TENSORS: 0}
  )  # 0: keep all.
  acc.Reload()
  return acc


def _png(tensor_event, index):
  return np.asarray(Image.open(io.BytesIO(tensor_event.tensor_proto.string_val[2 + index])))


def test_writers_and_progress_import_and_write_without_tensorflow(tmp_path):
  script = textwrap.dedent("""
      import sys
      from absl import logging
      from clu import metrics
      from crate_jax import periodic, writers
      assert "tensorflow" not in sys.modules
      logging.use_absl_handler()
      logging.set_verbosity(logging.INFO)
      writer = writers.create_default_writer(sys.argv[1])  # Asynchronous.
      writer.write_scalars(3, {"loss": metrics.Average.from_model_output(
          __import__("numpy").array([1.0, 2.0])).compute()})
      report = periodic.ReportProgress(num_train_steps=10, writer=writer, every_steps=5)
      for step in range(1, 11):
        report(step)
      writer.close()
      assert "tensorflow" not in sys.modules
  """)
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "JAX_PLATFORMS": "cpu",
  }
  result = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "10.0% (1/10)" not in result.stderr and "50.0% (5/10)" in result.stderr
  acc = _read(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 1.5)]
  assert [e.step for e in acc.Scalars("steps_per_sec")] == [5, 10]


def test_writer_round_trip(tmp_path):
  writer = writers.create_default_writer(tmp_path)
  writer.write_scalars(1, {"train/loss": 2.5, "train/lr": np.float32(0.125)})
  writer.write_scalars(2, {"train/loss": np.array(1.25)})
  rgb = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
  gray = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4, 1)
  writer.write_images(4, {"samples": rgb, "gray": gray})
  writer.write_texts(5, {"notes": "**CRATE**"})
  writer.write_histograms(6, {"weights": np.arange(100.0)}, num_buckets={"weights": 4})
  writer.write_hparams(
    {
      "optim": {"lr": 1e-3, "name": "lion"},
      "depth": 12,
      "pool": None,
      "patch": (16, 16),
      "fast": True,
    }
  )
  writer.write_summaries(7, {"raw": np.arange(6).reshape(2, 3)})
  writer.write_videos(8, {"video": np.zeros((2, 3, 4, 4, 3))})  # Skipped with a warning.
  writer.close()

  acc = _read(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 1.25)]
  assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [(1, 0.125)]

  (samples,), (grays,) = acc.Tensors("samples"), acc.Tensors("gray")
  assert samples.step == 4 and samples.tensor_proto.string_val[:2] == [b"7", b"5"]
  np.testing.assert_array_equal([_png(samples, 0), _png(samples, 1)], rgb)
  np.testing.assert_array_equal(_png(grays, 0), np.round(gray[..., 0] * 255))
  assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "images"

  assert acc.Tensors("notes")[0].tensor_proto.string_val == [b"**CRATE**"]
  assert acc.SummaryMetadata("notes").plugin_data.plugin_name == "text"

  (histogram,) = acc.Tensors("weights")
  buckets = np.frombuffer(histogram.tensor_proto.tensor_content, np.float64).reshape(4, 3)
  np.testing.assert_array_equal(buckets[:, 2], [25, 25, 25, 25])
  assert (histogram.step, buckets[0, 0], buckets[-1, 1]) == (6, 0.0, 99.0)

  info = hparams_metadata.parse_session_start_info_plugin_data(
    acc.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
  )
  hparams = {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}
  assert hparams == {
    "optim.lr": 1e-3,
    "optim.name": "lion",
    "depth": 12,
    "pool": "",
    "patch.0": 16,
    "patch.1": 16,
    "fast": True,
  }

  (raw,) = acc.Tensors("raw")
  assert [d.size for d in raw.tensor_proto.tensor_shape.dim] == [2, 3] and raw.step == 7
  assert "video" not in acc.Tags()["tensors"]


def test_every_writer_implements_the_interface():
  for cls in (writers.TensorBoardWriter, writers.LoggingWriter, writers.MultiWriter):
    assert issubclass(cls, writers.MetricWriter) and not cls.__abstractmethods__


def test_asynchronous_writes_surface_their_errors_at_flush(tmp_path):
  writer = writers.create_default_writer(tmp_path)
  writer.write_images(0, {"x": np.zeros((4, 4, 2), np.uint8)})  # Invalid: 2 channels.
  with pytest.raises(ValueError, match="C in"):
    writer.flush()


def test_just_logging_writes_no_event_files(tmp_path):
  writer = writers.create_default_writer(tmp_path, just_logging=True, asynchronous=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert not list(tmp_path.iterdir())


def test_images_must_be_uint8_or_float(tmp_path):
  writer = writers.TensorBoardWriter(tmp_path)
  with pytest.raises(ValueError, match="uint8 or floating"):
    writer.write_images(0, {"x": np.zeros((4, 4, 3), np.int32)})
  with pytest.raises(ValueError, match="C in"):
    writer.write_images(0, {"x": np.zeros((4, 4, 2), np.uint8)})
  writer.close()
