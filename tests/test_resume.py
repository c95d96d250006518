"""A training process killed with SIGKILL mid-iteration resumes from its last
checkpoint with its logs intact, and ends where an uninterrupted run ends."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

from experiments.cli import main

NUM_ITERATIONS = 4
TRAINING_STEPS = 1000
MAX_EPISODE = 500
TRAIN_ARGS = [
    '--gin_files', 'cartpole_dqn.gin',
    '--gin_bindings', f'Runner.num_iterations = {NUM_ITERATIONS}',
    '--gin_bindings', f'Runner.training_steps = {TRAINING_STEPS}',
    '--gin_bindings', "Runner.schedule = 'continuous_train'",
    '--gin_bindings', f'Runner.max_steps_per_episode = {MAX_EPISODE}',
    '--gin_bindings', 'DQNAgent.min_replay_history = 200',
    '--gin_bindings', 'DQNAgent.batch_size = 32',
    '--gin_bindings', 'MLPEncoder.hidden_units = (32,)',
    '--gin_bindings', 'DensePenultimate.hidden_units = 32',
]
TIMING_KEYS = ('agent_steps_per_second', 'train_seconds')


def _command(base_dir):
  return [sys.executable, '-m', 'experiments.cli', 'train', '--base_dir',
          base_dir] + TRAIN_ARGS


def _complete_lines(path):
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    return []
  return data.split(b'\n')[:-1]  # the part after the last newline is torn


def _wait_for_lines(process, path, count, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if len(_complete_lines(path)) >= count:
      return
    if process.poll() is not None:
      raise AssertionError(f'training exited early with {process.returncode}: '
                           f'{process.stderr.read().decode()[-2000:]}')
    time.sleep(0.05)
  raise AssertionError(f'no {count} metrics lines after {timeout}s')


def test_sigkill_mid_iteration_then_resume(tmp_path):
  base_dir = str(tmp_path / 'run')
  metrics_path = os.path.join(base_dir, 'metrics.jsonl')
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  process = subprocess.Popen(_command(base_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=str(tmp_path), env=env)
  try:
    _wait_for_lines(process, metrics_path, 1)
    # Into the next iteration: wait half as long as iteration 0 took (the
    # machine's speed varies; iteration 1 trains on every step, so it is
    # longer than iteration 0 with its warm-up).
    first = json.loads(_complete_lines(metrics_path)[0])
    time.sleep(0.5 * first['train_seconds'])
    assert process.poll() is None, 'finished before it could be killed'
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == -signal.SIGKILL
  killed_lines = _complete_lines(metrics_path)
  assert 1 <= len(killed_lines) < NUM_ITERATIONS
  with open(os.path.join(base_dir, 'status.json'), encoding='utf-8') as f:
    assert json.load(f)['state'] == 'running'  # a SIGKILL leaves no trace

  resumed = subprocess.run(_command(base_dir), capture_output=True,
                           cwd=str(tmp_path), env=env, timeout=300)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert b'Traceback' not in resumed.stderr

  with open(metrics_path, 'rb') as f:
    data = f.read()
  assert data.endswith(b'\n')
  rows = [json.loads(line) for line in data.decode('utf-8').splitlines()]
  assert [r['iteration'] for r in rows] == list(range(NUM_ITERATIONS))
  # Lines logged before the kill are kept as they were.
  for old, row in zip(killed_lines[:-1], rows):
    assert json.loads(old) == row
  assert rows[-1]['agent_steps'] == NUM_ITERATIONS * TRAINING_STEPS

  # agent_steps_taken is the agent's cumulative counter, restored from the
  # checkpoint: each iteration adds its budget plus at most one episode's
  # overrun (num_envs = 1), so a counter reset on resume, or one that kept the
  # killed iteration's steps, shows up here.
  taken = [r['agent_steps_taken'] for r in rows]
  previous = 0
  for row, value in zip(rows, taken):
    assert value >= row['agent_steps']
    assert TRAINING_STEPS <= value - previous < TRAINING_STEPS + MAX_EPISODE
    previous = value
  assert taken == sorted(set(taken))  # strictly increasing

  with open(os.path.join(base_dir, 'status.json'), encoding='utf-8') as f:
    status = json.load(f)
  assert status['state'] == 'done'
  assert status['iteration'] == NUM_ITERATIONS
  assert sorted(os.listdir(os.path.join(base_dir, 'checkpoints'))) == [
      f'ckpt_{NUM_ITERATIONS - 2}', f'ckpt_{NUM_ITERATIONS - 1}']

  # The resumed run ends exactly where an uninterrupted run of the same
  # config ends: everything the run depends on was in the checkpoint.
  reference_dir = str(tmp_path / 'reference')
  with contextlib.redirect_stderr(io.StringIO()) as err:
    assert main(['train', '--base_dir', reference_dir] + TRAIN_ARGS) == 0, (
        err.getvalue())
  with open(os.path.join(reference_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    reference = [json.loads(line) for line in f.read().splitlines()]
  assert len(reference) == len(rows)
  for ref, row in zip(reference, rows):
    for key in ref:
      if key not in TIMING_KEYS:
        assert row[key] == ref[key], (row['iteration'], key)
