"""Sharded training on 8 simulated CPU devices: data, FSDP and tensor parallelism.

A few training steps of a tiny CRATE (and CRATE-alpha) on dp=8, fsdp=8, dp2 x fsdp2 x tp2
and dp4 x tp2 meshes give the losses and parameters of one device; parameters and
optimizer state are sharded as the config's rules say; a checkpoint written on one mesh
restores on another.

The 8 devices must exist before JAX starts its CPU backend, so this file also runs as a
script in a fresh process (`XLA_FLAGS`): the `results` fixture starts it once, it trains
every case and writes what it measured to JSON, and the tests assert on that.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
STEPS = 3
# name -> (model_name, (data, fsdp, tensor)); the '/1' cases are the one-device references.
CASES = {
  "crate/1": ("crate", (1, 1, 1)),
  "crate/dp8": ("crate", (8, 1, 1)),
  "crate/fsdp8": ("crate", (1, 8, 1)),
  "crate/dp2_fsdp2_tp2": ("crate", (2, 2, 2)),
  "crate/dp4_tp2": ("crate", (4, 1, 2)),
  "crate_alpha/1": ("crate_alpha", (1, 1, 1)),
  "crate_alpha/dp2_fsdp2_tp2": ("crate_alpha", (2, 2, 2)),
}
# XLA:CPU flags that make these small programs compile ~4x faster (plainer machine code);
# every case, the references included, runs with them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
RESTORE_MESH = (2, 1, 4)  # The fsdp8 checkpoint is restored on dp2 x tp4.
# Leaves whose shardings are checked, by path suffix (parameters and Adam moments):
# logical axes -> expected mesh axes under the default rules.
CHECKED = {
  "encoder/layer_0/mssa/proj": ("fsdp", "tensor", None),  # (embed, heads, head_dim)
  "encoder/layer_0/mssa/out": ("tensor", None, "fsdp"),  # (heads, head_dim, embed)
  "encoder/layer_0/ista/D": ("fsdp", "tensor"),  # (embed, dict)
  "encoder/layer_0/odl/D": ("fsdp", "tensor"),
  "encoder/layer_0/odl/D1": ("fsdp", "tensor"),
  "head/kernel": ("fsdp", "tensor"),  # (embed, classes)
}


def _config(model_name, mesh_sizes):
  from crate_jax import config_utils  # pylint: disable=g-import-not-at-top

  config = config_utils.base_config()
  config.model_name = model_name
  config.model = config_utils.model_config(
    model_name, width=32, depth=2, heads=4, patch_size=(8, 8)
  )
  config.input.image_size = 16
  config.input.num_classes = 8
  config.input.global_batch_size = 16
  config.optimizer.update(name="adamw", lr=1e-3, weight_decay=0.05, grad_clip_norm=0.5)
  config.mesh.axes = tuple(zip(("data", "fsdp", "tensor"), mesh_sizes))
  return config


def _worker(out_path: str, checkpoint_dir: str) -> None:
  """Trains every case on this process's 8 CPU devices; writes the measurements as JSON."""
  import jax  # pylint: disable=g-import-not-at-top

  from crate_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from crate_jax import config_utils  # pylint: disable=g-import-not-at-top
  from crate_jax import optim  # pylint: disable=g-import-not-at-top
  from crate_jax import sharding  # pylint: disable=g-import-not-at-top
  from crate_jax import tasks  # pylint: disable=g-import-not-at-top
  from crate_jax import train_state  # pylint: disable=g-import-not-at-top
  from crate_jax.models import get_model  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
    "labels": np.eye(8, dtype=np.float32)[rng.integers(0, 8, 16)],
  }

  def setup(model_name, mesh_sizes):
    config = _config(model_name, mesh_sizes)
    mesh = sharding.create_mesh(config, jax.devices()[: int(np.prod(mesh_sizes))])
    rules = sharding.logical_rules(config)
    model = get_model(model_name, **config_utils.model_kwargs(config))
    schedule = optim.create_schedule("constant", base_lr=config.optimizer.lr, total_steps=STEPS)
    with sharding.use_mesh(mesh, rules):
      tx = optim.create_optimizer(
        config.optimizer, schedule, train_state.abstract_params(model, 16)
      )
      abstract, specs = train_state.abstract_train_state(model, tx, 16)
    shardings = sharding.state_shardings(specs, abstract, mesh, rules)
    return config, mesh, rules, model, tx, schedule, abstract, shardings

  def leaves(tree):
    return {optim.path_str(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def describe(state):
    """Spec and first-shard shape of the checked leaves (parameters and optimizer moments)."""
    return {
      path: {
        "spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
        "shape": list(x.shape),
        "shard": list(x.addressable_shards[0].data.shape),
      }
      for path, x in leaves(state).items()
      if path.endswith(tuple(CHECKED))
    }

  results, references, states = {}, {}, {}
  for name, (model_name, mesh_sizes) in CASES.items():
    config, mesh, rules, model, tx, schedule, abstract, shardings = setup(model_name, mesh_sizes)
    reference = references.get(model_name)
    result = {}
    with sharding.use_mesh(mesh, rules):
      if reference is None or name == "crate/dp2_fsdp2_tp2":
        # Initialised directly in its shardings: same values on any mesh.
        state = train_state.create_train_state(model, tx, 16, config.seed, shardings)
      else:
        state = jax.device_put(reference["init"], shardings)
      if reference is not None:
        result["init_max_diff"] = max(
          float(np.max(np.abs(np.asarray(a) - b)))
          for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference["init"]))
        )
      else:
        references[model_name] = reference = {"init": jax.device_get(state)}
      batch_sharding = sharding.batch_sharding(mesh, rules)
      global_batch = sharding.put_batch(batch, batch_sharding)
      result["batch_shard"] = list(global_batch["image"].addressable_shards[0].data.shape)
      task = tasks.get_task(config)
      make_step = train_state.make_train_step
      lowered = make_step(task, model, tx, schedule, shardings, batch_sharding).lower(
        state, global_batch
      )
      result["constraints"] = lowered.as_text().count("sdy.sharding_constraint")
      step = lowered.compile()
      losses, donated = [], None
      for _ in range(STEPS):  # The same batch: the loss must fall.
        previous = state
        state, metrics, _ = step(state, global_batch)
        losses.append(float(metrics.loss.compute()))
        donated = all(x.is_deleted() for x in jax.tree.leaves(previous))
      result.update(losses=losses, donated=donated, leaves=describe(state), mesh=dict(mesh.shape))
      if "final" in reference:
        result["final_max_diff"] = max(
          float(np.max(np.abs(np.asarray(a) - b)))
          for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference["final"]))
        )
      else:
        reference["final"] = jax.device_get(state.params)
    states[name] = state
    results[name] = result
    print(name, result["losses"], flush=True)

  # A checkpoint of the fsdp8 state restores on dp2 x tp4 with the same values.
  saved = states["crate/fsdp8"]
  checkpointer = checkpointing.Checkpointer(checkpoint_dir, max_to_keep=1, async_save=False)
  checkpointer.save(STEPS, saved)
  checkpointer.close()
  *_, abstract, shardings = setup("crate", RESTORE_MESH)
  restorer = checkpointing.Checkpointer(checkpoint_dir, max_to_keep=1, async_save=False)
  restored = restorer.restore_latest(train_state.with_shardings(abstract, shardings))
  restorer.close()
  results["restore"] = {
    "step": int(restored.step),
    "max_diff": max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved))
    ),
    "same_shardings": all(
      a.sharding.is_equivalent_to(s, a.ndim)
      for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings))
    ),
    "leaves": describe(restored),
  }
  pathlib.Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sharding")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(REPO),
    XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES} {FAST_COMPILE}",
  )
  out = tmp / "results.json"
  proc = subprocess.run(
    [sys.executable, __file__, str(out), str(tmp / "checkpoints")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith("/1")])
def test_same_losses_and_parameters_as_one_device(results, name):
  reference = results[name.split("/")[0] + "/1"]
  result = results[name]
  assert result["init_max_diff"] < 1e-6  # Same initial state, also when created sharded.
  np.testing.assert_allclose(result["losses"], reference["losses"], rtol=2e-5)
  assert reference["losses"][-1] < reference["losses"][0]  # It trains.
  assert result["final_max_diff"] < 1e-4  # Adam magnifies rounding where gradients are ~0.


@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith("/1")])
def test_parameters_and_optimizer_state_sharded_by_rules(results, name):
  result = results[name]
  mesh = result["mesh"]
  checked = {path: leaf for path, leaf in result["leaves"].items()}
  for suffix, axes in CHECKED.items():
    found = [leaf for path, leaf in checked.items() if path.endswith(suffix)]
    if not found:  # A parameter of the other model.
      continue
    assert len(found) == 3, (suffix, list(checked))  # The parameter, Adam's mu and nu.
    for leaf in found:
      assert leaf["spec"] == list(axes), (suffix, leaf)
      expected = [n // (mesh[a] if a else 1) for n, a in zip(leaf["shape"], axes)]
      assert leaf["shard"] == expected, (suffix, leaf)
  data, fsdp = mesh["data"], mesh["fsdp"]
  assert result["batch_shard"] == [16 // (data * fsdp), 16, 16, 3]
  assert result["donated"]  # The step reuses the old state's buffers.
  assert result["constraints"] >= 2 * 2  # The models' activation constraints, 2 per layer.


def test_checkpoint_restores_on_another_mesh(results):
  restored = results["restore"]
  assert restored["step"] == STEPS
  assert restored["max_diff"] == 0.0
  assert restored["same_shardings"]
  d = restored["leaves"]["params/encoder/layer_0/ista/D"]
  assert d["spec"] == ["fsdp", "tensor"] and d["shard"] == [32, 32 // RESTORE_MESH[2]]


if __name__ == "__main__":
  _worker(*sys.argv[1:])
