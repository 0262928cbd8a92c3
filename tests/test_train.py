"""The training loop end to end on a tiny model and dataset (crate_jax.train, crate_jax.main).

Covers: a run leaving checkpoints, TensorBoard files and the rate-reduction plot; resuming a
mid-run checkpoint ends bitwise where an uninterrupted run ends; SIGTERM saves and exits 0,
and a rerun continues; divergence stops without saving; a missing dataset; exact evaluation
over uneven batches; gradient accumulation equals the big-batch step; fine-tuning init.
"""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import demo
from crate_jax import checkpointing
from crate_jax import config_utils
from crate_jax import evaluators
from crate_jax import optim
from crate_jax import pretrained
from crate_jax import sharding
from crate_jax import tasks
from crate_jax import train
from crate_jax import train_state
from crate_jax.data import crate_shapes
from crate_jax.data import pipeline
from crate_jax.evaluators import classification
from crate_jax.models import get_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = crate_shapes.CrateShapesConfig(name="train_tiny", image_size=16, train_size=96, test_size=70)


def tiny_config(data_dir, **overrides):
  """configs/demo.py shrunk: 16 px images, width 16, 2 layers, 8 steps of 16 images."""
  config = demo.get_config("width=16,depth=2,heads=2,patch=4,steps=8")
  config.input.dataset = f"crate_shapes/{TINY.name}"
  config.input.data_dir = str(data_dir)
  config.input.image_size = 16
  config.input.global_batch_size = 16
  config.input.eval_batch_size = 32  # 70 test images: 3 batches, the last one padded.
  config.input.num_threads = 1
  config.schedule.warmup_steps = 2
  config.log_every_steps = 2
  config.evals.eval.every_steps = 0
  del config.evals["rate_reduction"]  # Measured (and plotted) where a test says so.
  config.checkpoint_every_steps = 4
  for key, value in overrides.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def with_rate_reduction(config):
  config.evals.rate_reduction = dict(type="rate_reduction", every_steps=0, num_images=8)
  return config


def _checkpoint_steps(workdir):
  return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def _params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return jax.device_get(restored["params"])


def test_resumed_run_ends_bitwise_like_an_uninterrupted_one(data_dir, tmp_path):
  uninterrupted = tmp_path / "uninterrupted"
  final = train.train_and_evaluate(with_rate_reduction(tiny_config(data_dir)), str(uninterrupted))
  assert int(final.step) == 8
  assert _checkpoint_steps(uninterrupted) == [4, 8]
  for name in ("config.json", "rate_reduction.png"):
    assert (uninterrupted / name).stat().st_size > 0
  assert any(p.startswith("events.out.tfevents") for p in os.listdir(uninterrupted))

  # A run stopped after step 4: its workdir as the uninterrupted run left it then.
  resumed = tmp_path / "resumed"
  (resumed / "checkpoints").mkdir(parents=True)
  shutil.copytree(uninterrupted / "checkpoints" / "4", resumed / "checkpoints" / "4")
  train.train_and_evaluate(tiny_config(data_dir), str(resumed))

  assert _checkpoint_steps(resumed) == [4, 8]
  expected, actual = _params(uninterrupted, 8), _params(resumed, 8)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)
  jax.tree.map(np.testing.assert_array_equal, final.params, expected)

  # total_steps=0 evaluates the latest checkpoint and redraws the plot, changing nothing else.
  (uninterrupted / "rate_reduction.png").unlink()
  evaluated = train.train_and_evaluate(
    with_rate_reduction(tiny_config(data_dir, total_steps=0)), str(uninterrupted)
  )
  jax.tree.map(np.testing.assert_array_equal, evaluated.params, expected)
  assert (uninterrupted / "rate_reduction.png").exists()
  assert _checkpoint_steps(uninterrupted) == [4, 8]


@pytest.mark.parametrize(
  "lr,message",
  [
    (1e30, r"diverged at step 3: its update left exploded parameters"),  # Finite, absurd.
    (1e39, r"diverged at step 3: its update left non-finite parameters"),  # inf in float32.
  ],
)
def test_a_diverged_state_is_never_saved(data_dir, tmp_path, lr, message):
  """Steps 1-2 train normally and are saved; step 3's update explodes: nothing is saved."""
  config = tiny_config(data_dir, checkpoint_every_steps=1)
  config.schedule.name, config.schedule.warmup_steps = "constant", 0
  config.optimizer.lr = 1e-3
  train.train_and_evaluate(
    tiny_config(data_dir, checkpoint_every_steps=1, total_steps=2), str(tmp_path)
  )
  config.optimizer.lr = lr  # Resumed from step 2 with an absurd learning rate.
  with pytest.raises(train.TrainingDivergedError, match=message) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert "the latest checkpoint (step 2) is untouched" in str(error.value)
  assert _checkpoint_steps(tmp_path) == [1, 2]
  restored = _params(tmp_path, 2)
  assert all(np.all(np.isfinite(x)) and np.abs(x).max() < 1e3 for x in jax.tree.leaves(restored))


def test_non_finite_inputs_are_named_as_the_cause(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.input.mean = (float("inf"),) * 3
  with pytest.raises(train.TrainingDivergedError, match="the input batch holds NaN or infinite"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or _checkpoint_steps(tmp_path) == []


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  config = tiny_config(tmp_path / "empty_data_dir")
  config.input.dataset = "cifar10"
  with pytest.raises(
    pipeline.DatasetNotPreparedError, match=r"(?s)Dataset 'cifar10' .*tfds build cifar10"
  ):
    train.train_and_evaluate(config, str(tmp_path / "workdir"))


def _run_main(workdir, data_dir, *flags, model="crate", **popen_kwargs):
  command = [
    sys.executable,
    "-m",
    "crate_jax.main",
    f"--config=configs/demo.py:model={model},width=16,depth=2,heads=2,patch=4",
    f"--workdir={workdir}",
    f"--config.input.dataset=crate_shapes/{TINY.name}",
    f"--config.input.data_dir={data_dir}",
    "--config.input.image_size=16",
    "--config.input.global_batch_size=16",
    "--config.input.eval_batch_size=32",
    "--config.schedule.warmup_steps=2",
    "--config.log_every_steps=1",
    "--config.evals.eval.every_steps=0",
    *flags,
  ]
  return subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, **popen_kwargs)


def test_sigterm_saves_exits_cleanly_and_a_rerun_continues(data_dir, tmp_path):
  # A shared compilation cache spares the rerun most of its compilation.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  process = _run_main(
    tmp_path, data_dir, "--config.total_steps=100000", "--config.checkpoint_every_steps=0", env=env
  )
  log = []
  for line in process.stderr:  # Wait until training runs, then preempt it.
    log.append(line)
    if "steps/s" in line:
      process.send_signal(signal.SIGTERM)
      break
  log.extend(process.stderr)
  assert process.wait(timeout=120) == 0, "".join(log[-30:])
  saved = re.search(r"saved the checkpoint of step (\d+)", "".join(log))
  assert saved, "".join(log[-30:])
  step = int(saved.group(1))
  assert _checkpoint_steps(tmp_path) == [step]

  rerun = _run_main(tmp_path, data_dir, f"--config.total_steps={step + 2}", env=env)
  _, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-3000:]
  assert f"Resuming at step {step}" in err
  assert _checkpoint_steps(tmp_path)[-1] == step + 2
  assert "eval/top1=" in err


@pytest.mark.parametrize(
  "model,axis", [("crate", "data"), ("crate_alpha", "fsdp"), ("vit", "fsdp")]
)
def test_every_model_family_trains_through_main_on_a_sharded_mesh(data_dir, tmp_path, model, axis):
  """Two single-threaded CPU devices, data parallel or with parameters sharded (FSDP)."""
  sizes = {"data": 2, "fsdp": 1} if axis == "data" else {"data": 1, "fsdp": 2}
  run = _run_main(
    tmp_path,
    data_dir,
    "--cpu_devices=2",
    "--config.total_steps=2",
    f"--config.mesh.axes=(('data', {sizes['data']}), ('fsdp', {sizes['fsdp']}), ('tensor', 1))",
    *(["--config.evals.rate_reduction.num_images=8"] if model != "vit" else []),
    model=model,
  )
  _, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-3000:]
  assert f"2 devices, mesh {dict(sizes, tensor=1)}" in err, err[-3000:]
  assert re.search(r"train/loss=\d", err) and re.search(r"eval/top1=", err), err[-3000:]
  assert _checkpoint_steps(tmp_path) == [2]


def _tiny_setup(data_dir) -> types.SimpleNamespace:
  """The tiny config's model, optimizer, mesh, shardings and initial (sharded) state."""
  config = tiny_config(data_dir)
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  mesh, rules = sharding.create_mesh(config), sharding.logical_rules(config)
  schedule = optax.constant_schedule(1e-3)
  tx = optim.create_optimizer(config.optimizer, schedule, train_state.abstract_params(model, 16))
  with sharding.use_mesh(mesh, rules):
    abstract, specs = train_state.abstract_train_state(model, tx, 16)
    shardings = sharding.state_shardings(specs, abstract, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    state = train_state.create_train_state(model, tx, 16, 0, shardings)
  return types.SimpleNamespace(
    config=config,
    model=model,
    mesh=mesh,
    rules=rules,
    schedule=schedule,
    tx=tx,
    shardings=shardings,
    batch_sharding=batch_sharding,
    state=state,
  )


def test_gradient_accumulation_equals_the_big_batch_step(data_dir):
  batch = next(pipeline.make_train_iterator(tiny_config(data_dir).input, seed=0))
  setup = _tiny_setup(data_dir)
  with sharding.use_mesh(setup.mesh, setup.rules):
    results = []
    for accum in (1, 4):
      step = train_state.make_train_step(
        tasks.get_task(setup.config),
        setup.model,
        setup.tx,
        setup.schedule,
        setup.shardings,
        setup.batch_sharding,
        grad_accum_steps=accum,
      )
      state = jax.tree.map(jnp.copy, setup.state)  # The step donates its input.
      state, metrics, _ = step(state, sharding.put_batch(batch, setup.batch_sharding))
      results.append((jax.device_get(state.params), jax.device_get(metrics.compute())))
  (params_1, metrics_1), (params_4, metrics_4) = results
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_4, params_1
  )
  for name in ("loss", "grad_norm", "update_norm"):
    np.testing.assert_allclose(metrics_4[name], metrics_1[name], rtol=1e-4)


def test_evaluation_counts_every_example_once_over_uneven_batches(data_dir):
  setup = _tiny_setup(data_dir)
  config, model, state = setup.config, setup.model, setup.state
  with sharding.use_mesh(setup.mesh, setup.rules):
    context = evaluators.Context(
      model,
      config.input,
      batch_sharding=setup.batch_sharding,
      param_shardings=setup.shardings.params,
    )
    results = classification.Evaluator(context).run(state.params)
  batches = list(pipeline.make_eval_iterator(config.input))
  assert [len(b["label"]) for b in batches] == [32, 32, 32]
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  logits, _ = jax.jit(model.apply)({"params": state.params}, images)
  assert results["num_examples"] == len(labels) == TINY.test_size
  np.testing.assert_allclose(results["top1"], np.mean(np.argmax(logits, -1) == labels), rtol=1e-6)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  np.testing.assert_allclose(results["loss"], loss, rtol=1e-5)


def test_pretrained_parameters_fit_a_new_head_and_resolution(data_dir):
  model = _tiny_setup(data_dir).model
  source = flax.linen.unbox(
    jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"])
  )
  target = train_state.abstract_params(
    model.clone(num_classes=7, image_size=24, scan_layers=True), 24
  )
  adapted = pretrained.adapt(source, target)
  assert ("head", "kernel") not in adapted and ("head", "bias") not in adapted
  assert adapted[("pos_embedding",)].shape == (1, 1 + 6 * 6, 16)
  np.testing.assert_array_equal(adapted[("pos_embedding",)][:, 0], source["pos_embedding"][:, 0])
  np.testing.assert_array_equal(
    adapted[("encoder", "layers", "ista", "D")][1], source["encoder"]["layer_1"]["ista"]["D"]
  )
  with pytest.raises(ValueError, match="do not fit config.model"):
    pretrained.adapt(source, train_state.abstract_params(model.clone(width=32), 16))


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("schedule.warmup_steps", 50, r"config.schedule: warmup_steps \(50\)"),
    ("optimizer.name", "adam", r"config.optimizer: optimizer.name='adam' has no weight decay"),
    ("mesh.axes", (("data", 3),), r"config.mesh: Mesh \{'data': 3\} does not divide"),
    ("input.num_classes", 5, r"input.num_classes=5, but crate_shapes/train_tiny has 10 classes"),
    ("input.global_batch_size", 192, r"global_batch_size=192 exceeds the 96 examples"),
    (
      "init.checkpoint",
      "/nonexistent/run",
      r"config.init: init.checkpoint='/nonexistent/run' does not",
    ),
  ],
)
def test_inconsistent_config_is_a_config_error_before_anything_is_written(
  data_dir, tmp_path, field, value, message
):
  config = tiny_config(data_dir, **{field: value})
  with pytest.raises(config_utils.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # No config.json, event file or checkpoint.


def test_a_checkpoint_of_another_model_is_refused_naming_the_differences(data_dir, tmp_path):
  train.train_and_evaluate(tiny_config(data_dir, total_steps=2), str(tmp_path))
  config_before = (tmp_path / "config.json").read_text()
  events_before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(checkpointing.CheckpointError, match=r"model.width: 16 -> 32"):
    train.train_and_evaluate(tiny_config(data_dir, **{"model.width": 32}), str(tmp_path))
  # Nothing written: the workdir still describes its checkpoints.
  assert (tmp_path / "config.json").read_text() == config_before
  assert sorted(p.name for p in tmp_path.iterdir()) == events_before
  # As an init checkpoint of another width: one clear error too.
  config = tiny_config(data_dir, **{"model.width": 32, "init.checkpoint": str(tmp_path)})
  with pytest.raises(config_utils.ConfigError, match=r"pretrained shapes do not fit config.model"):
    train.train_and_evaluate(config, str(tmp_path / "finetune"))


def test_unreadable_init_checkpoint_is_one_clear_error(data_dir, tmp_path):
  step = tmp_path / "run" / "checkpoints" / "3" / "state"
  step.mkdir(parents=True)
  (step / "_METADATA").write_text("{broken")
  config = tiny_config(data_dir, **{"init.checkpoint": str(tmp_path / "run")})
  with pytest.raises(config_utils.ConfigError, match=r"config.init: .* cannot be read"):
    train.train_and_evaluate(config, str(tmp_path / "finetune"))


@pytest.mark.parametrize("case", ["workdir_is_a_file", "missing_config_file"])
def test_main_reports_bad_paths_in_one_line(data_dir, tmp_path, case):
  (tmp_path / "file").write_text("")
  flags = [f"--workdir={tmp_path / 'file'}"] if case == "workdir_is_a_file" else []
  if case == "missing_config_file":
    command = [
      sys.executable,
      "-m",
      "crate_jax.main",
      "--config=configs/nope.py",
      f"--workdir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    message = "no such config file 'configs/nope.py'"
  else:
    process = _run_main(tmp_path / "unused", data_dir, *flags)
    _, err = process.communicate(timeout=300)
    result = types.SimpleNamespace(returncode=process.returncode, stderr=err)
    message = "is a file, not a directory"
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert message in result.stderr.strip().splitlines()[-1]
