r"""CRATE on ImageNet-1K from scratch: the paper's recipe (Yu et al., 2023).

Lion (lr 2.4e-4, weight decay 0.5), global batch 2048, 150 epochs with 5 warmup epochs then
cosine to 0, label smoothing 0.1; random-resized crop + horizontal flip only; evaluation
resizes to 256 and crops the central 224.

    python -m crate_jax.main --config=configs/imagenet.py:variant=B/16 --workdir=$WORKDIR

`variant` is T/16, S/16, B/16 (default) or L/16 (also other patch sizes, e.g. B/8).
Needs `imagenet2012` prepared as tfds array_record files (see docs/data.md).

Expected: top-1 66.7 (T/16), 69.2 (S/16), 70.8 (B/16), 71.3 (L/16) after 150 epochs
(93,750 steps). Time: about 240 s per epoch for CRATE-B/16 on 16 A100-40GB as reported,
i.e. about 10 hours there (not run here). The MFU logged
needs `--config.peak_tflops_per_device` (e.g. 989 for H100 bf16, 275 for TPU v4).
"""

from configs import common
from crate_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant="B/16", batch_size=2048, epochs=150.0)
  config = common.base("crate", variant=arg.variant)
  common.imagenet_style_input(
    config, dataset="imagenet2012", num_classes=1000, batch_size=arg.batch_size
  )
  config.input.eval_split = "validation"
  config.input.crop = "random_resized"
  config.input.crop_min_area = 0.08  # torchvision's RandomResizedCrop default.
  config.input.flip = True

  config.total_epochs = arg.epochs
  config.optimizer.name = "lion"
  config.optimizer.lr = 2.4e-4
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.weight_decay = 0.5
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 5.0
  config.schedule.end_lr = 0.0
  config.label_smoothing = 0.1
  common.pod_cadence(config)
  return config
