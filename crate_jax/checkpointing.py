"""Checkpoints of the train state and the input pipeline (preemption: `crate_jax.preemption`).

A checkpoint `workdir/checkpoints/<step>/` holds three orbax items: `state` (params,
optimizer state, step and RNG, saved asynchronously from the devices), `data` (the grain
iterator's position, one small JSON file per process) and `integrity` (a digest of every
saved array block, one small JSON file per process). Restoring them continues a run exactly
where it stopped: a resumed run ends with the parameters of an uninterrupted one (bitwise on
CPU).

What a restore guarantees:

* Integrity. Every array block that has a digest (the shards of the saved arrays, see
  `_dispatch_digests` for what has none) is restored with the bits saved, unless a change
  collides with its 64-bit digest (accidental changes: about 2^-64; the digest does not
  resist forgery). A checkpoint that cannot be read, or whose arrays differ from their
  digests, is skipped for the previous one and moved to a sibling `unreadable_checkpoints/`
  directory, never deleted. Blocks restored into another dtype or sharding than saved, and
  checkpoints written without digests (before they existed, or with `integrity=False`), are
  restored unverified, with an info line. The `data` item (the iterator position) has no
  digest.
* Agreement. With several processes, all of them restore the same step: each process
  tries the candidate, the outcomes are combined across processes, and all move on to the
  previous step together if any of them failed.
* Retention. An old checkpoint leaves orbax's sight with one atomic rename (into
  `<directory>/.deleting/`) before its files are deleted, so a job killed during the
  deletion leaves no half-deleted step behind; what it leaves in `.deleting/` is removed
  quietly by the next `Checkpointer` on the directory. (Not on gs://, where orbax ignores
  the rename option and deletes in place.)
* Logs. An unreadable checkpoint is reported in one line, its cause cut to ~200 characters;
  the reads that orbax abandons when one fails stay silent.

Every process calls every method here: orbax coordinates the processes, writes each
array shard from the process that holds it and the metadata from process 0.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging as std_logging
import math
import os
import re
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import grain.checkpoint
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

UNREADABLE_DIR = "unreadable_checkpoints"
DELETING_DIR = ".deleting"  # Inside the checkpoint directory; not a step name to orbax.
INTEGRITY_ITEM = "integrity"
DIGEST_FORMAT = "crate_jax/block-fmix32x2-sum/1"
_CAUSE_CHARS = 200  # Longest cause quoted in a warning.


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be read."""


class CorruptCheckpointError(ValueError):
  """A checkpoint read without error, but its arrays differ from their saved digests."""


# --------------------------------------------------------------------------------------
# Array digests.
#
# Computed where the arrays live (a jitted program per array shape and sharding), so that a
# save copies nothing more off the devices and a restore nothing back; the digest of a block
# is the same on every backend (integer arithmetic only). Each process records the blocks
# of which it holds replica 0, so every block is recorded once whatever the replication.
# --------------------------------------------------------------------------------------


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every input bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _digestible(dtype) -> bool:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  dtype = np.dtype(dtype)
  return dtype.kind in "biufV" and jax.dtypes.itemsize_bits(dtype) in (8, 16, 32, 64)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32, one per element (8-byte elements: a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _block_digests(x: jax.Array, *, counts: tuple[int, ...], block: tuple[int, ...]) -> jax.Array:
  """Digests of the `counts` grid of `block`-shaped blocks of `x`: shape `counts + (2,)`.

  Two 32-bit lanes, each the wrapping sum over the block's words w_i (row-major i) of a
  bijection of w_i keyed by i (differently in each lane): a change of any one word always
  changes both lanes; other accidental changes (moved or several changed words) are missed
  with a probability of roughly 2^-64. Not a cryptographic hash: it does not resist forgery.
  """
  w = _words(x)
  trailing = w.shape[x.ndim :]
  w = w.reshape(tuple(d for c, b in zip(counts, block) for d in (c, b)) + trailing)
  n = len(counts)
  w = w.transpose(
    tuple(range(0, 2 * n, 2)) + tuple(range(1, 2 * n, 2)) + tuple(range(2 * n, w.ndim))
  )
  w = w.reshape(counts + (math.prod(block) * math.prod(trailing),))
  i = lax.broadcasted_iota(jnp.uint32, w.shape, w.ndim - 1)
  a = _fmix32(w ^ (i * np.uint32(0x9E3779B9) + np.uint32(0x632BE5AB)))
  b = _fmix32(w + _fmix32(i * np.uint32(0x7FEB352D) + np.uint32(0x68E31DA4)))
  return jnp.stack([a.sum(-1, dtype=jnp.uint32), b.sum(-1, dtype=jnp.uint32)], axis=-1)


@functools.lru_cache(maxsize=512)
def _digest_program(counts, block, out_sharding):
  fn = functools.partial(_block_digests, counts=counts, block=block)
  if out_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=out_sharding)


@dataclasses.dataclass(frozen=True)
class _PendingDigests:
  """Digests of one array, possibly still being computed on its devices."""

  path: str
  dtype: str
  block: tuple[int, ...]
  digests: jax.Array  # counts + (2,), sharded like the array's blocks.

  def local_blocks(self) -> dict[str, str]:
    """`{"start:stop,...": hex digest}` of the blocks of replica 0 on this process."""
    blocks = {}
    for shard in self.digests.addressable_shards:
      if shard.replica_id != 0:
        continue
      values = np.asarray(shard.data)
      starts = [s.start or 0 for s in shard.index[:-1]]
      for offset in np.ndindex(*values.shape[:-1]):
        coords = [s + o for s, o in zip(starts, offset)]
        key = ",".join(f"{c * b}:{(c + 1) * b}" for c, b in zip(coords, self.block))
        a, b = values[offset]
        blocks[key] = f"{int(a):08x}{int(b):08x}"
    return blocks


def _dispatch_digests(tree: Any) -> list[_PendingDigests]:
  """Starts computing the block digests of every array leaf of `tree`; does not block.

  Blocks are the shards of a `NamedSharding` (evenly divisible shapes only) or the whole
  array when it is replicated. Not digested: arrays sharded otherwise or in host memory,
  empty ones, 4-bit and complex dtypes, and leaves that are not arrays.
  """
  pending = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, np.ndarray):
      leaf = jnp.asarray(leaf)
    if not isinstance(leaf, jax.Array) or leaf.size == 0 or not _digestible(leaf.dtype):
      continue
    sharding, shape = leaf.sharding, leaf.shape
    if getattr(sharding, "memory_kind", None) not in (None, "device"):
      continue  # Host-offloaded: the digest programs run on device memory.
    if isinstance(sharding, jax.sharding.NamedSharding):
      block = tuple(sharding.shard_shape(shape))
      if any(s % b for s, b in zip(shape, block)):
        continue
      spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
      out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
    elif sharding.is_fully_replicated:
      block, out = tuple(shape), None
    else:
      continue
    counts = tuple(s // b for s, b in zip(shape, block))
    digests = _digest_program(counts, block, out)(leaf)
    pending.append(_PendingDigests(jax.tree_util.keystr(path), str(leaf.dtype), block, digests))
  return pending


def _digest_record(pending: list[_PendingDigests]) -> dict[str, Any]:
  """This process's JSON record of `pending` (waits for the digests)."""
  arrays = {p.path: {"dtype": p.dtype, "blocks": p.local_blocks()} for p in pending}
  return {"format": DIGEST_FORMAT, "arrays": arrays}


def _digest_filename(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


def read_digests(directory: epath.PathLike) -> dict[str, dict[str, Any]]:
  """Merges the digest records of all processes in an `integrity` item directory.

  Returns:
    `{array path: {"dtype": str, "blocks": {block: hex digest}}}`.

  Raises:
    CorruptCheckpointError: a process's record is missing, unparsable or contradicts
      another's.
  """
  directory = epath.Path(directory)
  names = sorted(p.name for p in directory.glob("process_*-of-*.json"))
  counts = {n.rsplit("-of-", 1)[1].removesuffix(".json") for n in names}
  if len(counts) != 1 or not next(iter(counts)).isdigit():
    raise CorruptCheckpointError(f"digest records {names} in {directory} are not one set")
  count = int(counts.pop())
  merged: dict[str, dict[str, Any]] = {}
  for index in range(count):
    name = _digest_filename(index, count)
    try:
      record = json.loads((directory / name).read_text())
      if record["format"] != DIGEST_FORMAT:
        raise ValueError(f"format {record['format']!r}, not {DIGEST_FORMAT}")
      for path, array in record["arrays"].items():
        entry = merged.setdefault(path, {"dtype": array["dtype"], "blocks": {}})
        for key, value in array["blocks"].items():
          if entry["blocks"].setdefault(key, value) != value:
            raise ValueError(f"it contradicts another record on {path}[{key}]")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
      raise CorruptCheckpointError(f"digest record {name}: {_cause(e)}") from e
  return merged


def verify_digests(tree: Any, records: dict[str, dict[str, Any]]) -> tuple[int, int]:
  """Checks the arrays of `tree` (on this process) against `read_digests`'s records.

  Every process must call it on the same tree (the digests are computed by programs
  over the arrays' devices). Blocks whose dtype or sharding differs from the save's have
  no record and are counted as unverified.

  Returns:
    (verified blocks, unverified blocks).

  Raises:
    CorruptCheckpointError: a block differs from its recorded digest.
  """
  verified, unverified, mismatched = 0, 0, []
  for pending in _dispatch_digests(tree):
    record = records.get(pending.path)
    for key, value in pending.local_blocks().items():
      expected = (
        None if record is None or record["dtype"] != pending.dtype else record["blocks"].get(key)
      )
      if expected is None:
        unverified += 1
      elif expected == value:
        verified += 1
      else:
        mismatched.append(f"{pending.path}[{key}]")
  if mismatched:
    raise CorruptCheckpointError(
      f"{len(mismatched)} array block(s) differ from their saved digests, first {mismatched[0]}"
    )
  return verified, unverified


class DigestsHandler(ocp.handlers.AsyncCheckpointHandler):
  """Orbax handler of the `integrity` item: one JSON record of digests per process.

  The record is written in the save's background commit, inside the step's temporary
  directory, so it is committed (or not) atomically with the arrays it describes.
  """

  async def async_save(self, directory: epath.Path, args: DigestsSave):
    return [
      ocp.future.CommitFutureAwaitingContractedSignals(
        self._write(directory, args.pending), name="crate_jax_digests"
      )
    ]

  async def _write(self, directory: epath.Path, pending: list[_PendingDigests]) -> None:
    self.save(directory, DigestsSave(pending))

  def save(self, directory: epath.Path, args: DigestsSave) -> None:
    filename = _digest_filename(jax.process_index(), jax.process_count())
    (epath.Path(directory) / filename).write_text(json.dumps(_digest_record(args.pending)))

  def restore(self, directory: epath.Path, args: DigestsRestore | None = None):
    del args
    return read_digests(directory)

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DigestsHandler, for_save=True)
@dataclasses.dataclass
class DigestsSave(ocp.args.CheckpointArgs):
  pending: list[_PendingDigests]


@ocp.args.register_with_handler(DigestsHandler, for_restore=True)
@dataclasses.dataclass
class DigestsRestore(ocp.args.CheckpointArgs):
  pass


# --------------------------------------------------------------------------------------
# Quiet logs after a failed restore.
#
# Orbax runs a restore's reads as asyncio tasks on a loop that it closes as soon as one read
# fails (orbax/_src/asyncio_utils.py: `_run_sync_via_new_loop`), without cancelling or
# awaiting the others. Each TensorStore read still in flight then completes into the closed
# loop: `call_soon_threadsafe` raises "Event loop is closed", reported through
# `sys.unraisablehook` (one traceback per read, from TensorStore's threads, possibly after
# `restore_latest` returned). When collected, the abandoned coroutines re-raise their
# GeneratorExit wrapped with the TensorStore spec (orbax's `_read_array_index_and_device_put`
# catches BaseException), and the abandoned tasks and TensorStore futures that had failed
# log "Task (or Future) exception was never retrieved" with the spec. Only these reports are
# dropped, and only in a process that restored (the filters are installed by
# `restore_latest`, before its first read: the first reports can come before orbax's error
# reaches us); everything else reaches the previous hook and handlers.
# --------------------------------------------------------------------------------------

_quieting_lock = threading.Lock()
_quieting_installed = False


def _is_abandoned_read_report(unraisable) -> bool:
  """Whether `unraisable` comes from a read that a failed orbax restore abandoned."""
  obj = unraisable.object
  if inspect.iscoroutine(obj):  # Collected unfinished; orbax re-raises its GeneratorExit.
    return "/orbax/checkpoint/" in obj.cr_code.co_filename
  if obj is not None or not isinstance(unraisable.exc_value, RuntimeError):
    return False
  if str(unraisable.exc_value) != "Event loop is closed":
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    code = tb.tb_frame.f_code
    if code.co_name == "call_soon_threadsafe" and code.co_filename.endswith(
      os.path.join("asyncio", "base_events.py")
    ):
      return True
    tb = tb.tb_next
  return False


class _AbandonedTaskFilter(std_logging.Filter):
  """Drops asyncio's reports of the orbax reads (tasks, TensorStore futures) abandoned."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    abandoned = message.startswith(
      (
        "Task exception was never retrieved",
        "Future exception was never retrieved",
        "Task was destroyed but it is pending",
      )
    )
    # Orbax's read coroutines, or TensorStore's errors (which always carry their spec).
    return not (abandoned and ("/orbax/checkpoint/" in message or "tensorstore_spec" in message))


def _install_quieting() -> None:
  global _quieting_installed
  with _quieting_lock:
    if _quieting_installed:
      return
    previous = sys.unraisablehook

    def hook(unraisable):
      if _is_abandoned_read_report(unraisable):
        return
      previous(unraisable)

    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(_AbandonedTaskFilter())
    _quieting_installed = True


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ""
  # TensorStore appends its JSON specs (kilobytes) to its messages, and orbax the repr.
  text = re.sub(r"\s*(\[tensorstore_spec|See full TensorStore details).*$", "", text)
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _cause(error: BaseException) -> str:
  """One line: the first line of `error` (and of its root cause), at most ~200 chars."""
  text = _first_line(error)
  root = error
  for _ in range(8):  # Orbax wraps TensorStore's error, which says what is wrong.
    if root.__cause__ is None:
      break
    root = root.__cause__
  if root is not error and _first_line(root) not in text:
    text = f"{text} caused by {_first_line(root)}"
  return text if len(text) <= _CAUSE_CHARS else text[: _CAUSE_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------
# Agreement across processes.
# --------------------------------------------------------------------------------------


def _failed_processes(ok: bool) -> list[int]:
  """The processes that report `ok=False`; every process must call it."""
  if jax.process_count() == 1:
    return [] if ok else [0]
  flags = np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)
  return [i for i, flag in enumerate(flags) if not flag]


def _agreed_steps(steps: list[int]) -> list[int]:
  """Process 0's `steps`, on every process (file listings may differ between hosts)."""
  if jax.process_count() == 1:
    return steps
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  if not count:
    return []
  padded = np.full(count, -1, np.int32)
  if jax.process_index() == 0:
    padded[:] = steps
  return [int(s) for s in np.asarray(multihost_utils.broadcast_one_to_all(padded))]


def _remove_tree(path: epath.Path) -> None:
  """Deletes a step that orbax renamed out of its sight (tests patch it to die midway)."""
  path.rmtree()


class Checkpointer:
  """Saves and restores `(train state, data iterator)` under `directory`.

  Keeps the `max_to_keep` latest checkpoints and, with `keep_period`, also every step
  that is a multiple of it. No more step directories than that, except one more between a
  save's commit and the deletions that follow it (a job killed there leaves it until the
  next `restore_latest`); never a half-deleted one. A checkpoint that cannot be read
  (empty, truncated, corrupt, ...) is skipped in favour of the previous readable one, and
  moved to a sibling `unreadable_checkpoints/` directory for inspection: never deleted.

  Args:
    directory: where the step directories go.
    max_to_keep: how many of the latest checkpoints to keep.
    keep_period: also keep every step that is a multiple of it (0: none).
    async_save: write in the background (`save` returns once the arrays are off the
      devices).
    integrity: save a digest of every array block and verify it at restore.
  """

  def __init__(
    self,
    directory: epath.PathLike,
    *,
    max_to_keep: int,
    keep_period: int = 0,
    async_save: bool = True,
    integrity: bool = True,
  ):
    self.directory = epath.Path(directory)
    self._max_to_keep, self._keep_period = max_to_keep, keep_period
    self._integrity = integrity
    self._purge_failed = False
    self._purge_deleted()  # What a job killed during a deletion left.
    policies = [checkpoint_managers.LatestN(max_to_keep)]
    if keep_period:
      policies.append(checkpoint_managers.EveryNSteps(keep_period))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # Saves cut short (crash, kill -9) leave tmp dirs.
      # Old steps are renamed (atomic) into DELETING_DIR, not deleted in place: a deletion
      # cut short would leave a half-deleted step that orbax counts as a checkpoint.
      todelete_subdir=DELETING_DIR,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
    """Starts saving; returns once the arrays are copied off the devices.

    With `integrity`, their digests are computed on the devices by then too, and written
    with the arrays: the step appears in `directory` only once all is committed.
    """
    self.manager.wait_until_finished()  # As orbax's save does; then no deletion is running.
    self._purge_deleted()
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    pending = _dispatch_digests(state) if self._integrity else []
    if self._integrity:
      items[INTEGRITY_ITEM] = DigestsSave(pending)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    # The caller may donate the state's buffers next: let no digest still be reading them.
    jax.block_until_ready([p.digests for p in pending])

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> Any | None:
    """Restores the latest readable checkpoint into the shapes and shardings given.

    All processes restore the same step; a checkpoint that fails on any process (read
    error, digest mismatch) is skipped by all, with a one-line warning, and moved aside
    once a previous one restored.

    Args:
      abstract_state: `jax.ShapeDtypeStruct` tree (with shardings) of the state.
      data_iterator: a grain iterator whose position is restored in place.

    Returns:
      The restored state, or None when there is no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none is readable; typically the config
        changed (another model or optimizer) since they were written.
    """
    _install_quieting()  # Before any read: see "Quiet logs after a failed restore".
    steps = _agreed_steps(sorted(self.manager.all_steps(), reverse=True))
    # Reads on this process alone (no orbax barriers): a process whose read fails cannot
    # leave the others waiting in a barrier; the outcome is agreed on explicitly below.
    index = jax.process_index()
    reader = ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(),
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=index, active_processes={index}
      ),
    )
    unreadable: list[tuple[int, str]] = []
    try:
      for step in steps:
        state, error = self._read(reader, step, abstract_state, data_iterator)
        failed = _failed_processes(error is None)
        if not failed and self._integrity:  # Every process holds its part of the state.
          error = self._verify(step, state)
          failed = _failed_processes(error is None)
        if not failed:
          if unreadable:
            self._move_aside([s for s, _ in unreadable])
          self._delete_beyond_retention(steps[len(unreadable) :])
          logging.info("Restored checkpoint %s.", self.directory / str(step))
          return state
        unreadable.append((step, self._warn_unreadable(step, failed, error)))
        del state, error  # The error's traceback holds the state: free it before the next.
    finally:
      reader.close()
    if unreadable:
      raise CheckpointError(
        f"None of the checkpoints {[s for s, _ in unreadable]} in {self.directory} can be "
        f"read into the current config's state; the latest failed with {unreadable[0][1]}. "
        "If the config changed, use a new workdir."
      )
    return None

  def _read(self, reader, step, abstract_state, data_iterator):
    """Restores `step` on this process: (state, None), or (None, the error)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = reader.restore(self.directory / str(step), args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # Any failure: try the previous.
      return None, e
    return restored["state"], None

  def _verify(self, step: int, state: Any) -> CorruptCheckpointError | None:
    """Checks `state` against the digests saved with `step`; returns the mismatch, if any."""
    directory = self.directory / str(step) / INTEGRITY_ITEM
    if not directory.exists():
      logging.info("Checkpoint %s has no array digests: restored unverified.", directory.parent)
      return None
    try:
      verified, unverified = verify_digests(state, read_digests(directory))
    except CorruptCheckpointError as e:  # Anything else is a bug here: let it be seen.
      return e
    if unverified:
      logging.info(
        "Checkpoint %s: %d array blocks verified, %d unverified (dtype or sharding changed).",
        directory.parent,
        verified,
        unverified,
      )
    return None

  def _warn_unreadable(self, step: int, failed: list[int], error: Exception | None) -> str:
    """Logs one line about the unreadable `step`; returns its cause."""
    where = f" on process(es) {failed}" if jax.process_count() > 1 else ""
    cause = _cause(error) if error is not None else "read fine here"
    logging.warning(
      "Checkpoint %s is unreadable%s (%s); trying the previous one.",
      self.directory / str(step),
      where,
      cause,
    )
    return cause

  def _delete_beyond_retention(self, steps: list[int]) -> None:
    """Deletes those of `steps` (agreed by all processes) that the retention policy drops.

    Orbax deletes old steps only after committing a new one: a job killed in between leaves
    one step too many, which would stay until the next save. Done once a step restored, so
    that no step that could still serve as a fallback is deleted before.
    """
    keep = set(steps[: self._max_to_keep])  # `steps` is sorted latest first.
    keep |= {s for s in steps if self._keep_period and s % self._keep_period == 0}
    extra = [s for s in steps if s not in keep]
    if not extra:
      return
    if jax.process_index() == 0:
      trash = self.directory / DELETING_DIR
      try:
        trash.mkdir(exist_ok=True)
        for step in extra:  # Out of orbax's sight in one atomic rename, as orbax does.
          (self.directory / str(step)).rename(trash / str(step))
      except OSError as e:  # Orbax deletes them at the next save anyway.
        logging.warning("Could not delete old checkpoints %s (%s).", extra, _cause(e))
      self._purge_deleted()
    multihost_utils.sync_global_devices("crate_jax_delete_beyond_retention")
    self.manager.reload()

  def _move_aside(self, steps: list[int]) -> None:
    """Moves unreadable step directories out of the manager's sight, keeping them."""
    if jax.process_index() == 0:
      target = self.directory.parent / UNREADABLE_DIR
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        destination = target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(destination)
        logging.warning("Moved unreadable checkpoint %d to %s.", step, destination)
    multihost_utils.sync_global_devices("crate_jax_move_aside_unreadable_checkpoints")
    self.manager.reload()

  def _purge_deleted(self) -> None:
    """Deletes the steps that orbax moved into DELETING_DIR (process 0; no save running)."""
    trash = self.directory / DELETING_DIR
    if jax.process_index() != 0 or not trash.exists():
      return
    try:
      for entry in trash.iterdir():
        _remove_tree(entry)
      trash.rmdir()
    except OSError as e:
      if not self._purge_failed:  # Harmless (out of orbax's sight): say it once.
        logging.warning("Could not delete old checkpoints in %s (%s).", trash, _cause(e))
      self._purge_failed = True

  def wait(self) -> None:
    """Blocks until the pending asynchronous save, if any, is committed."""
    self.manager.wait_until_finished()
    self._purge_deleted()

  def close(self) -> None:
    self.manager.close()
    self._purge_deleted()
