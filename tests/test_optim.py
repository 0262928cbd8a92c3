"""Schedules, weight-decay masks, optimizers and the loss (crate_jax.optim)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from crate_jax import config_utils
from crate_jax import optim
from crate_jax.models import get_model


def _param_shapes(name, **kwargs):
  model = get_model(
    name, width=16, depth=2, heads=2, patch_size=4, image_size=16, num_classes=3, **kwargs
  )
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  return nn.unbox(boxed)["params"]


def _decayed_paths(params, regex=optim.DEFAULT_DECAY_REGEX):
  mask = optim.decay_mask(params, regex)
  return {optim.path_str(p) for p, decays in jax.tree_util.tree_leaves_with_path(mask) if decays}


def test_warmup_then_cosine_to_end_lr():
  schedule = optim.create_schedule(
    "cosine", base_lr=1.0, total_steps=110, warmup_steps=10, end_lr=0.1
  )
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6
  )


def test_linear_and_constant_schedules():
  linear = optim.create_schedule("linear", base_lr=2.0, total_steps=10, end_lr=0.0)
  np.testing.assert_allclose([linear(s) for s in (0, 5, 10)], [2.0, 1.0, 0.0], atol=1e-6)
  constant = optim.create_schedule("constant", base_lr=3.0, total_steps=10, warmup_steps=2)
  np.testing.assert_allclose([constant(s) for s in (1, 2, 9)], [1.5, 3.0, 3.0], atol=1e-6)


def test_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match="Unknown schedule"):
    optim.create_schedule("step", base_lr=1.0, total_steps=10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.create_schedule("cosine", base_lr=1.0, total_steps=10, warmup_steps=11)


def test_epochs_convert_to_steps_and_steps_win():
  config = ml_collections.ConfigDict(dict(total_steps=None, total_epochs=2.5))
  assert config_utils.steps(config, "total", steps_per_epoch=100) == 250
  config.total_steps = 7
  assert config_utils.steps(config, "total", steps_per_epoch=100) == 7
  empty = ml_collections.ConfigDict(dict(warmup_steps=None, warmup_epochs=None))
  assert config_utils.steps(empty, "warmup", 100, default=0) == 0
  with pytest.raises(ValueError, match="warmup_steps or warmup_epochs"):
    config_utils.steps(empty, "warmup", 100)


def test_crate_decay_mask_includes_dictionaries_and_matrices_only():
  decayed = _decayed_paths(_param_shapes("crate"))
  for i in range(2):
    assert {
      f"encoder/layer_{i}/ista/D",
      f"encoder/layer_{i}/mssa/proj",
      f"encoder/layer_{i}/mssa/out",
    } <= decayed
  assert {"patch_embed/dense/kernel", "head/kernel"} <= decayed
  assert not any(p.endswith(("bias", "scale", "cls", "pos_embedding")) for p in decayed)


def test_crate_alpha_decay_mask_includes_d_and_d1_also_scanned():
  decayed = _decayed_paths(_param_shapes("crate_alpha", scan_layers=True))
  assert {
    "encoder/layers/odl/D",
    "encoder/layers/odl/D1",
    "encoder/layers/mssa/proj",
    "encoder/layers/mssa/out",
    "patch_embed/conv/kernel",
    "head/kernel",
  } == decayed
  # The published CRATE-alpha mask: D and D1, most of the parameters, would not decay.
  assert "encoder/layers/odl/D" not in _decayed_paths(_param_shapes("crate_alpha"), r".*/kernel$")


def _optimizer_config(**overrides):
  config = config_utils.base_config().optimizer
  with config.unlocked():
    config.update(overrides)
  return config


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_weight_decay_shrinks_dictionaries_and_spares_norms(name):
  params = jax.tree.map(jnp.ones_like, _param_shapes("crate_alpha"))
  config = _optimizer_config(name=name, weight_decay=0.5)
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1), params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  layer = new["encoder"]["layer_0"]
  # Zero gradients: only the decoupled decay moves parameters, by lr * wd = 5%.
  np.testing.assert_allclose(layer["odl"]["D"], 0.95, rtol=1e-6)
  np.testing.assert_allclose(layer["odl"]["D1"], 0.95, rtol=1e-6)
  np.testing.assert_array_equal(layer["norm1"]["scale"], 1.0)
  np.testing.assert_array_equal(new["pos_embedding"], 1.0)


def test_optimizer_errors_name_the_problem():
  params = _param_shapes("crate")
  schedule = optax.constant_schedule(0.1)
  with pytest.raises(ValueError, match="Unknown optimizer 'adamm'"):
    optim.create_optimizer(_optimizer_config(name="adamm"), schedule, params)
  with pytest.raises(ValueError, match="use 'adamw'"):
    optim.create_optimizer(_optimizer_config(name="adam", weight_decay=0.1), schedule, params)
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.create_optimizer(
      _optimizer_config(weight_decay=0.1, decay_regex="kernal$"), schedule, params
    )


def test_gradients_are_clipped_by_global_norm_before_the_optimizer():
  params = {"w": jnp.zeros(4)}
  # b1 = b2 = 0 and a huge eps make Adam's update -lr * g / (|g| + eps) ~ -g: linear in g.
  config = _optimizer_config(name="adam", grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=1e6)
  tx = optim.create_optimizer(config, optax.constant_schedule(1e6), params)
  updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8, 0.0, 0.0], rtol=1e-5)


def test_label_smoothed_cross_entropy_matches_the_formula():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
  labels = jnp.array([[0.0, 1.0, 0.0], [0.3, 0.7, 0.0]])  # Soft targets, e.g. mixup.
  log_probs = jax.nn.log_softmax(logits)
  smoothed = labels * 0.9 + 0.1 / 3
  np.testing.assert_allclose(
    optim.cross_entropy(logits, labels, 0.1), -(smoothed * log_probs).sum(-1), rtol=1e-6
  )
  np.testing.assert_allclose(
    optim.cross_entropy(logits, labels), -(labels * log_probs).sum(-1), rtol=1e-6
  )
