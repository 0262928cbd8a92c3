"""Tests of the input pipeline and the embedded crate_shapes dataset."""

import io
import pathlib
import subprocess
import sys
import tarfile

from absl import flags
import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from crate_jax import data
from crate_jax.data import crate_shapes
from crate_jax.data import imagenet21k
from crate_jax.data import pipeline
from crate_jax.data import preprocess

_REPO_ROOT = pathlib.Path(__file__).parents[1]
TINY = crate_shapes.CrateShapesConfig(name="tiny", image_size=32, train_size=300, test_size=75)


@pytest.fixture
def config(data_dir):
  config = data.default_input_config()
  config.dataset = "crate_shapes/tiny"
  config.data_dir = str(data_dir)
  config.global_batch_size = 20
  config.eval_batch_size = 12
  return config


def _stored_examples(data_dir, split, name="crate_shapes/tiny"):
  """All examples of a split as written on disk, read directly with tfds."""
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


def _normalized(images):
  return preprocess.normalize(images, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)


def _image_keys(images):
  return [image.tobytes() for image in images]


def test_builder_is_deterministic(tmp_path, data_dir):
  crate_shapes.build(TINY, tmp_path)
  for split in ("train", "test"):
    name = f"crate_shapes-{split}.array_record-00000-of-00001"
    path = f"crate_shapes/tiny/1.0.0/{name}"
    assert (tmp_path / path).read_bytes() == (data_dir / path).read_bytes()


def test_concurrent_builds_share_one_dataset(tmp_path):
  script = (
    "import sys; from crate_jax.data import crate_shapes; "
    'crate_shapes.build(crate_shapes.CrateShapesConfig(name="t", train_size=40, test_size=10), sys.argv[1])'
  )
  builders = [
    subprocess.Popen(
      [sys.executable, "-c", script, str(tmp_path)],
      cwd=_REPO_ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )
    for _ in range(2)
  ]
  for builder in builders:
    _, stderr = builder.communicate(timeout=120)
    assert builder.returncode == 0, stderr.decode()
  assert len(_stored_examples(tmp_path, "train", name="crate_shapes/t")) == 40


def test_masks_cover_uniformly_coloured_objects(data_dir):
  examples = _stored_examples(data_dir, "train")
  assert {int(e["label"]) for e in examples} == set(range(len(crate_shapes.SHAPE_NAMES)))
  for example in examples:
    image, mask = example["image"].astype(np.float32), example["segmentation"].astype(bool)
    assert 0.05 < mask.mean() < 0.7
    # Away from the anti-aliased edge the object is one colour plus pixel noise,
    shifted = [np.roll(mask, shift, axis) for shift in (-1, 1) for axis in (0, 1)]
    interior = mask & np.logical_and.reduce(shifted)
    assert image[interior].std(axis=0).max() < 12
    # ... and it stands out from the background around it.
    surround = (
      np.logical_or.reduce([np.roll(mask, shift, axis) for shift in (-2, 2) for axis in (0, 1)])
      & ~mask
    )
    assert np.linalg.norm(image[interior].mean(0) - image[surround].mean(0)) > 40


def test_render_depends_only_on_seed():
  labels = np.arange(10)
  first = crate_shapes.render(labels, 32, np.random.default_rng(7))
  again = crate_shapes.render(labels, 32, np.random.default_rng(7))
  other = crate_shapes.render(labels, 32, np.random.default_rng(8))
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


def test_train_batches_follow_the_contract(config):
  config.crop, config.randaugment_layers = "inception", 2
  batch = next(data.make_train_iterator(config, seed=0))
  assert batch["image"].shape == (20, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["labels"].shape == (20, 10) and batch["labels"].dtype == np.float32
  np.testing.assert_array_equal(batch["labels"].max(1), 1)
  np.testing.assert_array_equal(batch["labels"].sum(1), 1)


def test_train_shards_are_disjoint_and_cover_the_split(config, data_dir):
  config.crop, config.flip = "none", False  # Images pass through unchanged.
  config.global_batch_size = 30  # Two hosts: 5 batches of 15 = one epoch of a shard.
  shards = []
  for host in range(2):
    iterator = data.make_train_iterator(config, seed=0, process_index=host, process_count=2)
    shards.append(_image_keys(np.concatenate([next(iterator)["image"] for _ in range(10)])))
  stored = _image_keys(
    _normalized(np.stack([e["image"] for e in _stored_examples(data_dir, "train")]))
  )
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(stored)


def test_iterator_state_restores_the_exact_stream(config):
  config.mixup_alpha = config.cutmix_alpha = 1.0
  iterator = data.make_train_iterator(config, seed=3)
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = data.make_train_iterator(config, seed=3)
  resumed.set_state(state)
  for batch in expected:
    actual = next(resumed)
    np.testing.assert_array_equal(actual["image"], batch["image"])
    np.testing.assert_array_equal(actual["labels"], batch["labels"])


def test_worker_processes_and_orbax_checkpoints_keep_the_stream(config, tmp_path):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags (absl.app.run parses them).
  in_process = data.make_train_iterator(config, seed=5)
  expected = [next(in_process)["image"] for _ in range(4)]
  config.num_workers = 1
  iterator = data.make_train_iterator(config, seed=5)
  np.testing.assert_array_equal(next(iterator)["image"], expected[0])
  np.testing.assert_array_equal(next(iterator)["image"], expected[1])
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  iterator.close()
  resumed = data.make_train_iterator(config, seed=5)
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  np.testing.assert_array_equal(next(resumed)["image"], expected[2])
  np.testing.assert_array_equal(next(resumed)["image"], expected[3])
  resumed.close()


@pytest.mark.parametrize("num_hosts", [1, 3])
def test_eval_sees_every_example_once(config, data_dir, num_hosts):
  stored = _stored_examples(data_dir, "test")  # 75 examples; batches of 12.
  host_batches = [
    list(
      data.make_eval_iterator(
        config, with_segmentation=True, process_index=host, process_count=num_hosts
      )
    )
    for host in range(num_hosts)
  ]
  assert len({len(batches) for batches in host_batches}) == 1  # Hosts stay in step.
  batches = [batch for batches in host_batches for batch in batches]
  batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  assert batch["image"].shape[1:] == (32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["segmentation"].dtype == np.uint8
  assert batch["mask"].sum() == len(stored)
  assert len(batch["mask"]) == 7 * 12  # ceil(75 / 12) global batches, or 3 x 7 x 4.
  real = batch["mask"] == 1
  actual = zip(
    _image_keys(batch["image"][real]),
    batch["label"][real],
    _image_keys(batch["segmentation"][real]),
  )
  expected = zip(
    _image_keys(_normalized(np.stack([e["image"] for e in stored]))),
    [e["label"] for e in stored],
    _image_keys([e["segmentation"] for e in stored]),
  )
  assert sorted(actual) == sorted(expected)


def test_eval_crops_image_and_segmentation_alike(config, data_dir):
  config.image_size, config.eval_resize_ratio = 16, 2.0  # The central 16x16.
  batch = next(data.make_eval_iterator(config, with_segmentation=True))
  for i, example in enumerate(_stored_examples(data_dir, "test")[:12]):
    np.testing.assert_array_equal(batch["image"][i], _normalized(example["image"][8:24, 8:24]))
    np.testing.assert_array_equal(batch["segmentation"][i], example["segmentation"][8:24, 8:24])


def _jpeg(width=400, height=350):
  """An ImageNet-sized JPEG of a colourful pattern."""
  y, x = np.mgrid[:height, :width]
  pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


@pytest.mark.parametrize("crop", ["random_resized", "inception"])
def test_random_crops_have_the_output_size_and_follow_the_seed(crop):
  transform = preprocess.TrainExamplePreprocess(
    image_size=24, crop=crop, crop_min_area=0.08, randaugment_layers=2
  )
  element = {"image": _jpeg(), "label": 3}
  outputs = [transform(element, np.random.default_rng(seed))["image"] for seed in (0, 0, 1)]
  assert outputs[0].shape == (24, 24, 3) and outputs[0].dtype == np.uint8
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert not np.array_equal(outputs[0], outputs[2])
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, upper, right, lower = preprocess.sample_crop_box(400, 350, rng, min_area=0.08, crop=crop)
    assert 0 <= left < right <= 400 and 0 <= upper < lower <= 350
    assert (right - left) * (lower - upper) >= 0.08 * 400 * 350 * 0.99
    assert 3 / 4 * 0.98 <= (right - left) / (lower - upper) <= 4 / 3 * 1.02


def test_randaugment_ops_are_identities_at_magnitude_zero():
  image = Image.open(io.BytesIO(_jpeg(64, 48)))
  image.load()
  rng = np.random.default_rng(0)
  for name, op in preprocess.RANDAUGMENT_OPS.items():
    strongest = op(image, 1.0, rng)
    assert strongest.size == image.size and strongest.mode == "RGB", name
    assert not np.array_equal(np.asarray(strongest), np.asarray(image)), name
    if name not in ("auto_contrast", "equalize", "invert"):  # These have no magnitude.
      np.testing.assert_array_equal(np.asarray(op(image, 0.0, rng)), np.asarray(image), name)


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.4, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_give_soft_labels_matching_the_pixels(mixup_alpha, cutmix_alpha):
  batch_size, num_classes = 6, 8
  labels = np.arange(batch_size, dtype=np.int32) + 2
  # Example i is all value 10 * i, so each pixel tells where it came from.
  images = np.broadcast_to(
    10 * np.arange(batch_size, dtype=np.uint8)[:, None, None, None], (batch_size, 8, 8, 3)
  )
  transform = preprocess.TrainBatchPreprocess(
    num_classes,
    mean=(0, 0, 0),
    std=(1 / 255,) * 3,
    mixup_alpha=mixup_alpha,
    cutmix_alpha=cutmix_alpha,
  )
  for seed in range(10):
    mixed = transform({"image": images, "label": labels}, np.random.default_rng(seed))
    np.testing.assert_allclose(mixed["labels"].sum(1), 1, rtol=1e-6)
    own = mixed["labels"][np.arange(batch_size), labels]
    partner = mixed["labels"][np.arange(batch_size), labels[::-1]]
    np.testing.assert_allclose(own + partner, 1, rtol=1e-6)
    # The mean pixel is the label-weighted mix of the two examples' values.
    expected_mean = own * 10 * np.arange(batch_size) + partner * 10 * np.arange(batch_size)[::-1]
    np.testing.assert_allclose(mixed["image"].mean((1, 2, 3)), expected_mean, rtol=1e-4, atol=1e-3)


def test_imagenet21k_conversion_keeps_bytes_and_synset_labels(tmp_path):
  manual_dir = tmp_path / "winter21_whole"
  manual_dir.mkdir()
  jpegs = {}
  for synset in ("n02084071", "n01440764", "n04398044"):  # Written out of order.
    with tarfile.open(manual_dir / f"{synset}.tar", "w") as synset_tar:
      for i in range(3):
        name, jpeg = f"{synset}_{i}.JPEG", _jpeg(40 + 10 * i, 30)
        info = tarfile.TarInfo(name)
        info.size = len(jpeg)
        synset_tar.addfile(info, io.BytesIO(jpeg))
        jpegs[name] = (synset, jpeg)
  imagenet21k.build(manual_dir, tmp_path / "tfds")
  source = tfds.data_source(
    "imagenet21k",
    split="full",
    data_dir=tmp_path / "tfds",
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  labels = tfds.builder("imagenet21k", data_dir=tmp_path / "tfds").info.features["label"]
  assert labels.names == ["n01440764", "n02084071", "n04398044"]
  assert len(source) == len(jpegs)
  for example in source:
    synset, jpeg = jpegs[example["file_name"].decode()]
    assert example["image"] == jpeg and labels.int2str(example["label"]) == synset
  config = data.default_input_config()
  config.update(
    dataset="imagenet21k",
    data_dir=str(tmp_path / "tfds"),
    eval_split="full",
    image_size=24,
    eval_batch_size=4,
  )
  assert sum(batch["mask"].sum() for batch in data.make_eval_iterator(config)) == 9


def test_missing_datasets_explain_how_to_prepare_them(tmp_path):
  config = data.default_input_config()
  config.data_dir = str(tmp_path)
  config.dataset = "imagenet2012"
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.prepare_dataset(config)
  message = str(error.value)
  for fragment in (
    "'imagenet2012' is not prepared",
    str(tmp_path),
    "ILSVRC2012_img_train.tar",
    f"{tmp_path}/downloads/manual",
    f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record",
    "docs/data.md",
  ):
    assert fragment in message
  config.dataset = "imagenet21k"
  with pytest.raises(data.DatasetNotPreparedError, match="python -m crate_jax.data.imagenet21k"):
    data.make_train_iterator(config, seed=0)
  config.dataset = "no_such_dataset"
  with pytest.raises(data.DatasetNotPreparedError, match="'no_such_dataset' was not found"):
    data.num_examples(config, "train")


def test_prepare_builds_registered_crate_shapes(tmp_path, monkeypatch):
  monkeypatch.setattr(crate_shapes.CrateShapes.builder_configs["32"], "train_size", 30)
  monkeypatch.setattr(crate_shapes.CrateShapes.builder_configs["32"], "test_size", 10)
  config = data.default_input_config()
  config.data_dir = str(tmp_path)
  data.prepare_dataset(config)
  assert data.num_examples(config, "train") == 30
  assert data.num_examples(config, "test[:5]") == 5


def test_first_examples_of_a_split_compose_with_its_slice():
  assert pipeline.first_examples("train", 256) == "train[:256]"
  assert pipeline.first_examples("validation[500:]", 256) == "validation[500:756]"
  assert pipeline.first_examples("train[:100]", 256) == "train[0:100]"
  assert pipeline.first_examples("train[10:20]", 5) == "train[10:15]"
  with pytest.raises(ValueError, match="non-negative example indices"):
    pipeline.first_examples("train[:10%]", 5)
