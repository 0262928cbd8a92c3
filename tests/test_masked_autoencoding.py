"""CRATE-MAE through the training core: pretraining, resume, evaluators, fine-tuning init.

The task (`tasks/masked_autoencoding.py`), the reconstruction and linear-probe evaluators
and the MAE-encoder classifier, on a tiny model and the tiny crate_shapes dataset.
"""

import os
import shutil

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import mae_demo
from crate_jax import config_utils
from crate_jax import evaluators
from crate_jax import pretrained
from crate_jax import train
from crate_jax import train_state
from crate_jax.data import crate_shapes
from crate_jax.evaluators import linear_probe
from crate_jax.evaluators import reconstruction
from crate_jax.models import get_model

TINY = crate_shapes.CrateShapesConfig(name="mae_tiny", image_size=16, train_size=128, test_size=40)


def tiny_config(data_dir, steps=8, **overrides):
  """configs/mae_demo.py shrunk: 16 px images, patch 4 (16 patches), width 16."""
  config = mae_demo.get_config(f"steps={steps},width=16,depth=2,decoder_depth=1,heads=2")
  config.input.update(
    dataset=f"crate_shapes/{TINY.name}",
    data_dir=str(data_dir),
    image_size=16,
    global_batch_size=16,
    eval_batch_size=16,
    num_threads=1,
  )
  config.schedule.warmup_steps = 1
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  config.evals.reconstruction.update(every_steps=0, num_images=4)
  del config.evals["rate_reduction"]
  del config.evals["linear_probe"]
  for key, value in overrides.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _params(workdir, step):
  path = workdir / "checkpoints" / str(step) / "state"
  return jax.device_get(ocp.StandardCheckpointer().restore(path)["params"])


def _masked_loss(config, params):
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  context = evaluators.Context(model, config.input)
  return reconstruction.Evaluator(context, num_images=4).run(params, 0)["loss"]


def test_pretraining_lowers_the_masked_loss_and_draws_reconstructions(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=60)
  config.optimizer.lr = 5e-3
  initial = train.train_and_evaluate(tiny_config(data_dir, total_steps=0), str(tmp_path / "init"))
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  before = _masked_loss(config, initial.params)
  after = _masked_loss(config, final.params)
  assert after < 0.8 * before, (before, after)
  grids = sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("reconstruction_"))
  assert grids == ["reconstruction_000060.png"]


def test_pretraining_resumes_bitwise(data_dir, tmp_path):
  uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
  train.train_and_evaluate(tiny_config(data_dir), str(uninterrupted))
  (resumed / "checkpoints").mkdir(parents=True)
  shutil.copytree(uninterrupted / "checkpoints" / "4", resumed / "checkpoints" / "4")
  train.train_and_evaluate(tiny_config(data_dir), str(resumed))
  jax.tree.map(np.testing.assert_array_equal, _params(resumed, 8), _params(uninterrupted, 8))


def test_a_pretrained_encoder_initialises_the_classifier(data_dir, tmp_path):
  config = tiny_config(data_dir)
  mae = get_model(config.model_name, **config_utils.model_kwargs(config))
  params = train.train_and_evaluate(config, str(tmp_path / "mae")).params
  classifier = get_model(
    "crate_mae_classifier", width=16, depth=2, heads=2, patch_size=4, image_size=16, num_classes=7
  )
  adapted = pretrained.adapt(jax.device_get(params), train_state.abstract_params(classifier, 16))
  assert not any(k[0] in ("head", "decoder", "mask_token") for k in adapted)
  full = classifier.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  flat = {**flax.traverse_util.flatten_dict(jax.device_get(full)), **adapted}
  merged = flax.traverse_util.unflatten_dict(flat)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  tokens, _ = classifier.apply({"params": merged}, images, method="encode")
  expected, _ = mae.apply({"params": params}, images, method="encode")
  np.testing.assert_allclose(tokens, expected, rtol=1e-6, atol=1e-6)


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8)) * 3
  labels = rng.integers(0, 3, 300)
  features = centres[labels] + rng.normal(size=(300, 8))
  scores = linear_probe.probe(
    (features[:200], labels[:200]), (features[200:], labels[200:]), num_classes=3
  )
  assert scores["top1"] > 0.95 and scores["l2"] in (1e-5, 1e-4, 1e-3, 1e-2)
  noise = linear_probe.probe(
    (rng.normal(size=(200, 8)), labels[:200]), (rng.normal(size=(100, 8)), labels[200:]), 3
  )
  assert noise["top1"] < 0.6  # Chance is 1/3: the probe does not invent signal.
