"""Tests for experiments.checkpoints: round trip, rotation, stale temp, corruption."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import checkpoints
from experiments.checkpoints import Checkpointer, CorruptCheckpointError
from experiments.run_dir import RunDirError
from moe_testing import assert_trees_equal


class DummyBuffer:
  """Stands in for the replay buffer: an object with save(path) / load(path)."""

  def __init__(self, data=None):
    self.data = np.zeros(5, np.uint8) if data is None else data

  def save(self, path):
    np.save(path, self.data)  # np.save appends ".npy": files with the prefix.

  def load(self, path):
    self.data = np.load(path + ".npy")


def _train_state(seed):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {"dense": {"kernel": jax.random.normal(k1, (4, 3)),
                      "bias": jax.random.normal(k2, (3,))}}
  opt_state = optax.adam(1e-3).init(params)
  return {"online": params, "target": params, "opt_state": opt_state,
          "step": jnp.asarray(seed, jnp.int32), "rng": jax.random.PRNGKey(seed)}


def _state(seed):
  return {
      "train_state": _train_state(seed),
      "counters": {"iteration": seed, "agent_steps": 1000 * seed},
      "np_rng": np.random.default_rng(seed).bit_generator.state,
      "replay": DummyBuffer(np.arange(seed, seed + 5, dtype=np.uint8)),
  }


def _template():
  return {"train_state": _train_state(99), "counters": None, "np_rng": None,
          "replay": DummyBuffer()}


def _snapshot(directory):
  files = {}
  for root, dirs, names in os.walk(directory):
    for name in names + dirs:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, directory)
      if os.path.isdir(full):
        files[rel] = None
      else:
        with open(full, "rb") as f:
          files[rel] = f.read()
  return files


def test_round_trip(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_iteration() is None
  saved = _state(3)
  ckpt.save(3, saved)
  assert ckpt.latest_iteration() == 3
  restored = ckpt.restore(template=_template())
  assert set(restored) == set(saved)
  assert_trees_equal(restored["train_state"], saved["train_state"])
  assert isinstance(restored["train_state"]["online"]["dense"]["kernel"],
                    jax.Array)
  assert isinstance(restored["train_state"]["opt_state"][0],
                    optax.ScaleByAdamState)
  assert restored["counters"] == saved["counters"]
  assert restored["np_rng"] == saved["np_rng"]
  rng = np.random.default_rng()
  rng.bit_generator.state = restored["np_rng"]
  assert rng.random() == np.random.default_rng(3).random()
  np.testing.assert_array_equal(restored["replay"].data, saved["replay"].data)
  assert sorted(os.listdir(ckpt.path(3))) == [
      "meta.json", "objects", "pytrees", "values.json"]


def test_typed_prng_keys_round_trip(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  key = jax.random.key(7)
  ckpt.save(0, {"ts": {"key": key, "w": jnp.ones(2)}})
  restored = ckpt.restore(0, {"ts": {"key": jax.random.key(0), "w": jnp.zeros(2)}})
  np.testing.assert_array_equal(jax.random.key_data(restored["ts"]["key"]),
                                jax.random.key_data(key))
  assert jax.dtypes.issubdtype(restored["ts"]["key"].dtype, jax.dtypes.prng_key)


def test_keeps_last_two(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  for i in range(4):
    ckpt.save(i, _state(i))
  assert sorted(os.listdir(tmp_path)) == ["ckpt_2", "ckpt_3"]
  assert ckpt.latest_iteration() == 3
  older = ckpt.restore(2, _template())
  assert older["counters"]["iteration"] == 2


def test_resave_same_iteration_replaces_it(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1))
  ckpt.save(1, _state(5))
  assert sorted(os.listdir(tmp_path)) == ["ckpt_1"]
  assert ckpt.restore(1, _template())["counters"]["iteration"] == 5


def test_stale_tmp_ignored_by_readers_and_removed_by_save(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1))
  stale = tmp_path / "ckpt_2.tmp"  # A save in progress, or killed half way.
  (stale / "pytrees").mkdir(parents=True)
  (stale / "pytrees" / "train_state.msgpack").write_bytes(b"\x81\xa3half")
  before = _snapshot(tmp_path)
  assert ckpt.latest_iteration() == 1
  assert ckpt.restore(template=_template())["counters"]["iteration"] == 1
  # A second reader (moerl eval while the run trains) changes nothing.
  reader = Checkpointer(str(tmp_path))
  assert reader.latest_iteration() == 1
  assert reader.restore(1, _template())["counters"]["iteration"] == 1
  assert _snapshot(tmp_path) == before
  (tmp_path / "ckpt_3.tmp").mkdir()
  ckpt.save(3, _state(3))  # The writer cleans, also over its own iteration.
  assert sorted(os.listdir(tmp_path)) == ["ckpt_1", "ckpt_3"]


def test_old_left_by_a_killed_resave_is_read_in_place_then_recovered(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  # Killed between renaming ckpt_2 to ckpt_2.old and the new ckpt_2.tmp into place.
  os.rename(tmp_path / "ckpt_2", tmp_path / "ckpt_2.old")
  (tmp_path / "ckpt_2.tmp").mkdir()
  before = _snapshot(tmp_path)
  reader = Checkpointer(str(tmp_path))
  assert reader.iterations() == [1, 2]
  assert reader.latest_iteration() == 2
  assert reader.restore(template=_template())["counters"]["iteration"] == 2
  assert reader.restore(2, _template())["counters"]["iteration"] == 2
  assert _snapshot(tmp_path) == before
  ckpt.save(3, _state(3))  # Training resumes: the writer puts ckpt_2 back.
  assert sorted(os.listdir(tmp_path)) == ["ckpt_2", "ckpt_3"]
  assert ckpt.restore(2, _template())["counters"]["iteration"] == 2


def test_old_beside_its_replacement_is_ignored(tmp_path):
  Checkpointer(str(tmp_path / "other")).save(2, _state(9))
  ckpt = Checkpointer(str(tmp_path / "run"))
  ckpt.save(2, _state(5))
  # Killed after the new ckpt_2 went into place, before ckpt_2.old was deleted.
  shutil.copytree(tmp_path / "other" / "ckpt_2", tmp_path / "run" / "ckpt_2.old")
  before = _snapshot(tmp_path / "run")
  assert ckpt.iterations() == [2]
  assert ckpt.restore(2, _template())["counters"]["iteration"] == 5
  assert _snapshot(tmp_path / "run") == before
  ckpt.save(3, _state(3))
  assert sorted(os.listdir(tmp_path / "run")) == ["ckpt_2", "ckpt_3"]
  assert ckpt.restore(2, _template())["counters"]["iteration"] == 5


def test_failed_save_leaves_no_partial_checkpoint(tmp_path):
  class Exploding(DummyBuffer):
    def save(self, path):
      raise RuntimeError("disk full")
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1))
  state = _state(2)
  state["replay"] = Exploding()
  with pytest.raises(RuntimeError):
    ckpt.save(2, state)
  assert sorted(os.listdir(tmp_path)) == ["ckpt_1"]
  assert ckpt.latest_iteration() == 1


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [
    "flip_pytree", "truncate_pytree", "flip_object", "delete_values",
    "garble_meta", "edit_meta_iteration", "edit_meta_kind", "delete_meta"])
def test_corruption_detected_and_files_untouched(tmp_path, damage):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  path = ckpt.path(2)
  pytree = os.path.join(path, "pytrees", "train_state.msgpack")
  meta = os.path.join(path, "meta.json")
  if damage == "flip_pytree":
    _flip_byte(pytree, os.path.getsize(pytree) // 2)
  elif damage == "truncate_pytree":
    os.truncate(pytree, os.path.getsize(pytree) // 2)
  elif damage == "flip_object":
    _flip_byte(os.path.join(path, "objects", "replay.npy"), -1 + os.path.getsize(
        os.path.join(path, "objects", "replay.npy")))
  elif damage == "delete_values":
    os.remove(os.path.join(path, "values.json"))
  elif damage == "garble_meta":
    os.truncate(meta, 10)
  elif damage == "edit_meta_iteration":
    with open(meta) as f:
      content = json.load(f)
    content["iteration"] = 7
    with open(meta, "w") as f:
      json.dump(content, f)
  elif damage == "edit_meta_kind":  # re-signed: an intact pytree of no known kind
    with open(meta) as f:
      content = json.load(f)
    content["kinds"]["train_state"] = "tensor"
    content["checksum"] = checkpoints._meta_checksum(content)
    with open(meta, "w") as f:
      json.dump(content, f)
  elif damage == "delete_meta":
    os.remove(meta)
  before = _snapshot(tmp_path)
  with pytest.raises(CorruptCheckpointError) as info:
    ckpt.restore(template=_template())
  message = str(info.value)
  assert path in message and f"delete {path}" in message
  assert "\n" not in message
  assert isinstance(info.value, RunDirError) and isinstance(info.value, ValueError)
  assert _snapshot(tmp_path) == before
  assert ckpt.latest_iteration() == 2  # Still there: the user decides.
  assert _snapshot(tmp_path) == before
  # The fix the message names works: delete it and resume from the previous one.
  shutil.rmtree(path)
  assert ckpt.restore(template=_template())["counters"]["iteration"] == 1


def test_unparsable_msgpack_with_valid_checksums_is_corrupt(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints.flax.serialization, "to_bytes",
                      lambda tree: b"\xc1\xc1 not msgpack")
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(0, {"ts": {"w": jnp.ones(2)}})
  monkeypatch.undo()
  with pytest.raises(CorruptCheckpointError, match="does not parse"):
    ckpt.restore(0, {"ts": {"w": jnp.ones(2)}})


def test_template_mismatch_is_a_clear_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(0, {"ts": {"w": jnp.ones(2)}})
  with pytest.raises(RunDirError, match="does not match"):
    ckpt.restore(0, {"ts": {"w": jnp.ones(3)}})
  with pytest.raises(RunDirError, match="no entries"):
    ckpt.restore(0, {"other": {"w": jnp.ones(2)}})


def test_missing_checkpoint_and_bad_input(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "none"))
  with pytest.raises(RunDirError, match="no checkpoint"):
    ckpt.restore(template={})
  assert not os.path.exists(tmp_path / "none")
  with pytest.raises(RunDirError, match="keep"):
    Checkpointer(str(tmp_path), keep=0)
  with pytest.raises(RunDirError, match="entry name"):
    Checkpointer(str(tmp_path)).save(0, {"../x": 1})
  with pytest.raises(RunDirError, match="iteration"):
    Checkpointer(str(tmp_path)).save(-1, {"x": 1})


def test_object_load_mismatch_is_a_clear_error(tmp_path):
  class Strict(DummyBuffer):
    def load(self, path):
      raise ValueError("replay state was saved with capacity 10,\nnot 20.")
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(0, {"replay": DummyBuffer()})
  with pytest.raises(RunDirError, match="cannot be loaded") as info:
    ckpt.restore(0, {"replay": Strict()})
  assert "\n" not in str(info.value)
