"""Tests for experiments.logger: metrics.jsonl, TensorBoard scalars, resume repair."""

import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator)

from experiments.logger import MetricsLogger, read_metrics, truncate_metrics
from experiments.run_dir import RunDirError


def _record(iteration):
  return {
      "iteration": iteration,
      "agent_steps": 1000 * (iteration + 1),
      "frames": 4000 * (iteration + 1),
      "train_episode_return_mean": 1.5 * iteration,
      "train_episodes": 3,
      "eval_episode_return_mean": None,
      "agent_steps_per_second": 250.0,
      "loss": 0.25 / (iteration + 1),
      "moe/expert_3_mass": 0.125,
  }


def _scalars(base_dir, tag):
  acc = EventAccumulator(str(base_dir), size_guidance={"scalars": 0})
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metrics_round_trip_and_tensorboard(tmp_path):
  with MetricsLogger(str(tmp_path)) as logger:
    for i in range(3):
      logger.write(_record(i))
  assert read_metrics(str(tmp_path / "metrics.jsonl")) == [
      _record(i) for i in range(3)]
  assert read_metrics(str(tmp_path)) == [_record(i) for i in range(3)]
  with open(tmp_path / "metrics.jsonl") as f:
    lines = f.read().splitlines()
  assert len(lines) == 3 and all(json.loads(l) for l in lines)
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert _scalars(tmp_path, "loss") == [
      (i, pytest.approx(0.25 / (i + 1))) for i in range(3)]
  assert _scalars(tmp_path, "moe/expert_3_mass") == [
      (i, 0.125) for i in range(3)]
  acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
  acc.Reload()
  tags = acc.Tags()["scalars"]
  assert "eval_episode_return_mean" not in tags and "iteration" not in tags


def test_numpy_jax_and_non_finite_values(tmp_path, caplog):
  with MetricsLogger(str(tmp_path)) as logger:
    logger.write({
        "iteration": np.int64(7),
        "np_float": np.float32(0.5),
        "jax_float": jnp.asarray(2.0),
        "jax_int": jnp.asarray(3, dtype=jnp.int32),
        "nan": float("nan"),
        "inf": np.float64(np.inf),
        "vector": np.arange(3),
        "nested": {"a": np.float32(1.0)},
        "note": "text",
        "flag": True,
    })
  with open(tmp_path / "metrics.jsonl") as f:
    text = f.read()
  assert "NaN" not in text and "Infinity" not in text
  (record,) = read_metrics(str(tmp_path))
  assert record == {"iteration": 7, "np_float": 0.5, "jax_float": 2.0,
                    "jax_int": 3, "nan": None, "inf": None, "vector": [0, 1, 2],
                    "nested": {"a": 1.0}, "note": "text", "flag": True}
  assert isinstance(record["iteration"], int)
  assert _scalars(tmp_path, "jax_float") == [(7, 2.0)]
  assert _scalars(tmp_path, "jax_int") == [(7, 3.0)]
  assert math.isnan(_scalars(tmp_path, "nan")[0][1])
  assert not [r for r in caplog.records if "NaN" in r.getMessage()]  # no stray line
  acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
  acc.Reload()
  for skipped in ("vector", "nested", "note", "flag"):
    assert skipped not in acc.Tags()["scalars"]


def test_bad_metrics_rejected(tmp_path):
  with MetricsLogger(str(tmp_path)) as logger:
    with pytest.raises(KeyError):
      logger.write({"loss": 1.0})
    with pytest.raises(TypeError, match="'obj'"):
      logger.write({"iteration": 0, "obj": object()})
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_histogram(tmp_path):
  with MetricsLogger(str(tmp_path)) as logger:
    logger.histogram("moe/expert_mass", np.array([0.1, 0.2, 0.7]), step=1)
  acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
  acc.Reload()
  assert acc.Histograms("moe/expert_mass")[0].step == 1


def _write_lines(path, records, torn=b""):
  with open(path, "wb") as f:
    for r in records:
      f.write((json.dumps(r) + "\n").encode())
    f.write(torn)


def test_torn_last_line_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, [_record(0), _record(1)], torn=b'{"iteration": 2, "lo')
  assert read_metrics(str(path)) == [_record(0), _record(1)]


def test_corrupt_middle_line_reported(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as f:
    f.write('{"iteration": 0}\n{"itera\n{"iteration": 1}\n')
  with pytest.raises(RunDirError, match="line 2"):
    read_metrics(str(path))


def test_lenient_read_skips_damaged_lines_strict_read_names_them(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # Damaged lines (bad JSON, a list, bytes that are not UTF-8), a blank line, a
  # repeated iteration, and the torn tail of a run that is still writing.
  damaged = b'{"itera\n[1, 2]\n\xff\xfe{"iteration": 9}\n\n'
  _write_lines(path, [_record(0)])
  with open(path, "ab") as f:
    f.write(damaged)
    f.write(b"".join((json.dumps(_record(1)) + "\n").encode() for _ in range(2)))
    f.write(b'{"iteration": 2, "lo')
  assert read_metrics(str(path), lenient=True) == [
      _record(0), _record(1), _record(1)]
  with pytest.raises(RunDirError, match="line 2"):
    read_metrics(str(path))


def test_truncate_keeps_iterations_up_to_n_without_duplicates(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # A first process logged 0..4 and died mid-line; a restart from checkpoint 2
  # without truncation would have re-logged 3 and 4.
  records = [_record(i) for i in range(5)] + [_record(3), _record(4)]
  _write_lines(path, records, torn=b'{"iteration": 5,')
  truncate_metrics(str(path), 2)
  kept = read_metrics(str(path))
  assert [r["iteration"] for r in kept] == [0, 1, 2]
  assert kept == [_record(i) for i in range(3)]
  with open(path, "rb") as f:
    assert f.read().endswith(b"\n")
  assert os.listdir(tmp_path) == ["metrics.jsonl"]
  truncate_metrics(str(path), -1)
  assert read_metrics(str(path)) == []
  truncate_metrics(str(tmp_path / "missing.jsonl"), 3)  # No file: no-op.
  assert not os.path.exists(tmp_path / "missing.jsonl")


def test_duplicate_iteration_keeps_latest(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, [{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 2.0},
                      {"iteration": 1, "loss": 3.0}])
  truncate_metrics(str(path), 5)
  assert read_metrics(str(path)) == [{"iteration": 0, "loss": 1.0},
                                     {"iteration": 1, "loss": 3.0}]


def test_resume_appends_after_torn_tail_and_purges_tensorboard(tmp_path):
  with MetricsLogger(str(tmp_path)) as logger:
    for i in range(4):
      logger.write(_record(i))
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b'{"iteration": 4, "lo')  # Killed mid-write.
  truncate_metrics(str(tmp_path), 1)  # Resumed from checkpoint 1.
  with MetricsLogger(str(tmp_path), purge_step=2) as logger:
    for i in range(2, 4):
      logger.write(_record(i))
  assert read_metrics(str(tmp_path)) == [_record(i) for i in range(4)]
  assert [s for s, _ in _scalars(tmp_path, "loss")] == [0, 1, 2, 3]


def test_logger_repairs_torn_tail_before_appending(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, [_record(0)], torn=b'{"iteration": 1, "lo')
  with MetricsLogger(str(tmp_path)) as logger:
    logger.write(_record(1))
  assert read_metrics(str(path)) == [_record(0), _record(1)]
