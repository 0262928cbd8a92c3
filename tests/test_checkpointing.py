"""Checkpoint saving, retention, restoring with the data iterator, unreadable-checkpoint fallback,
integrity digests, interrupted deletions, one-line warnings and the SIGTERM flag
(crate_jax.checkpointing). Whole-run resume and preemption are tested in test_train.py; two
processes in test_checkpoint_multihost.py."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import checkpointing
from crate_jax import preemption

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def test_sigterm_sets_the_flag_and_the_handler_is_restored(tmp_path, monkeypatch):
  monkeypatch.setattr(preemption, "_requested", threading.Event())
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=1)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher(checkpointer.manager) as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
  checkpointer.close()


# Integrity: random bytes written into the array files.


def _random_state(step: int):
  # Blocks above orbax's 1 KiB inline limit, so that they go to the data files; random values
  # (zstd cannot shrink them) make the data files mostly array bytes. Large enough that 64
  # random bytes mostly change values without a read error: once, without digests, 19 of
  # seeds 0-19 restored changed values silently; with them, 20 of 20 fell back by a digest
  # mismatch (which bytes a seed hits varies from run to run: the files' names are random).
  rng = np.random.default_rng(step)
  return {
    "w": jnp.asarray(rng.standard_normal((256, 256), np.float32)),
    "mu": {"w": jnp.asarray(rng.standard_normal((256, 256), np.float32))},
    "b": jnp.asarray(rng.standard_normal((4096,), np.float32).astype(jnp.bfloat16)),
    "step": jnp.asarray(step, jnp.int32),
  }


def _abstract_of(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _array_files(step_dir):
  return sorted(p for p in pathlib.Path(step_dir, "state").rglob("*") if p.parent.name == "d")


def _iterator_after(steps: int):
  iterator = _iterator()
  for _ in range(steps):
    next(iterator)
  return iterator


def _write_random_bytes(files, seed, count=64):
  """Writes `count` random bytes at random offsets (uniform over all bytes) into `files`."""
  rng = np.random.default_rng(seed)
  sizes = np.array([os.path.getsize(f) for f in files])
  for _ in range(count):
    i = rng.choice(len(files), p=sizes / sizes.sum())
    with open(files[i], "r+b") as f:
      f.seek(int(rng.integers(sizes[i])))
      f.write(bytes([int(rng.integers(256))]))


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_in_the_array_files_fall_back_to_the_previous_step(tmp_path, caplog, seed):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  iterator = _iterator()
  for step in (1, 2):
    next(iterator)
    checkpointer.save(step, _random_state(step), iterator)
  checkpointer.close()
  expected_next = next(_iterator_after(1))
  _write_random_bytes(_array_files(tmp_path / "ckpt" / "2"), seed)

  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  restored_iterator = _iterator()
  with caplog.at_level(logging.WARNING):
    state = checkpointer.restore_latest(_abstract_of(_random_state(0)), restored_iterator)
  checkpointer.close()
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_random_state(1))):
    np.testing.assert_array_equal(got, want)  # Bitwise: the previous step, whole.
  np.testing.assert_array_equal(next(restored_iterator), expected_next)
  (unreadable,) = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert "/ckpt/2 is unreadable (" in unreadable and "\n" not in unreadable, unreadable
  (moved,) = os.listdir(tmp_path / checkpointing.UNREADABLE_DIR)
  assert moved.startswith("2-")


def test_changed_array_bytes_that_read_fine_are_caught_by_the_digests(tmp_path, caplog):
  def state(step):  # Random bits, under zstd's 128 KiB block: stored raw, in one block.
    bits = np.random.default_rng(step).integers(0, 2**32, (160, 160), dtype=np.uint32)
    return {"bits": jnp.asarray(bits), "step": jnp.asarray(step, jnp.int32)}

  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  for step in (1, 2):
    checkpointer.save(step, state(step))
  checkpointer.close()
  largest = max(_array_files(tmp_path / "ckpt" / "2"), key=os.path.getsize)
  size = os.path.getsize(largest)
  rng = np.random.default_rng(0)
  with open(largest, "r+b") as f:  # The middle half: array values, no header or index.
    for offset in rng.integers(size // 4, 3 * size // 4, 64):
      f.seek(int(offset))
      f.write(bytes([int(rng.integers(256))]))

  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  with caplog.at_level(logging.WARNING):
    restored = checkpointer.restore_latest(_abstract_of(state(0)))
  checkpointer.close()
  np.testing.assert_array_equal(restored["bits"], state(1)["bits"])
  (unreadable,) = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert "(CorruptCheckpointError: 1 array block(s) differ from their saved digests, " in (
    unreadable
  )


def test_digests_cover_every_array_block_and_detect_one_flipped_bit(tmp_path):
  state = _random_state(3)
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=1, async_save=False)
  checkpointer.save(3, state)
  checkpointer.close()
  records = checkpointing.read_digests(tmp_path / "ckpt" / "3" / checkpointing.INTEGRITY_ITEM)
  assert sorted(records) == ["['b']", "['mu']['w']", "['step']", "['w']"]
  assert checkpointing.verify_digests(state, records) == (4, 0)

  bits = np.asarray(state["w"]).view(np.uint32).copy()
  bits[17, 5] ^= 1 << 9
  flipped = dict(state, w=jnp.asarray(bits.view(np.float32)))
  with pytest.raises(checkpointing.CorruptCheckpointError, match=r"1 array block.*\['w'\]"):
    checkpointing.verify_digests(flipped, records)
  # A change of dtype since the save is not corruption: those blocks go unverified.
  recast = dict(state, b=state["b"].astype(jnp.float32))
  assert checkpointing.verify_digests(recast, records) == (3, 1)


@pytest.mark.parametrize(
  "damage", [lambda f: f.unlink(), lambda f: f.write_text('{"format": "crate_jax/block-fm')]
)
def test_a_lost_or_garbled_digest_record_falls_back_to_the_previous_step(tmp_path, damage):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  for step in (1, 2):
    checkpointer.save(step, _random_state(step))
  checkpointer.close()
  damage(tmp_path / "ckpt" / "2" / checkpointing.INTEGRITY_ITEM / "process_0-of-1.json")
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  assert int(checkpointer.restore_latest(_abstract_of(_random_state(0)))["step"]) == 1
  checkpointer.close()


def test_checkpoints_without_digests_restore_unverified(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5, integrity=False)
  checkpointer.save(1, _random_state(1))
  checkpointer.close()
  assert not (tmp_path / "ckpt" / "1" / checkpointing.INTEGRITY_ITEM).exists()
  checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=5)
  assert int(checkpointer.restore_latest(_abstract_of(_random_state(0)))["step"]) == 1
  checkpointer.close()


# Deletion of old checkpoints cut short.


@pytest.mark.parametrize("files_deleted", [0, 3])
def test_an_interrupted_deletion_leaves_no_extra_step_and_is_removed_quietly(
  tmp_path, monkeypatch, caplog, files_deleted
):
  directory = tmp_path / "ckpt"

  def killed_while_deleting(path):  # The job dies after deleting `files_deleted` files.
    for f in sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())[:files_deleted]:
      f.unlink()
    raise KeyboardInterrupt

  checkpointer = checkpointing.Checkpointer(directory, max_to_keep=2)
  for step in (1, 2, 3):
    if step == 3:
      monkeypatch.setattr(checkpointing, "_remove_tree", killed_while_deleting)
    checkpointer.save(step, _state(step))
    checkpointer.manager.wait_until_finished()
    steps = sorted(int(p) for p in os.listdir(directory) if p.isdigit())
    assert steps == [1, 2, 3][max(0, step - 2) : step]  # Never more than max_to_keep.
  with pytest.raises(KeyboardInterrupt):
    checkpointer.wait()  # Step 1, renamed out of sight by orbax, is being deleted.
  checkpointer.manager.close()
  monkeypatch.undo()
  assert (directory / checkpointing.DELETING_DIR / "1").exists()

  with caplog.at_level(logging.WARNING):
    checkpointer = checkpointing.Checkpointer(directory, max_to_keep=2)
    state = checkpointer.restore_latest(_abstract())
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert int(state["step"]) == 3
  assert sorted(os.listdir(directory)) == ["2", "3"]  # The leftovers are gone.
  checkpointer.save(4, _state(4))
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ["3", "4"]


def test_a_step_left_over_by_a_kill_before_its_deletion_goes_at_the_next_restore(tmp_path, caplog):
  # What a job killed between committing step 3 and deleting step 1 leaves (max_to_keep 2).
  _save_steps(tmp_path / "ckpt", [1, 2, 3], max_to_keep=3)
  with caplog.at_level(logging.WARNING):
    checkpointer = checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    assert int(checkpointer.restore_latest(_abstract())["step"]) == 3
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]
  assert checkpointer.manager.all_steps() == [2, 3]
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  checkpointer.close()


# What an unreadable checkpoint writes to the log: one short line.

_LOG_SCRIPT = """
import os, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from crate_jax import checkpointing
from crate_jax import preemption

directory, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
def state(step):  # Many arrays: many reads in flight when the first one fails.
  rng = np.random.default_rng(step)
  arrays = {f"a{i}": jnp.asarray(rng.standard_normal((16, 32), np.float32)) for i in range(96)}
  return dict(arrays, step=jnp.asarray(step, jnp.int32))
checkpointer = checkpointing.Checkpointer(directory, max_to_keep=5)
for step in (1, 2, 3, 4):
  checkpointer.save(step, state(step))
checkpointer.close()
rng = np.random.default_rng(0)
for step in (2, 3, 4):  # Three failed restores: whether reads are left in flight is chance.
  state_dir = directory / str(step) / "state"
  files = sorted(p for p in state_dir.rglob("*") if p.parent.name == "d")
  if mode == "deleted_manifest":
    (state_dir / "manifest.ocdbt").unlink()
  elif mode == "truncated":
    for f in files:
      os.truncate(f, os.path.getsize(f) // 3)
  else:
    for f in files:
      with open(f, "r+b") as out:
        out.seek(int(rng.integers(os.path.getsize(f))))
        out.write(bytes(rng.integers(256, size=8, dtype=np.uint8)))
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
checkpointer = checkpointing.Checkpointer(directory, max_to_keep=5)
print("RESTORED", int(checkpointer.restore_latest(abstract)["step"]), flush=True)
checkpointer.close()
"""


@pytest.mark.parametrize("mode", ["deleted_manifest", "truncated", "random_bytes"])
def test_an_unreadable_checkpoint_is_reported_in_one_short_line(tmp_path, mode):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run(
    [sys.executable, "-c", _LOG_SCRIPT, str(tmp_path / "ckpt"), mode],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  output = result.stdout + result.stderr
  assert result.returncode == 0 and "RESTORED 1" in result.stdout, output[-3000:]
  lines = result.stderr.splitlines()
  assert "Event loop is closed" not in output and "Traceback" not in output, output[-3000:]
  assert "tensorstore_spec" not in output and "TensorStore details" not in output
  unreadable = [line for line in lines if "is unreadable" in line]
  assert [line.split("/ckpt/")[1].split()[0] for line in unreadable] == ["4", "3", "2"], lines
  for line in unreadable:
    cause = line.split(" is unreadable (", 1)[1].rsplit("); trying", 1)[0]
    assert len(cause) <= 200, line
  assert len([line for line in lines if "Moved unreadable checkpoint" in line]) == 3
  assert max(len(line) for line in lines) < 400, lines
