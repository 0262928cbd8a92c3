r"""Training throughput of configs/demo.py on this machine: steps/s and images/s.

    python benchmarks/demo_steps.py [--config=configs/demo.py] [--steps=100]

Times the compiled train step alone on one fixed batch (compute), then fed by the real input
pipeline (end to end, as in training), after a warm-up; prints both and the model TFLOP/s.

Recorded numbers: benchmarks/README.md.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from crate_jax import config_utils
from crate_jax import optim
from crate_jax import sharding
from crate_jax import tasks
from crate_jax import train_state
from crate_jax import xla_cpu
from crate_jax.data import pipeline
from crate_jax.models import get_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config to time.")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per measurement.")


def main(argv):
  del argv
  xla_cpu.reuse_freed_memory()  # As crate_jax.main does.
  config = _CONFIG.value
  config_utils.validate(config)
  pipeline.prepare_dataset(config.input)
  batch_size, image_size = config.input.global_batch_size, config.input.image_size
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  schedule = optim.create_schedule("constant", base_lr=config.optimizer.lr, total_steps=1)
  params = train_state.abstract_params(model, image_size)
  tx = optim.create_optimizer(config.optimizer, schedule, params)
  mesh, rules = sharding.create_mesh(config), sharding.logical_rules(config)
  with sharding.use_mesh(mesh, rules):
    abstract, specs = train_state.abstract_train_state(model, tx, image_size)
    shardings = sharding.state_shardings(specs, abstract, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    state = train_state.create_train_state(model, tx, image_size, config.seed, shardings)
    task = tasks.get_task(config)
    compiled = train_state.compile_train_step(
      task,
      model,
      tx,
      schedule,
      abstract,
      shardings,
      batch_sharding,
      batch_size=batch_size,
      grad_accum_steps=config.grad_accum_steps,
    )
    keys = task.batch_spec(batch_size)
    iterator = pipeline.make_train_iterator(config.input, seed=0)

    def next_batch():
      return sharding.put_batch(
        {k: v for k, v in next(iterator).items() if k in keys}, batch_sharding
      )

    batch = next_batch()
    flops = 3 * model.forward_flops(batch_size) / jax.device_count()
    for _ in range(3):  # Warm-up.
      state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics)

    def timed(get_batch):
      nonlocal state
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, step_metrics, _ = compiled(state, get_batch())
      jax.block_until_ready(step_metrics)
      return _STEPS.value / (time.perf_counter() - start)

    compute = timed(lambda: batch)
    end_to_end = timed(next_batch)
  print(
    f"{config.model_name} {model.dims()}, batch {batch_size}, {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s), load average {os.getloadavg()[0]:.1f}"
  )
  print(
    f"compute:    {compute:.2f} steps/s, {compute * batch_size:.0f} img/s, "
    f"{compute * flops / 1e12:.3f} model TFLOP/s per device"
  )
  print(f"end to end: {end_to_end:.2f} steps/s, {end_to_end * batch_size:.0f} img/s")


if __name__ == "__main__":
  app.run(main)
