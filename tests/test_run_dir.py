"""Tests for experiments.run_dir: config guard, foreign / unwritable dirs, status."""

import contextlib
import json
import os
import shutil
import tempfile

import pytest

from experiments import run_dir as run_dir_lib
from experiments.run_dir import RunDir, RunDirError

CONFIG = """# Parameters for DQNAgent:
# ==============================================================================
DQNAgent.gamma = 0.99
DQNAgent.update_period = 4

# Parameters for Runner:
Runner.num_iterations = 200
"""


def _snapshot(directory):
  """Relative path -> bytes of every file below ``directory``."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        files[os.path.relpath(full, directory)] = f.read()
  return files


def test_paths(tmp_path):
  rd = RunDir(str(tmp_path / "run"))
  assert rd.config_path == str(tmp_path / "run" / "config.gin")
  assert rd.metrics_path == str(tmp_path / "run" / "metrics.jsonl")
  assert rd.status_path == str(tmp_path / "run" / "status.json")
  assert rd.checkpoint_dir == str(tmp_path / "run" / "checkpoints")


def test_fresh_run_writes_config_and_is_not_resume(tmp_path):
  rd = RunDir(str(tmp_path / "a" / "b"))
  assert rd.prepare(CONFIG) is False
  with open(rd.config_path) as f:
    assert f.read() == CONFIG
  assert os.listdir(rd.base_dir) == ["config.gin"]  # No temp files left.


def test_existing_empty_dir_is_accepted(tmp_path):
  assert RunDir(str(tmp_path)).prepare(CONFIG) is False


def test_same_config_resumes_ignoring_comments_and_whitespace(tmp_path):
  rd = RunDir(str(tmp_path))
  rd.prepare(CONFIG)
  reformatted = ("DQNAgent.gamma=0.99\n\n   DQNAgent.update_period  =  4\n"
                 "# a new comment\nRunner.num_iterations = 200\n")
  assert rd.prepare(reformatted) is True


def test_resume_refused_when_not_allowed(tmp_path):
  rd = RunDir(str(tmp_path))
  rd.prepare(CONFIG)
  with pytest.raises(RunDirError, match="already holds a run"):
    rd.prepare(CONFIG, resume_allowed=False)


def test_different_config_refused_and_nothing_written(tmp_path):
  rd = RunDir(str(tmp_path))
  rd.prepare(CONFIG)
  rd.write_status("running", 3)
  with open(rd.metrics_path, "w") as f:
    f.write('{"iteration": 0}\n')
  listing, before = sorted(os.listdir(tmp_path)), _snapshot(tmp_path)
  with pytest.raises(RunDirError) as info:
    rd.prepare(CONFIG.replace("0.99", "0.9"))
  message = str(info.value)
  assert "different config" in message and "new --base_dir" in message
  assert "\n" not in message
  assert sorted(os.listdir(tmp_path)) == listing
  assert _snapshot(tmp_path) == before


def test_string_whitespace_still_matters(tmp_path):
  rd = RunDir(str(tmp_path))
  rd.prepare("A.name = 'x y'\n")
  with pytest.raises(RunDirError, match="different config"):
    rd.prepare("A.name = 'xy'\n")


def test_foreign_directory_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("my thesis")
  before = _snapshot(tmp_path)
  with pytest.raises(RunDirError, match="foreign directory"):
    RunDir(str(tmp_path)).prepare(CONFIG)
  assert _snapshot(tmp_path) == before


def test_run_without_config_is_not_foreign(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n')
  assert RunDir(str(tmp_path)).prepare(CONFIG) is False


def test_base_dir_beneath_a_file_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(RunDirError, match="cannot be created") as info:
    RunDir(str(blocker / "run")).prepare(CONFIG)
  assert "--base_dir" in str(info.value)
  assert blocker.read_text() == "x"


def test_base_dir_that_is_a_file_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(RunDirError, match="is a file"):
    RunDir(str(blocker)).prepare(CONFIG)


NOBODY = 65534


@contextlib.contextmanager
def _as_nobody():
  """Root ignores directory permissions: for the block, the process's
  effective user and group are nobody's (root stays the real and saved user,
  so they come back afterwards). A no-op for a test run without root."""
  if os.geteuid() != 0:
    yield
    return
  os.setegid(NOBODY)
  os.seteuid(NOBODY)
  try:
    yield
  finally:
    os.seteuid(0)
    os.setegid(0)


def test_read_only_dir_refused():
  # Under /tmp itself: pytest's own temporary folders are closed to others.
  parent = tempfile.mkdtemp(prefix="moerl-ro-")
  try:
    os.chmod(parent, 0o755)
    ro = os.path.join(parent, "ro")
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    with _as_nobody():
      with pytest.raises(RunDirError, match="not writable"):
        RunDir(ro).prepare(CONFIG)
    assert os.geteuid() == os.getuid()  # restored
    assert os.listdir(ro) == []  # no config.gin, no temp file
  finally:
    shutil.rmtree(parent)


def test_unwritable_dir_refused_when_write_fails(tmp_path, monkeypatch):
  """A write that fails although the directory looks writable (a full or
  read-only filesystem) is refused the same way."""
  def refuse(path, data):
    raise PermissionError(13, "Permission denied", path)
  monkeypatch.setattr(run_dir_lib, "atomic_write_bytes", refuse)
  with pytest.raises(RunDirError, match="not writable"):
    RunDir(str(tmp_path)).prepare(CONFIG)


def test_one_holder_of_a_run_directory_at_a_time(tmp_path):
  first, second = RunDir(str(tmp_path)), RunDir(str(tmp_path))
  first.lock()
  first.lock()  # taking it again is a no-op
  with pytest.raises(RunDirError, match="is in use: another moerl process"):
    second.lock()
  first.unlock()
  second.lock()  # free once released
  second.unlock()
  assert os.listdir(tmp_path) == []  # the hold writes nothing


def test_a_filesystem_without_directory_locks_runs_unlocked(tmp_path, monkeypatch):
  def no_locks(fd, operation):
    raise OSError(37, "No locks available")
  monkeypatch.setattr(run_dir_lib.fcntl, "flock", no_locks)
  run_dir = RunDir(str(tmp_path))
  run_dir.lock()  # no error: the run goes on unlocked
  assert run_dir._lock_fd is None  # pylint: disable=protected-access


def test_status_round_trip(tmp_path):
  rd = RunDir(str(tmp_path))
  assert rd.read_status() is None
  rd.write_status("running", 2)
  status = rd.read_status()
  assert status["state"] == "running" and status["iteration"] == 2
  assert status["error"] is None and "updated" in status
  rd.write_status("failed", 5, error="boom")
  assert rd.read_status()["error"] == "boom"
  with pytest.raises(RunDirError, match="unknown"):
    rd.write_status("paused", 5)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
  path = str(tmp_path / "x.json")
  run_dir_lib.atomic_write_json(path, {"a": 1})
  run_dir_lib.atomic_write_json(path, {"a": 2})
  with open(path) as f:
    assert json.load(f) == {"a": 2}
  run_dir_lib.atomic_write_text(str(tmp_path / "y.txt"), "hi")
  assert sorted(os.listdir(tmp_path)) == ["x.json", "y.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / "x.txt")
  run_dir_lib.atomic_write_text(path, "old")
  def fail(src, dst):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(run_dir_lib.os, "replace", fail)
  with pytest.raises(OSError):
    run_dir_lib.atomic_write_text(path, "new")
  monkeypatch.undo()
  with open(path) as f:
    assert f.read() == "old"
  assert os.listdir(tmp_path) == ["x.txt"]


def test_atomic_writes_give_open_modes_not_private_ones(tmp_path):
  path = str(tmp_path / "a.json")
  run_dir_lib.atomic_write_json(path, {"x": 1})  # as open() would: 0644 at umask 022
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~run_dir_lib._UMASK != 0o600
  os.chmod(path, 0o640)  # a replaced file keeps its mode
  run_dir_lib.atomic_write_json(path, {"x": 2})
  assert os.stat(path).st_mode & 0o777 == 0o640
