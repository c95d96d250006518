"""Atomic, checksummed checkpoints in ``<base_dir>/checkpoints``.

A checkpoint is a directory ``ckpt_<iteration>/`` holding::

    meta.json               format version, iteration, the kind of each state entry,
                            the sha256 of every other file, and its own checksum
    values.json             entries that are plain JSON values (counters, rng states)
    pytrees/<name>.msgpack  entries that are pytrees of arrays (flax msgpack of the
                            state dict, ``flax.serialization.to_bytes``)
    objects/<name>...       entries with ``save(path)`` / ``load(path)`` (the replay
                            buffer); ``save`` gets ``objects/<name>`` and may create it
                            as a file or a directory, or files with that prefix

Guarantees:

* ``save`` writes everything into ``ckpt_<iteration>.tmp/``, fsyncs every file and the
  directory, renames it to ``ckpt_<iteration>/`` and only then deletes checkpoints
  beyond the newest ``keep``. A kill at any moment leaves every finished checkpoint
  intact; the unfinished ``.tmp`` directory is ignored and removed by the next
  ``save``. A kill while re-saving an iteration can leave only ``ckpt_<i>.old/``:
  readers use it as checkpoint ``i`` and the next ``save`` renames it back.
* Only ``save`` changes the directory. Finding and restoring checkpoints never
  deletes or renames anything, so ``moerl eval`` can read a run while it trains.
* ``restore`` verifies every checksum before deserialising anything. A damaged,
  truncated or incomplete checkpoint raises CorruptCheckpointError naming its path and
  the fix; a failed restore never modifies or deletes anything on disk.
* One process writes a checkpoint directory at a time (the run's own process).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import flax.serialization
import jax
import numpy as np

from experiments.run_dir import (RunDirError, atomic_write_bytes, finished_checkpoints,
                                 atomic_write_json, fsync_dir)

FORMAT_VERSION = 1
META_FILE = "meta.json"
VALUES_FILE = "values.json"
PYTREE_DIR = "pytrees"
OBJECT_DIR = "objects"
_STALE_RE = re.compile(r"^ckpt_(\d+)\.(tmp|old)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class CorruptCheckpointError(RunDirError):
  """A checkpoint on disk is damaged, truncated or incomplete."""


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _meta_checksum(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != "checksum"}
  return hashlib.sha256(
      json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _is_json_value(value: Any) -> bool:
  """True for plain Python JSON values (numpy / jax leaves make it a pytree)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return True
  if isinstance(value, (list, tuple)):
    return all(_is_json_value(v) for v in value)
  if isinstance(value, dict):
    return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
  return False


def _is_saveable_object(value: Any) -> bool:
  return callable(getattr(value, "save", None)) and callable(
      getattr(value, "load", None))


def _is_typed_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key)


def _unwrap_keys(tree: Any) -> Any:
  """Replaces typed PRNG key leaves (jax.random.key) by their raw uint32 data."""
  return jax.tree_util.tree_map(
      lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _restore_leaf(template_leaf: Any, leaf: Any) -> Any:
  """Puts a restored numpy leaf back in the template leaf's form."""
  shape = getattr(template_leaf, "shape", None)
  if shape is not None and _is_typed_key(template_leaf):
    shape = jax.random.key_data(template_leaf).shape
  if shape is not None and np.shape(leaf) != tuple(shape):
    raise ValueError(
        f"a leaf has shape {np.shape(leaf)}, the template expects {tuple(shape)}")
  if _is_typed_key(template_leaf):
    data = jax.device_put(np.asarray(leaf), template_leaf.sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(template_leaf))
  if isinstance(template_leaf, jax.Array) and isinstance(leaf, np.ndarray):
    return jax.device_put(leaf, template_leaf.sharding)
  return leaf


def _fsync_tree(root: str) -> None:
  for directory, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(directory, name), "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(directory)


class Checkpointer:
  """Saves and restores checkpoints of a run's state dict in ``checkpoint_dir``."""

  def __init__(self, checkpoint_dir: str, keep: int = 2):
    if not isinstance(keep, int) or keep < 1:
      raise RunDirError(
          f"checkpoint keep={keep!r} is invalid; keep at least 1 checkpoint.")
    self.checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    self.keep = keep

  def path(self, iteration: int) -> str:
    """The directory of the checkpoint of ``iteration``."""
    return os.path.join(self.checkpoint_dir, f"ckpt_{int(iteration)}")

  def _finished(self) -> dict[int, str]:
    """Paths of the finished checkpoints by iteration (``finished_checkpoints``)."""
    return finished_checkpoints(self.checkpoint_dir)

  def iterations(self) -> list[int]:
    """Iterations of the finished checkpoints on disk, ascending."""
    return sorted(self._finished())

  def _clean_stale(self) -> None:
    """Removes leftovers of a killed save (``.tmp``; ``.old`` once superseded).

    Only ``save`` calls this: a reader must never touch a live run's files.
    """
    try:
      names = os.listdir(self.checkpoint_dir)
    except FileNotFoundError:
      return
    for name in names:
      match = _STALE_RE.match(name)
      if not match:
        continue
      stale = os.path.join(self.checkpoint_dir, name)
      final = self.path(int(match.group(1)))
      if match.group(2) == "old" and not os.path.exists(final):
        os.rename(stale, final)  # Killed while replacing it: put it back.
      else:
        shutil.rmtree(stale, ignore_errors=True)

  def latest_iteration(self) -> int | None:
    """The newest finished checkpoint's iteration, or None; changes nothing on disk."""
    found = self.iterations()
    return found[-1] if found else None

  def save(self, iteration: int, state: dict) -> str:
    """Writes ``state`` as the checkpoint of ``iteration``; returns its path.

    ``state`` maps names (letters, digits, ``_``, ``-``) to pytrees of arrays, plain
    JSON values, or objects with ``save(path)`` / ``load(path)``.
    """
    if not isinstance(iteration, (int, np.integer)) or iteration < 0:
      raise RunDirError(
          f"checkpoint iteration {iteration!r} is invalid; use an int >= 0.")
    iteration = int(iteration)
    for name in state:
      if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RunDirError(
            f"checkpoint entry name {name!r} is invalid; use letters, digits, "
            "'_' and '-' only.")
    os.makedirs(self.checkpoint_dir, exist_ok=True)
    self._clean_stale()
    final = self.path(iteration)
    tmp = final + ".tmp"
    os.makedirs(tmp)
    try:
      kinds = self._write_entries(tmp, state)
      checksums = {}
      for directory, _, files in os.walk(tmp):
        for name in files:
          full = os.path.join(directory, name)
          rel = os.path.relpath(full, tmp).replace(os.sep, "/")
          checksums[rel] = _sha256_file(full)
      meta = {
          "format_version": FORMAT_VERSION,
          "iteration": iteration,
          "kinds": kinds,
          "files": dict(sorted(checksums.items())),
      }
      meta["checksum"] = _meta_checksum(meta)
      atomic_write_json(os.path.join(tmp, META_FILE), meta)
      _fsync_tree(tmp)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    if os.path.exists(final):  # Saving an iteration again: replace it.
      old = final + ".old"
      os.rename(final, old)
      os.rename(tmp, final)
      fsync_dir(self.checkpoint_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, final)
      fsync_dir(self.checkpoint_dir)
    finished = self._finished()
    for old_iteration in sorted(finished)[:-self.keep]:
      shutil.rmtree(finished[old_iteration])
    fsync_dir(self.checkpoint_dir)
    return final

  def _write_entries(self, tmp: str, state: dict) -> dict[str, str]:
    kinds, values = {}, {}
    for name, value in state.items():
      if _is_saveable_object(value):
        os.makedirs(os.path.join(tmp, OBJECT_DIR), exist_ok=True)
        value.save(os.path.join(tmp, OBJECT_DIR, name))
        kinds[name] = "object"
      elif _is_json_value(value):
        values[name] = value
        kinds[name] = "json"
      else:
        os.makedirs(os.path.join(tmp, PYTREE_DIR), exist_ok=True)
        data = flax.serialization.to_bytes(_unwrap_keys(value))
        atomic_write_bytes(os.path.join(tmp, PYTREE_DIR, name + ".msgpack"), data)
        kinds[name] = "pytree"
    if values:
      atomic_write_bytes(
          os.path.join(tmp, VALUES_FILE),
          json.dumps(values, sort_keys=True).encode("utf-8"))
    return kinds

  def _corrupt(self, path: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint {path} is corrupt ({problem}); delete {path} to resume from "
        "the previous checkpoint, or start a new --base_dir.")

  def _verified_meta(self, path: str) -> dict:
    """meta.json of ``path`` after checking it and every file's sha256."""
    try:
      with open(os.path.join(path, META_FILE), "rb") as f:
        meta = json.loads(f.read())
    except FileNotFoundError:
      raise self._corrupt(path, f"{META_FILE} is missing") from None
    except (OSError, ValueError) as e:
      raise self._corrupt(path, f"{META_FILE} is unreadable: {e}") from None
    if (not isinstance(meta, dict) or meta.get("checksum") != _meta_checksum(meta)
        or not isinstance(meta.get("files"), dict)
        or not isinstance(meta.get("kinds"), dict)):
      raise self._corrupt(path, f"{META_FILE} fails its checksum")
    if meta.get("format_version") != FORMAT_VERSION:
      raise RunDirError(
          f"checkpoint {path} has format version {meta.get('format_version')!r}, "
          f"this moerl reads version {FORMAT_VERSION}; use the moerl version that "
          "wrote it or start a new --base_dir.")
    for rel, expected in meta["files"].items():
      full = os.path.join(path, *rel.split("/"))
      try:
        actual = _sha256_file(full)
      except FileNotFoundError:
        raise self._corrupt(path, f"{rel} is missing") from None
      except OSError as e:
        raise self._corrupt(path, f"{rel} is unreadable: {e.strerror}") from None
      if actual != expected:
        raise self._corrupt(path, f"{rel} fails its sha256 checksum")
    return meta

  def restore(self, iteration: int | None = None,
              template: dict | None = None) -> dict:
    """Restores the checkpoint of ``iteration`` (default: the newest).

    Returns a dict with the keys of ``template``: pytrees restored into the
    template's structure (jax leaves back on the template's devices), objects
    restored in place by ``template[name].load(path)`` and returned, JSON values as
    saved (the template's value is ignored). Raises CorruptCheckpointError for a
    damaged checkpoint and RunDirError if there is none or it does not match
    ``template``; nothing on disk is changed either way.
    """
    if template is None:
      raise TypeError("restore() needs template=, a dict shaped like the saved state.")
    if iteration is None:
      found = self.iterations()
      if not found:
        raise RunDirError(
            f"there is no checkpoint in {self.checkpoint_dir}; "
            "start the run without resuming or pass the right --base_dir.")
      iteration = found[-1]
    path = self._finished().get(int(iteration))
    if path is None:
      raise RunDirError(
          f"there is no checkpoint {self.path(iteration)} (found iterations "
          f"{self.iterations()}); restore one of those iterations.")
    meta = self._verified_meta(path)
    kinds = meta["kinds"]
    missing = [name for name in template if name not in kinds]
    if missing:
      raise RunDirError(
          f"checkpoint {path} has no entries {missing}; it was written by a "
          "different agent setup, so start a new --base_dir.")
    values = {}
    if "json" in kinds.values():
      try:
        with open(os.path.join(path, VALUES_FILE), "rb") as f:
          values = json.loads(f.read())
      except (OSError, ValueError) as e:
        raise self._corrupt(path, f"{VALUES_FILE} is unreadable: {e}") from None
    restored = {}
    for name, target in template.items():
      kind = kinds[name]
      if kind == "json":
        if name not in values:
          raise self._corrupt(path, f"{VALUES_FILE} lacks {name!r}")
        restored[name] = values[name]
      elif kind == "object":
        if not _is_saveable_object(target):
          raise RunDirError(
              f"checkpoint entry {name!r} needs a template object with load(path), "
              f"got {type(target).__name__}; pass the object to restore into.")
        try:
          target.load(os.path.join(path, OBJECT_DIR, name))
        except RunDirError:
          raise
        except ValueError as e:  # Checksums passed: the object does not match.
          problem = " ".join(str(e).split())
          raise RunDirError(
              f"checkpoint entry {name!r} in {path} cannot be loaded ({problem}); "
              "it was written by a different setup, so start a new --base_dir."
          ) from None
        restored[name] = target
      elif kind == "pytree":
        restored[name] = self._restore_pytree(path, name, target)
      else:
        raise self._corrupt(path, f"{META_FILE} gives {name!r} the unknown kind {kind!r}")
    return restored

  def _restore_pytree(self, path: str, name: str, target: Any) -> Any:
    file = os.path.join(path, PYTREE_DIR, name + ".msgpack")
    try:
      with open(file, "rb") as f:
        state_dict = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types.
      raise self._corrupt(
          path, f"{PYTREE_DIR}/{name}.msgpack does not parse: {e}") from None
    raw_target = _unwrap_keys(target)
    try:
      loaded = flax.serialization.from_state_dict(raw_target, state_dict)
      return jax.tree_util.tree_map(_restore_leaf, target, loaded)
    except (KeyError, ValueError, TypeError) as e:
      raise RunDirError(
          f"checkpoint entry {name!r} in {path} does not match the current "
          f"structure ({e}); it was written by a different agent setup, so start a "
          "new --base_dir.") from None
