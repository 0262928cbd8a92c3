r"""Full fine-tuning of a pre-trained CRATE on a small dataset: the CRATE paper's transfer recipe.

AdamW (weight decay 0.01), global batch 256, RandAugment(2, 14) with random-resized crop and
flip, cosine decay from lr 5e-5 for 200 epochs (CIFAR-10/100) or 1e-4 for 400 epochs
(Flowers-102, Pets), at 224 px. The classifier head is re-initialised for the new classes and
the position embedding is resampled when the patch grid differs.

    python -m crate_jax.main \
        --config=configs/finetune.py:dataset=cifar10,init=/path/to/imagenet_workdir,variant=B/16 \
        --workdir=$WORKDIR

`init` is one of our workdirs (its latest checkpoint) or step directories, or a published
checkpoint file (`.pth`, `.safetensors`, or CRATE-alpha `.npz`) read by
`crate_jax.convert.load_published`; `format=workdir|published` overrides the guess (a
directory is ours, a file is published). `model=crate_alpha` fine-tunes CRATE-alpha;
`model=crate_mae_classifier` fine-tunes the encoder of a CRATE-MAE checkpoint (ours or
published; its decoder is dropped and a new head trained, with CRATE's transfer recipe). The
datasets must be prepared as tfds array_record files (see docs/data.md).

Expected top-1 (CRATE-T / S / B / L from ImageNet-1K): CIFAR-10 95.5 / 96.0 / 96.8 / 97.2,
CIFAR-100 78.9 / 81.0 / 82.7 / 83.6, Flowers-102 84.6 / 87.1 / 88.7 / 88.3, Pets 81.4 /
84.9 / 85.3 / 87.4. Not run here.
"""

import os

from configs import common
from crate_jax import config_utils

# name: (classes, train split, eval split, train images, lr, epochs, eval resize ratio).
DATASETS = {
  "cifar10": (10, "train", "test", 50_000, 5e-5, 200.0, 1.0),
  "cifar100": (100, "train", "test", 50_000, 5e-5, 200.0, 1.0),
  "oxford_flowers102": (102, "train+validation", "test", 2_040, 1e-4, 400.0, 256 / 224),
  "oxford_iiit_pet": (37, "train", "test", 3_680, 1e-4, 400.0, 256 / 224),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(
    arg, dataset="cifar10", init="", format="", variant="B/16", model="crate", res=224
  )
  if arg.dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {arg.dataset!r}; choose one of {sorted(DATASETS)}.")
  if not arg.init:
    raise ValueError(
      "finetune.py needs init=PATH: a workdir, a checkpoint step directory or a "
      "published checkpoint file."
    )
  classes, train_split, eval_split, train_images, lr, epochs, resize = DATASETS[arg.dataset]
  batch_size = 256

  config = common.base(arg.model, variant=arg.variant)
  common.imagenet_style_input(
    config, dataset=arg.dataset, num_classes=classes, batch_size=batch_size, image_size=arg.res
  )
  config.input.train_split, config.input.eval_split = train_split, eval_split
  config.input.eval_batch_size = 512
  config.input.eval_resize_ratio = resize  # CIFAR's 32 px images are kept whole.
  config.input.crop = "random_resized"
  config.input.crop_min_area = 0.08
  config.input.flip = True
  config.input.randaugment_layers = 2
  # The published code's RandAugment(2, 14) counts magnitudes 0..30
  # (pytorch-randaugment); 14 / 30 is 4.67 on our 0..10 scale.
  config.input.randaugment_magnitude = 14 / 3

  config.init.checkpoint = arg.init
  config.init.format = arg.format or ("workdir" if os.path.isdir(arg.init) else "published")

  config.total_epochs = epochs
  config.optimizer.name = "adamw"
  config.optimizer.lr = lr
  config.optimizer.weight_decay = 0.01
  config.schedule.name = "cosine"
  every = max(int(epochs * train_images / batch_size) // 20, 1)  # 20 times per run.
  config.log_every_steps = 50
  for entry in config.evals.values():
    entry.every_steps = every
  config.checkpoint_every_steps = every
  return config
