"""Checkpoint saving, retention, restoring with the data iterator, unreadable-checkpoint fallback
and the SIGTERM flag (crate_jax.checkpointing). Whole-run resume and preemption are tested in
test_train.py."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import checkpointing


def _state(value: float):
  return {"w": jnp.full((3, 2), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _abstract():
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0.0)
  )


def _iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


def _save_steps(directory, steps, **kwargs):
  checkpointer = checkpointing.Checkpointer(
    directory, max_to_keep=kwargs.pop("max_to_keep", 5), **kwargs
  )
  iterator = _iterator()
  for step in steps:
    next(iterator)
    checkpointer.save(step, _state(step), iterator)
  checkpointer.wait()
  checkpointer.close()
  return iterator


def test_restores_the_state_and_the_data_position(tmp_path):
  iterator = _save_steps(tmp_path / "ckpt", [1, 2, 3])
  expected_next = next(iterator)

  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  restored_iterator = _iterator()
  state = checkpointer.restore_latest(_abstract(), restored_iterator)
  np.testing.assert_array_equal(state["w"], np.full((3, 2), 3.0))
  assert int(state["step"]) == 3
  np.testing.assert_array_equal(next(restored_iterator), expected_next)
  checkpointer.close()


def test_no_checkpoint_restores_nothing(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  assert checkpointer.restore_latest(_abstract()) is None
  checkpointer.close()


def test_keeps_the_latest_and_every_keep_period_step(tmp_path):
  _save_steps(tmp_path / "ckpt", range(1, 10), max_to_keep=2, keep_period=4)
  assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt")) == [4, 8, 9]


def _corrupt_empty(step_dir):
  for root, _, files in os.walk(step_dir, topdown=False):
    for name in files:
      os.remove(os.path.join(root, name))
    if root != str(step_dir):
      os.rmdir(root)


def _corrupt_truncate(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 3)


@pytest.mark.parametrize("corrupt", [_corrupt_empty, _corrupt_truncate])
def test_unreadable_latest_is_moved_aside_for_the_previous(tmp_path, corrupt):
  _save_steps(tmp_path / "ckpt", [1, 2])
  corrupt(tmp_path / "ckpt" / "2")

  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  state = checkpointer.restore_latest(_abstract(), _iterator())
  assert int(state["step"]) == 1
  assert checkpointer.latest_step() == 1
  moved = os.listdir(tmp_path / checkpointing.UNREADABLE_DIR)
  assert len(moved) == 1 and moved[0].startswith("2-")  # Kept for inspection.
  checkpointer.save(2, _state(2.0))  # The step can be written again.
  checkpointer.wait()
  assert checkpointer.latest_step() == 2
  checkpointer.close()


def test_an_empty_step_directory_is_skipped(tmp_path):
  _save_steps(tmp_path / "ckpt", [5])
  os.mkdir(tmp_path / "ckpt" / "7")  # What a job killed while creating it leaves.
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  assert int(checkpointer.restore_latest(_abstract())["step"]) == 5
  checkpointer.close()


def test_nothing_readable_raises_and_moves_nothing(tmp_path):
  _save_steps(tmp_path / "ckpt", [1])
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  other_shapes = {"w": jax.ShapeDtypeStruct((5,), jnp.float32), "step": _abstract()["step"]}
  with pytest.raises(checkpointing.CheckpointError, match="None of the checkpoints"):
    checkpointer.restore_latest(other_shapes)
  assert os.listdir(tmp_path / "ckpt") == ["1"]
  checkpointer.close()


def test_sigterm_sets_the_flag_and_the_handler_is_restored(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=1)
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionWatcher(checkpointer.manager) as preemption:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
  checkpointer.close()
