r"""CRATE-MAE pretraining on ImageNet-1K: the published recipe (Pai et al., 2024).

Mask ratio 0.75, AdamW (b1 0.9, b2 0.95: the MAE code base the published code follows),
base learning rate 3e-5 scaled by batch / 256, weight decay 0.1, global batch 4096, 800
epochs with 40 warmup epochs then cosine to 0; random-resized crops (20-100% of the area)
and flips; pixel targets not normalised (`norm_pix_loss` off, as the published configs).

    python -m crate_jax.main --config=configs/mae_imagenet.py:variant=B/16 --workdir=$WORKDIR

`variant` is T/16, S/16, B/16 (default) or L/16; `batch_size` and `epochs` are arguments
too. Needs `imagenet2012` prepared as tfds array_record files (see docs/data.md).
Expected (published, linear probe after pretraining, S / B): CIFAR-10 79.4 / 80.9,
CIFAR-100 56.6 / 60.1, Flowers 57.7 / 61.8, Pets 40.6 / 46.2. Not run here.
"""

from configs import common
from crate_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant="B/16", batch_size=4096, epochs=800.0)
  config = common.base("crate_mae", task="masked_autoencoding", variant=arg.variant)
  common.imagenet_style_input(
    config, dataset="imagenet2012", num_classes=1000, batch_size=arg.batch_size
  )
  config.input.eval_split = "validation"
  config.input.crop = "random_resized"
  config.input.crop_min_area = 0.2
  config.input.flip = True

  config.total_epochs = arg.epochs
  config.optimizer.name = "adamw"
  config.optimizer.lr = 3e-5 * arg.batch_size / 256
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.weight_decay = 0.1
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 40.0
  config.schedule.end_lr = 0.0
  common.pod_cadence(config)
  config.evals.reconstruction.every_steps = 2500
  return config
