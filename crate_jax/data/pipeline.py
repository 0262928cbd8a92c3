"""Training and evaluation input pipelines: tfds array_record sources read by grain.

No TensorFlow: `tfds.data_source` reads array_record files by index and grain
shards, shuffles, preprocesses (`preprocess.py`), batches and prefetches,
in-process threads or worker processes.

Batches (the contract with the trainer), per host (B = batch // process_count):

  train: {'image': float32[B, S, S, 3], 'labels': float32[B, num_classes]}
      one-hot or mixup/CutMix soft targets; label smoothing is the loss's job.
  eval:  {'image': float32[B, S, S, 3], 'label': int32[B], 'mask': float32[B]}
      plus 'segmentation': uint8[B, S, S] when asked for (and 'instances',
      'parts': uint8[B, S, S] if the dataset has them, as `crate_scenes`);
      mask is 0.0 on the padding that completes the last batch.

The train iterator is endless and checkpointable: `iterator.get_state()` /
`set_state(state)` resume exactly; with orbax, save it next to the model:

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))

Each host writes its own `data/process_<i>-of-<n>.json`, so resume with the
same number of hosts.
"""

import importlib
import math
import os
import re

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from crate_jax.data import crate_scenes
from crate_jax.data import crate_shapes
from crate_jax.data import preprocess

_DOCS = "docs/data.md"
# Embedded datasets, built on first use: tfds name -> builder.
_EMBEDDED = {"crate_shapes": crate_shapes.CrateShapes, "crate_scenes": crate_scenes.CrateScenes}
# Datasets converted from a manual download by `python -m crate_jax.data.<name>` (no
# TensorFlow): tfds name -> its builder class, whose MANUAL_DOWNLOAD_INSTRUCTIONS say what
# to download. Imported only to explain a missing dataset: importing the converters here would
# register their builders twice when one runs as `__main__`.
_CONVERTED = {
  "imagenet21k": "Imagenet21k",
  "voc_segmentation": "VocSegmentation",
  "coco_segmentation": "CocoSegmentation",
}
# Per-pixel label maps that evaluation emits next to 'segmentation' when present.
_EXTRA_MASKS = ("instances", "parts")


class DatasetNotPreparedError(RuntimeError):
  """The requested dataset is not in `data_dir` as tfds array_record files."""


def default_input_config() -> ml_collections.ConfigDict:
  """Defaults of `config.input`, set for the embedded `crate_shapes/32`.

  Fields:
    dataset: tfds name, optionally with config: 'crate_shapes/32',
      'crate_scenes/64' (8 classes), 'imagenet2012', 'imagenet21k', 'cifar10', 'cifar100',
      'oxford_flowers102', 'oxford_iiit_pet', ... (see docs/data.md).
    data_dir: tfds data directory; None is the tfds default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    train_split, eval_split: tfds split names; slices work ('train[:90%]').
    num_classes: size of the one-hot `labels`.
    image_size: side S of the square images fed to the model.
    global_batch_size: training examples per step over all hosts; each host
      gets global_batch_size // process_count.
    eval_batch_size: evaluation examples per step over all hosts.
    shuffle_seed: seed of the example order; None derives it from the `seed`
      given to `make_train_iterator`.
    num_workers: preprocessing worker processes per host; 0 preprocesses in
      the training process (in `num_threads` threads).
    num_threads: threads preparing batches in each (worker) process.
    prefetch: batches buffered ahead in each (worker) process.
    crop: training crop: 'random_resized' (torchvision RandomResizedCrop),
      'inception' (TF/big_vision inception crop) or 'none' (whole image).
    crop_min_area: smallest crop, as a fraction of the image area.
    flip: random horizontal flips for training.
    randaugment_layers: RandAugment ops per training image; 0 disables it.
    randaugment_magnitude: RandAugment strength, 0..10.
    mixup_alpha: Beta(alpha, alpha) of mixup; 0 disables it.
    cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 disables it. With both > 0
      each batch uses one of the two at random.
    mean, std: per-channel normalisation of images in [0, 1].
    eval_resize_ratio: evaluation resizes the shorter side to
      image_size * eval_resize_ratio, then crops the central S x S; 256/224
      is the ImageNet convention, 1.0 keeps whole (already small) images.
  """
  return ml_collections.ConfigDict(
    {
      "dataset": "crate_shapes/32",
      "data_dir": ml_collections.FieldReference(None, field_type=str),
      "train_split": "train",
      "eval_split": "test",
      "num_classes": 10,
      "image_size": 32,
      "global_batch_size": 256,
      "eval_batch_size": 500,
      "shuffle_seed": ml_collections.FieldReference(None, field_type=int),
      "num_workers": 0,
      "num_threads": 2,
      "prefetch": 2,
      "crop": "none",
      "crop_min_area": 0.08,
      "flip": True,
      "randaugment_layers": 0,
      "randaugment_magnitude": 10.0,
      "mixup_alpha": 0.0,
      "cutmix_alpha": 0.0,
      "mean": preprocess.IMAGENET_MEAN,
      "std": preprocess.IMAGENET_STD,
      "eval_resize_ratio": 1.0,
    }
  )


def _how_to_prepare(name: str, data_dir: str) -> str:
  dataset = name.partition("/")[0]
  if dataset in _EMBEDDED:
    builder_class = _EMBEDDED[dataset]
    return (
      f"Build it with {builder_class.__module__}.build("
      f"{type(builder_class.BUILDER_CONFIGS[0]).__name__}(name=..., ...), data_dir={data_dir!r})."
    )
  if dataset in _CONVERTED:
    module = importlib.import_module(f"crate_jax.data.{dataset}")
    builder_class = getattr(module, _CONVERTED[dataset])
    return (
      f"{builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS} Then run:\n"
      f"  python -m {builder_class.__module__} --manual_dir=<that dir> --data_dir={data_dir}"
    )
  command = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
  if dataset == "imagenet2012":
    return (
      "Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
      f"{data_dir}/downloads/manual/ and run, in an environment with "
      f"TensorFlow:\n  {command}"
    )
  return f"Run, in an environment with TensorFlow:\n  {command}"


def _builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder of `input_config.dataset`, which must be prepared."""
  name = input_config.dataset
  data_dir = os.fspath(crate_shapes.resolve_data_dir(input_config.data_dir))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    problem = None if builder.is_prepared() else "is not prepared"
  except tfds.core.DatasetNotFoundError:
    problem = "was not found"
  if not problem and builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    problem = f"is stored as {builder.info.file_format.value}, not array_record"
  if problem:
    raise DatasetNotPreparedError(
      f"Dataset {name!r} {problem} in data_dir {data_dir!r}. "
      f"{_how_to_prepare(name, data_dir)}\nSee {_DOCS}."
    )
  return builder


def _data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access split whose `Image` features stay encoded (decoded later)."""
  decoders = {
    key: tfds.decode.SkipDecoding()
    for key, feature in builder.info.features.items()
    if isinstance(feature, tfds.features.Image)
  }
  return builder.as_data_source(split=split, decoders=decoders)


def prepare_dataset(input_config: ml_collections.ConfigDict) -> None:
  """Builds a registered config of an embedded dataset (`crate_shapes`,
  `crate_scenes`) if missing; checks any other dataset.

  Raises:
    DatasetNotPreparedError: saying how to prepare the missing dataset.
  """
  dataset, _, config = input_config.dataset.partition("/")
  if dataset in _EMBEDDED and (not config or config in _EMBEDDED[dataset].builder_configs):
    crate_shapes.prepare_with(_EMBEDDED[dataset], input_config.dataset, input_config.data_dir)
  else:
    _builder(input_config)


def dataset_features(input_config: ml_collections.ConfigDict) -> tfds.features.FeaturesDict:
  """The (prepared) dataset's tfds features: e.g. `["label"].num_classes`, `["image"].shape`."""
  return _builder(input_config).info.features


def num_examples(input_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in `split` of the (prepared) dataset, over all hosts."""
  return _builder(input_config).info.splits[split].num_examples


def first_examples(split: str, num: int) -> str:
  """The tfds split of the first `num` examples of `split` ("train" or "train[a:b]").

  Raises:
    ValueError: `split` is sliced other than by non-negative example indices.
  """
  name, bracket, rest = split.partition("[")
  if not bracket:
    return f"{split}[:{num}]"
  bounds = re.fullmatch(r"(\d*):(\d*)\]", rest)
  if not bounds:
    raise ValueError(
      f"Cannot take the first {num} examples of split {split!r}: slice it by non-negative "
      "example indices (e.g. 'validation[500:]'), or name the subset explicitly."
    )
  start = int(bounds[1] or 0)
  stop = start + num if not bounds[2] else min(start + num, int(bounds[2]))
  return f"{name}[{start}:{stop}]"


def _host_shard(num: int, process_index: int, process_count: int) -> slice:
  """The contiguous range of `num` examples that a host reads: disjoint, covering."""
  return slice(num * process_index // process_count, num * (process_index + 1) // process_count)


def _per_host(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"Batch size {batch_size} is not divisible by {process_count} hosts.")
  return batch_size // process_count


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


def _iterator(
  dataset: grain.MapDataset, input_config: ml_collections.ConfigDict
) -> grain.DatasetIterator:
  """Prefetches `dataset` in threads, and in worker processes if configured."""
  dataset = dataset.to_iter_dataset(
    grain.ReadOptions(
      num_threads=input_config.num_threads, prefetch_buffer_size=input_config.prefetch
    )
  )
  if input_config.num_workers:
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=input_config.num_workers, per_worker_buffer_size=input_config.prefetch
      )
    )
  return iter(dataset)


def make_train_iterator(
  input_config: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Endless, checkpointable iterator over this host's training batches.

  Each host reads only its contiguous shard of the split, reshuffled every
  epoch. The output is a deterministic function of the config, `seed` and
  host, whatever `num_workers` and `num_threads`.

  Args:
    input_config: see `default_input_config`.
    seed: seeds augmentation (and the order, unless `shuffle_seed` is set).
    process_index: this host; defaults to `jax.process_index()`.
    process_count: number of hosts; defaults to `jax.process_count()`.

  Returns:
    A grain iterator with `get_state()` / `set_state()`.
  """
  process_index, process_count = _hosts(process_index, process_count)
  builder = _builder(input_config)
  source = _data_source(builder, input_config.train_split)
  shuffle_seed = seed if input_config.shuffle_seed is None else input_config.shuffle_seed
  augment_seed, batch_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
  example_preprocess = preprocess.TrainExamplePreprocess(
    image_size=input_config.image_size,
    crop=input_config.crop,
    crop_min_area=input_config.crop_min_area,
    flip=input_config.flip,
    randaugment_layers=input_config.randaugment_layers,
    randaugment_magnitude=input_config.randaugment_magnitude,
  )
  batch_preprocess = preprocess.TrainBatchPreprocess(
    num_classes=input_config.num_classes,
    mean=tuple(input_config.mean),
    std=tuple(input_config.std),
    mixup_alpha=input_config.mixup_alpha,
    cutmix_alpha=input_config.cutmix_alpha,
  )
  dataset = (
    grain.MapDataset.source(source)[_host_shard(len(source), process_index, process_count)]
    .shuffle(seed=shuffle_seed)
    .repeat()
    .random_map(example_preprocess, seed=int(augment_seed))
    .batch(_per_host(input_config.global_batch_size, process_count), drop_remainder=True)
    .random_map(batch_preprocess, seed=int(batch_seed))
  )
  return _iterator(dataset, input_config)


def _padding_example(image_size: int, mask_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  example = {
    "image": np.zeros((image_size, image_size, 3), np.uint8),
    "label": np.int32(0),
    "mask": np.float32(0),
  }
  for key in mask_keys:
    example[key] = np.zeros((image_size, image_size), np.uint8)
  return example


def make_eval_iterator(
  input_config: ml_collections.ConfigDict,
  *,
  with_segmentation: bool = False,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """One pass over this host's shard of the evaluation split.

  Every example of the split is seen exactly once over all hosts. Each host's
  last batch is padded with `mask` 0.0 examples, and all hosts yield the same
  number of batches (so collective ops stay in step).

  Args:
    input_config: see `default_input_config`.
    with_segmentation: also emit 'segmentation' (the dataset's foreground or
      segmentation mask, cropped like the image), and 'instances' and 'parts'
      (per-pixel object and part ids, cropped alike) where the dataset has
      them.
    process_index: this host; defaults to `jax.process_index()`.
    process_count: number of hosts; defaults to `jax.process_count()`.

  Returns:
    A finite grain iterator; call again for a new pass.
  """
  process_index, process_count = _hosts(process_index, process_count)
  builder = _builder(input_config)
  segmentation_key, extra_masks = None, ()
  if with_segmentation:
    segmentation_key = next(
      (key for key in ("segmentation", "segmentation_mask") if key in builder.info.features), None
    )
    if segmentation_key is None:
      raise ValueError(f"{input_config.dataset} has no segmentation masks.")
    extra_masks = tuple(key for key in _EXTRA_MASKS if key in builder.info.features)
  source = _data_source(builder, input_config.eval_split)
  shard = _host_shard(len(source), process_index, process_count)
  batch_size = _per_host(input_config.eval_batch_size, process_count)
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  example_preprocess = preprocess.EvalExamplePreprocess(
    image_size=input_config.image_size,
    resize_ratio=input_config.eval_resize_ratio,
    segmentation_key=segmentation_key,
    extra_mask_keys=extra_masks,
  )
  dataset = grain.MapDataset.source(source)[shard].map(example_preprocess)
  num_padding = num_batches * batch_size - len(dataset)
  if num_padding:
    mask_keys = ("segmentation", *extra_masks) if with_segmentation else ()
    padding = [_padding_example(input_config.image_size, mask_keys)] * num_padding
    dataset = grain.MapDataset.concatenate([dataset, grain.MapDataset.source(padding)])
  batch_preprocess = preprocess.EvalBatchPreprocess(
    mean=tuple(input_config.mean), std=tuple(input_config.std)
  )
  return _iterator(dataset.batch(batch_size).map(batch_preprocess), input_config)
