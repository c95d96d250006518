"""A training process killed with SIGKILL mid-iteration resumes from its last
checkpoint with its logs intact, and ends where an uninterrupted run ends."""

import contextlib
import io
import json
import os
import re
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
CKPT_RE = re.compile(r'ckpt_(\d+)$')


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


def _finished_checkpoints(base_dir):
  """Iterations of the finished checkpoints (`checkpoints/ckpt_N`; a save in
  progress is `ckpt_N.tmp`), ascending."""
  try:
    names = os.listdir(os.path.join(base_dir, 'checkpoints'))
  except FileNotFoundError:
    return []
  return sorted(int(m.group(1)) for m in map(CKPT_RE.match, names) if m)


def _status(base_dir):
  try:
    with open(os.path.join(base_dir, 'status.json'), encoding='utf-8') as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return None


def _wait_for_iteration_1(process, base_dir, timeout=240):
  """Returns once ckpt_0 is saved and status.json says iteration 1 runs.

  The runner logs an iteration's metrics line, saves its checkpoint, then
  writes status.json with the next iteration: from then on the process is in
  iteration 1 (about half a second of training on CartPole) with ckpt_0 final.
  """
  deadline = time.time() + timeout
  while time.time() < deadline:
    status = _status(base_dir)
    if (0 in _finished_checkpoints(base_dir) and status is not None and
        status['iteration'] >= 1):
      return
    if process.poll() is not None:
      raise AssertionError(f'training exited early with {process.returncode}: '
                           f'{process.stderr.read().decode()[-2000:]}')
    time.sleep(0.01)
  raise AssertionError(f'no ckpt_0 after {timeout}s')


def _signal_in_iteration_1(base_dir, cwd, env, signum):
  """Starts training, sends `signum` once iteration 1 runs; (exit code, stderr)."""
  process = subprocess.Popen(_command(base_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=str(cwd), env=env)
  try:
    _wait_for_iteration_1(process, base_dir)
    assert process.poll() is None, 'finished before the signal could be sent'
    process.send_signal(signum)
    process.wait(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, process.stderr.read()


def _logged_iterations(stderr):
  """Iterations whose summary line (`iteration N: ...`) a process printed."""
  return [int(m.group(1)) for m in
          re.finditer(rb'^iteration (\d+): agent_steps=', stderr, re.M)]


def test_sigkill_mid_iteration_then_resume(tmp_path):
  base_dir = str(tmp_path / 'run')
  metrics_path = os.path.join(base_dir, 'metrics.jsonl')
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  returncode, killed_stderr = _signal_in_iteration_1(base_dir, tmp_path, env,
                                                     signal.SIGKILL)
  assert returncode == -signal.SIGKILL
  # Killed in iteration 1: ckpt_0 is the newest finished checkpoint (a kill
  # during ckpt_1's save leaves only ckpt_1.tmp, which is not finished).
  checkpoints_at_kill = _finished_checkpoints(base_dir)
  assert checkpoints_at_kill == [0], (checkpoints_at_kill, killed_stderr[-2000:])
  latest = checkpoints_at_kill[-1]
  killed_lines = _complete_lines(metrics_path)
  killed_by_iteration = {json.loads(line)['iteration']: line
                         for line in killed_lines}
  # Iteration 0's line is logged before ckpt_0 is saved; iteration 1's is
  # there only if the kill landed between its line and its checkpoint.
  assert list(killed_by_iteration) in ([0], [0, 1]), killed_lines
  with open(os.path.join(base_dir, 'status.json'), encoding='utf-8') as f:
    assert json.load(f)['state'] == 'running'  # a SIGKILL leaves no trace
  # Wherever the kill landed, leave the worst tail one can: the next
  # iteration logged but not checkpointed, then a torn line. The resume must
  # drop both and log that iteration once, afresh.
  with open(metrics_path, 'ab') as f:
    if latest + 1 not in killed_by_iteration:
      stale = json.loads(killed_by_iteration[latest])
      stale.update(iteration=latest + 1, train_episode_return_mean=-12345.0)
      f.write(json.dumps(stale).encode() + b'\n')
    f.write(b'{"iteration": ' + str(latest + 2).encode() + b', "lo')

  resumed = subprocess.run(_command(base_dir), capture_output=True,
                           cwd=str(tmp_path), env=env, timeout=300)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert b'Traceback' not in resumed.stderr

  with open(metrics_path, 'rb') as f:
    data = f.read()
  assert data.endswith(b'\n')
  rows = [json.loads(line) for line in data.decode('utf-8').splitlines()]
  assert [r['iteration'] for r in rows] == list(range(NUM_ITERATIONS))
  assert all(r['train_episode_return_mean'] != -12345.0 for r in rows)
  # The lines of the checkpointed iterations are kept byte for byte, timing
  # keys included (a redone iteration would have new timings); later lines
  # were dropped on resume and logged again.
  lines = data.split(b'\n')[:-1]
  for iteration in range(latest + 1):
    assert lines[iteration] == killed_by_iteration[iteration], iteration
  # The resumed process restored ckpt_<latest> and ran only the iterations
  # after it: it printed their summary lines and no others.
  assert _logged_iterations(resumed.stderr) == list(
      range(latest + 1, NUM_ITERATIONS)), resumed.stderr.decode()[-3000:]
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


def test_sigterm_is_recorded_and_the_run_resumes(tmp_path):
  # SIGTERM (kill, Slurm, a stopped sweep) stops a run as Ctrl-C does: exit
  # 143, status.json 'failed' with the reason, and the same command resumes.
  base_dir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  returncode, stderr = _signal_in_iteration_1(base_dir, tmp_path, env,
                                              signal.SIGTERM)
  stderr = stderr.decode()
  assert returncode == 143, stderr[-2000:]
  assert stderr.rstrip().endswith('moerl: terminated (SIGTERM)')
  assert 'Traceback' not in stderr
  status = _status(base_dir)
  assert status['state'] == 'failed' and status['error'] == 'terminated (SIGTERM)'
  resumed = subprocess.run(_command(base_dir), capture_output=True,
                           cwd=str(tmp_path), env=env, timeout=300)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert _status(base_dir)['state'] == 'done'
  with open(os.path.join(base_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f.read().splitlines()]
  assert [r['iteration'] for r in rows] == list(range(NUM_ITERATIONS))
