"""`moerl train` / `moerl eval` / `moerl params` end to end, in-process.

A short Pong run with the Soft MoE config checks the run directory
(config.gin, metrics.jsonl, TensorBoard events, status.json, checkpoints) and
`moerl eval` on it; CartPole runs check determinism and refusals; every bad
input gets one `moerl: error:` line, exit code 2 and leaves the disk as it was.
"""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from experiments import gin_config
from experiments.cli import main

PONG_ITERATIONS = 3
PONG_STEPS = 300
PONG_ARGS = [
    '--gin_files', 'dqn_softmoe.gin',
    '--gin_bindings', f'Runner.num_iterations = {PONG_ITERATIONS}',
    '--gin_bindings', f'Runner.training_steps = {PONG_STEPS}',
    '--gin_bindings', 'DQNAgent.min_replay_history = 200',
    '--gin_bindings', 'DQNAgent.replay_capacity = 3000',
    '--gin_bindings', 'DQNAgent.batch_size = 8',
    '--gin_bindings', 'Runner.max_steps_per_episode = 150',
]
CARTPOLE_ARGS = [
    '--gin_files', 'cartpole_dqn.gin',
    '--gin_bindings', 'Runner.num_iterations = 2',
    '--gin_bindings', 'Runner.training_steps = 400',
    '--gin_bindings', 'Runner.evaluation_steps = 200',
    '--gin_bindings', 'DQNAgent.min_replay_history = 100',
    '--gin_bindings', 'DQNAgent.batch_size = 32',
    '--gin_bindings', 'MLPEncoder.hidden_units = (32,)',
    '--gin_bindings', 'DensePenultimate.hidden_units = 32',
]
DESIGN_KEYS = ('iteration', 'agent_steps', 'frames', 'train_episode_return_mean',
               'train_episodes', 'eval_episode_return_mean',
               'agent_steps_per_second', 'loss', 'game', 'seed', 'penultimate',
               'num_experts', 'num_params')
TIMING_KEYS = ('agent_steps_per_second', 'train_seconds')
NUM_EXPERTS = 8  # dqn_softmoe.gin


def _run_cli(argv):
  """main(argv) with stdout and stderr captured: (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(argv)
  return code, out.getvalue(), err.getvalue()


def _read_metrics(base_dir):
  with open(os.path.join(base_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f.read().splitlines()]


def _snapshot(base_dir):
  """{relative path: bytes} of every file under base_dir."""
  files = {}
  for directory, _, names in os.walk(base_dir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, base_dir)] = f.read()
  return files


def _assert_usage_error(code, stderr, *fragments):
  assert code == 2, stderr
  assert 'Traceback' not in stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert lines[0].startswith('moerl: error:'), stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# -- A short Pong run -------------------------------------------------------------


@pytest.fixture(scope='module')
def pong_run(tmp_path_factory):
  base_dir = str(tmp_path_factory.mktemp('pong') / 'run')
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + PONG_ARGS)
  assert code == 0, err
  return base_dir, err


def test_train_writes_config_and_status(pong_run):
  base_dir, err = pong_run
  with open(os.path.join(base_dir, 'config.gin'), encoding='utf-8') as f:
    config = f.read()
  # The operative config: bindings and included-file values, resolved.
  assert 'SoftMoE.num_experts = 8' in config
  assert f'Runner.training_steps = {PONG_STEPS}' in config
  assert 'DQNAgent.gamma = 0.99' in config
  with open(os.path.join(base_dir, 'status.json'), encoding='utf-8') as f:
    status = json.load(f)
  assert status['state'] == 'done'
  assert status['iteration'] == PONG_ITERATIONS
  assert status['error'] is None
  # One summary line per iteration on stderr, and the closing hint.
  assert err.count('iteration ') >= PONG_ITERATIONS
  assert 'done: metrics in' in err


def test_train_metrics_jsonl_has_design_keys(pong_run):
  base_dir, _ = pong_run
  rows = _read_metrics(base_dir)
  assert [r['iteration'] for r in rows] == list(range(PONG_ITERATIONS))
  for i, row in enumerate(rows):
    for key in DESIGN_KEYS:
      assert key in row, key
    assert row['agent_steps'] == (i + 1) * PONG_STEPS
    assert row['frames'] == 4 * row['agent_steps']  # 4 frames per agent step
    assert row['agent_steps_taken'] >= row['agent_steps']
    assert row['game'] == 'pong'
    assert row['seed'] == 0
    assert row['penultimate'] == 'softmoe'
    assert row['num_experts'] == 8
    assert row['eval_episode_return_mean'] is None  # continuous_train
    assert row['train_episodes'] >= 1  # episodes are capped at 150 steps
    assert -21 <= row['train_episode_return_mean'] <= 21
    assert row['agent_steps_per_second'] > 0
    assert math.isfinite(row['loss']) and row['loss'] > 0
  assert len({r['num_params'] for r in rows}) == 1
  # num_params is the network's count: `moerl params` for Pong's 6 actions.
  code, out, err = _run_cli(['params', '--json', '--num_actions', '6'] +
                            PONG_ARGS[:2])
  assert code == 0, err
  assert rows[0]['num_params'] == json.loads(out)['total']


def test_softmoe_run_logs_expert_metrics(pong_run):
  # min_replay_history 200 < 300 steps per iteration: every iteration runs
  # gradient steps, so every row holds the Soft MoE's expert metrics.
  base_dir, _ = pong_run
  rows = _read_metrics(base_dir)
  assert len(rows) == PONG_ITERATIONS
  for row in rows:
    moe = {key: value for key, value in row.items() if key.startswith('moe/')}
    for key, value in moe.items():  # the logger writes non-finite as null
      assert isinstance(value, (int, float)) and math.isfinite(value), (key,
                                                                       value)
    shares = [moe.pop(f'moe/expert_share_{i}') for i in range(NUM_EXPERTS)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)
    assert all(0 <= share <= 1 for share in shares), shares
    # srank of the last batch's penultimate features (8 states).
    srank = moe.pop('moe/srank')
    assert isinstance(srank, int) and 1 <= srank <= 8
    for key in ('moe/combine_entropy', 'moe/dispatch_entropy',
                'moe/router_grad_norm'):  # the Soft MoE's phi gradient
      assert moe.pop(key) >= 0, key
    for tau in ('0', '0.1'):
      for i in range(NUM_EXPERTS):
        assert 0 <= moe.pop(f'moe/dormant_{tau}_{i}') <= 1, (tau, i)
    # Nothing else: no ninth expert, no raw Gram matrix.
    assert not moe, sorted(moe)


def test_train_tensorboard_events_load_in_tensorboard(pong_run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # pylint: disable=g-import-not-at-top
  base_dir, _ = pong_run
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(base_dir))
  accumulator = EventAccumulator(base_dir)
  accumulator.Reload()
  tags = set(accumulator.Tags()['scalars'])
  for tag in ('agent_steps', 'frames', 'train_episode_return_mean',
              'train_episodes', 'agent_steps_per_second', 'loss'):
    assert tag in tags, tags
  rows = _read_metrics(base_dir)
  for tag in ('loss', 'agent_steps', 'train_episode_return_mean'):
    events = accumulator.Scalars(tag)
    assert [e.step for e in events] == list(range(PONG_ITERATIONS))
    for event, row in zip(events, rows):
      assert event.value == pytest.approx(row[tag], rel=1e-6)


def test_train_keeps_the_last_two_checkpoints(pong_run):
  base_dir, _ = pong_run
  checkpoints = sorted(os.listdir(os.path.join(base_dir, 'checkpoints')))
  assert checkpoints == [f'ckpt_{PONG_ITERATIONS - 2}',
                         f'ckpt_{PONG_ITERATIONS - 1}']
  for name in checkpoints:
    assert os.path.isfile(os.path.join(base_dir, 'checkpoints', name,
                                       'meta.json'))


def test_eval_on_the_run(pong_run, tmp_path):
  base_dir = str(tmp_path / 'copy')
  shutil.copytree(pong_run[0], base_dir)
  before = _snapshot(base_dir)
  code, out, err = _run_cli(['eval', '--base_dir', base_dir, '--episodes', '1'])
  assert code == 0, err
  assert 'episode 0: return' in out
  with open(os.path.join(base_dir, 'eval.json'), encoding='utf-8') as f:
    result = json.load(f)
  assert result['episodes'] == 1
  assert len(result['returns']) == 1
  assert -21 <= result['returns'][0] <= 21
  assert result['return_mean'] == result['returns'][0]
  assert result['checkpoint_iteration'] == PONG_ITERATIONS - 1
  assert f"{result['returns'][0]:.2f}" in out
  # eval adds eval.json and touches nothing else.
  after = _snapshot(base_dir)
  del after['eval.json']
  assert after == before


# -- CartPole: determinism and refusals ---------------------------------------------


@pytest.fixture(scope='module')
def cartpole_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('cartpole')
  dirs = []
  for name in ('a', 'b'):
    base_dir = str(root / name)
    code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
    assert code == 0, err
    dirs.append(base_dir)
  return dirs


def test_same_seed_and_config_give_identical_metrics(cartpole_runs):
  first, second = (_read_metrics(d) for d in cartpole_runs)
  assert [r['iteration'] for r in first] == [0, 1]
  assert len(second) == len(first)
  for a, b in zip(first, second):
    assert set(a) == set(b)
    for key in a:
      if key not in TIMING_KEYS:
        assert a[key] == b[key], key
  # The metrics are those of a real run, not constants.
  assert first[1]['eval_episode_return_mean'] is not None
  assert first[0]['loss'] != first[1]['loss']


def _copy_run(run_dir, tmp_path):
  base_dir = str(tmp_path / 'run')
  shutil.copytree(run_dir, base_dir)
  return base_dir


def test_refuses_a_base_dir_holding_a_different_config(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  before = _snapshot(base_dir)
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS +
                          ['--gin_bindings', 'DQNAgent.gamma = 0.9'])
  _assert_usage_error(code, err, 'different config')
  assert _snapshot(base_dir) == before


def test_refuses_a_corrupt_checkpoint(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  target = os.path.join(base_dir, 'checkpoints', 'ckpt_1', 'pytrees',
                        'agent.msgpack')
  with open(target, 'rb') as f:
    data = bytearray(f.read())
  middle = len(data) // 2
  for i in range(middle, middle + 16):
    data[i] ^= 0xFF
  with open(target, 'wb') as f:
    f.write(data)
  before = _snapshot(base_dir)
  # The same command resumes the run, which restores the newest checkpoint;
  # so does one that extends the run (config.gin is rewritten only once the
  # restore has worked).
  for extra in ([], ['--gin_bindings', 'Runner.num_iterations = 3']):
    code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS +
                            extra)
    _assert_usage_error(code, err, 'ckpt_1', 'corrupt')
    assert _snapshot(base_dir) == before


def test_refuses_to_resume_past_removed_checkpoints(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  shutil.rmtree(os.path.join(base_dir, 'checkpoints'))
  before = _snapshot(base_dir)
  # Starting over would drop the two logged iterations.
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
  _assert_usage_error(code, err, 'logs iterations up to 1',
                      'newest checkpoint is none')
  assert _snapshot(base_dir) == before


def test_refuses_a_damaged_metrics_line_before_writing(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  path = os.path.join(base_dir, 'metrics.jsonl')
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  lines[0] = lines[0][:100]  # a complete line that is no longer JSON
  with open(path, 'wb') as f:
    f.write(b'\n'.join(lines))
  before = _snapshot(base_dir)
  # Resuming as is and extending the run (which rewrites config.gin) alike.
  for extra in ([], ['--gin_bindings', 'Runner.num_iterations = 3']):
    code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS +
                            extra)
    _assert_usage_error(code, err, 'metrics.jsonl line 1 is not a JSON object')
    assert _snapshot(base_dir) == before


def test_a_group_refused_for_one_held_seed_writes_nothing(tmp_path):
  group = tmp_path / 'group'
  held = group / 'seed1'
  held.mkdir(parents=True)
  holder = subprocess.Popen(  # a live lone run of seed 1, as far as locks go
      [sys.executable, '-c', 'import sys\nfrom experiments.run_dir import RunDir\n'
       'RunDir(sys.argv[1]).lock()\nprint("locked", flush=True)\nsys.stdin.read()',
       str(held)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    code, _, err = _run_cli(['train', '--base_dir', str(group)] + CARTPOLE_ARGS +
                            ['--num_seeds', '2'])
    _assert_usage_error(code, err, str(held), 'is in use')
  finally:
    holder.communicate('')
  assert _snapshot(str(group)) == {}  # no config.gin for seed0 either


def test_num_seeds_refuses_a_lone_runs_directory(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  before = _snapshot(base_dir)
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS +
                          ['--num_seeds', '2'])
  _assert_usage_error(code, err, 'holds a run of its own', 'use a new --base_dir')
  assert _snapshot(base_dir) == before


@pytest.mark.parametrize('command', [['train'] + CARTPOLE_ARGS, ['eval'],
                                     ['experts']])
def test_a_seed_groups_directory_is_named_as_such(cartpole_runs, tmp_path, command):
  group = tmp_path / 'group'
  for seed in ('seed0', 'seed1'):
    shutil.copytree(cartpole_runs[0], group / seed)
  before = _snapshot(str(group))
  code, _, err = _run_cli([command[0], '--base_dir', str(group)] + command[1:])
  _assert_usage_error(code, err, '--num_seeds group (seed0, seed1)',
                      str(group / 'seed0'))
  assert _snapshot(str(group)) == before


def test_a_tilde_in_base_dir_is_the_home_directory(tmp_path, monkeypatch):
  """As a shell would expand it: --base_dir=~/x reaches moerl unexpanded."""
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(tmp_path)
  one = [a if a != 'Runner.num_iterations = 2' else 'Runner.num_iterations = 1'
         for a in CARTPOLE_ARGS]
  assert _run_cli(['train', '--base_dir', '~/run'] + one)[0] == 0
  code, _, err = _run_cli(['eval', '--base_dir', '~/run', '--episodes', '1'])
  assert code == 0, err
  assert not os.path.exists(tmp_path / '~')  # nothing went to a literal ~ folder
  assert {'config.gin', 'metrics.jsonl', 'status.json', 'checkpoints',
          'eval.json'} <= set(os.listdir(home / 'run'))


def test_xla_out_of_memory_errors_are_recognised():
  from experiments import cli  # pylint: disable=import-outside-toplevel
  for text in ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate',
               'INTERNAL: Failed to allocate: Out of memory allocating 25769804548 '
               'bytes'):
    assert cli._is_out_of_memory(RuntimeError(text))  # pylint: disable=protected-access
  assert cli._is_out_of_memory(MemoryError())  # pylint: disable=protected-access
  assert not cli._is_out_of_memory(  # pylint: disable=protected-access
      RuntimeError('INTERNAL: something else'))


def test_a_run_directory_in_use_by_another_process_is_refused(cartpole_runs,
                                                              tmp_path):
  """A second `moerl train` on a directory that a live process trains in (a
  duplicated job) is refused; once that process is gone the run is free."""
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  holder = subprocess.Popen(  # holds the lock RunDir.lock takes, as a run does
      [sys.executable, '-c', 'import sys\nfrom experiments.run_dir import RunDir\n'
       'RunDir(sys.argv[1]).lock()\nprint("locked", flush=True)\nsys.stdin.read()',
       base_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    before = _snapshot(base_dir)
    extend = ['--gin_bindings', 'Runner.num_iterations = 3']
    code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS + extend)
    _assert_usage_error(code, err, 'is in use', 'another moerl process')
    assert _snapshot(base_dir) == before
  finally:
    holder.communicate('')  # it exits, and the kernel drops its lock
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
  assert code == 0 and 'nothing to train' in err, err


def test_a_run_stopped_before_its_first_iteration_was_logged_resumes(cartpole_runs,
                                                                     tmp_path):
  # What a kill in iteration 0 leaves: config.gin and status.json, nothing else.
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  for name in os.listdir(base_dir):
    if name not in ('config.gin', 'status.json'):
      path = os.path.join(base_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
  assert code == 0, err
  assert [r['iteration'] for r in _read_metrics(base_dir)] == [0, 1]
  assert (_read_metrics(base_dir)[1]['loss'] ==
          _read_metrics(cartpole_runs[0])[1]['loss'])  # the same run, from the start


def test_a_finished_runs_directory_is_free_once_run_experiment_returns(cartpole_runs,
                                                                      tmp_path):
  import gin  # pylint: disable=import-outside-toplevel
  from experiments.run_dir import RunDir  # pylint: disable=import-outside-toplevel
  from experiments.runner import Runner  # pylint: disable=import-outside-toplevel
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  gin_config.load(['cartpole_dqn.gin'], CARTPOLE_ARGS[3::2])
  runner = Runner(base_dir)
  try:
    runner.run_experiment(gin.operative_config_str())  # nothing to train
    other = RunDir(base_dir)
    other.lock()  # not refused: the runner let go although it is still open
    other.unlock()
  finally:
    runner.close()


def test_eval_refuses_an_eval_json_directory_before_playing(cartpole_runs,
                                                            tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  os.mkdir(os.path.join(base_dir, 'eval.json'))
  before = _snapshot(base_dir)
  code, out, err = _run_cli(['eval', '--base_dir', base_dir, '--episodes', '1'])
  _assert_usage_error(code, err, 'eval.json is a directory')
  assert out == ''  # no episode played
  assert _snapshot(base_dir) == before


@pytest.mark.parametrize('command', ['train', 'eval'])
@pytest.mark.parametrize('entry,make', [('checkpoints', 'file'),
                                        ('metrics.jsonl', 'dir')])
def test_refuses_misplaced_run_entries(cartpole_runs, tmp_path, command, entry,
                                       make):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  path = os.path.join(base_dir, entry)
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  if make == 'file':
    open(path, 'w').close()
  else:
    os.mkdir(path)
  before = _snapshot(base_dir)
  args = CARTPOLE_ARGS if command == 'train' else ['--episodes', '1']
  code, _, err = _run_cli([command, '--base_dir', base_dir] + args)
  _assert_usage_error(code, err, entry)
  assert _snapshot(base_dir) == before


def test_rerunning_a_finished_run_changes_no_results(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  before = _snapshot(base_dir)
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
  assert code == 0, err
  assert 'all 2 iterations are done; nothing to train' in err
  after = _snapshot(base_dir)
  assert set(after) == set(before)  # no new (empty) TensorBoard file either
  assert all(after[f] == before[f] for f in after if f != 'status.json')
  with open(os.path.join(base_dir, 'status.json'), encoding='utf-8') as f:
    assert json.load(f)['state'] == 'done'


def test_a_binding_without_effect_is_warned_about(cartpole_runs, tmp_path):
  # cartpole_dqn.gin builds a dense layer and no scope 'train': neither binding
  # changes the run (its config is the finished run's), and each gets a warning.
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  unused = ['SoftMoE.num_experts = 4', 'train/DQNAgent.gamma = 0.5']
  argv = ['train', '--base_dir', base_dir] + CARTPOLE_ARGS
  for binding in unused:
    argv += ['--gin_bindings', binding]
  code, _, err = _run_cli(argv)
  assert code == 0, err
  warnings = [l for l in err.splitlines() if l.startswith('moerl: warning:')]
  assert warnings == [f"moerl: warning: --gin_bindings '{b}' has no effect: nothing "
                      'this config builds uses that parameter.' for b in unused]
  assert 'nothing to train' in err
  # The bindings the config uses draw no warning.
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
  assert code == 0 and 'warning' not in err, err


def test_fewer_iterations_than_a_run_holds_is_refused(cartpole_runs, tmp_path):
  base_dir = _copy_run(cartpole_runs[0], tmp_path)
  before = _snapshot(base_dir)
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS +
                          ['--gin_bindings', 'Runner.num_iterations = 1'])
  _assert_usage_error(code, err, 'holds 2 finished iterations',
                      'Runner.num_iterations = 1')
  assert _snapshot(base_dir) == before


@pytest.mark.parametrize('argv,fragments', [
    (['--gin_files', 'dqn.gin', '--gin_bindings',
      "create_atari_environment.game_name = 'Pongg'"], ['Pongg']),
    (['--gin_files', 'dqn.gin', '--gin_bindings', 'DQNAgent.gama = 0.9'],
     ['gama']),
    (['--gin_files', 'no_such_config.gin'], ['no_such_config.gin']),
    (['--gin_files', 'cartpole_dqn_softmoe.gin', '--gin_bindings',
      'SoftMoE.num_experts = 0'], ['num_experts']),
    (['--gin_files', 'dqn_topk.gin', '--gin_bindings', 'TopKMoE.k = 9'],
     ['TopKMoE.k']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings', 'Runner.seed = -1'],
     ['Runner.seed']),
    (['--gin_files', 'cartpole_dqn_softmoe.gin', '--gin_bindings',
      "SoftMoE.num_experts = 'x'"], ['SoftMoE']),
    (['--gin_files', 'cartpole_dqn_softmoe.gin', '--gin_bindings',
      'SoftMoE.num_experts = 2.0'], ['SoftMoE.num_experts=2.0', 'integer']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'DQNAgent.min_replay_history = 0'], ['min_replay_history=0']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'Runner.evaluation_steps = -5'], ['Runner.evaluation_steps=-5']),
    (['--gin_files', 'cartpole_rainbow_softmoe.gin', '--gin_bindings',
      'DQNAgent.gamma = 0.9'], ['DQNAgent.gamma', 'RainbowAgent.gamma']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'Runner.seed = 99999999999999999999'], ['Runner.seed', '2147483647']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'import no_such_module'], ['no_such_module']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'DQNAgent.replay_capacity = 10000000000000'], ['out of memory']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      "Runner.checkpoint_replay = 'no'"], ['Runner.checkpoint_replay', 'True or False']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'create_optimizer.learning_rate = -1.0'], ['learning_rate=-1.0']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'DQNAgent.gamma = (0.9'], ['bad gin config', 'unclosed bracket']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'DQNAgent.epsilon_train = 2.0'], ['DQNAgent.epsilon_train=2.0', '[0, 1]']),
    (['--gin_files', 'cartpole_rainbow_softmoe.gin', '--gin_bindings',
      'RainbowAgent.epsilon_eval = -0.5'], ['RainbowAgent.epsilon_eval=-0.5', '[0, 1]']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'DQNAgent.gamma = 1.5'], ['DQNAgent.gamma=1.5', '[0, 1]']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      "create_optimizer.learning_rate = '1e-3'"],
     ["create_optimizer.learning_rate='1e-3' must be a finite number"]),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'MLPEncoder.hidden_units = 512'], ['MLPEncoder.hidden_units=512', '(512,)']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'create_optimizer.learning_rate = 1e400'],
     ['create_optimizer.learning_rate=inf', 'finite']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      'create_optimizer.beta1 = 2.0'], ['create_optimizer.beta1=2.0', 'in [0, 1)']),
    (['--gin_files', 'cartpole_dqn.gin', '--gin_bindings',
      "create_optimizer.learning_rate = float('nan')"],
     ['bad gin config', 'must be a literal', 'not a Python expression']),
], ids=['unknown_game', 'unknown_parameter', 'missing_gin_file',
        'zero_experts', 'k_above_experts', 'negative_seed', 'experts_not_a_number',
        'experts_not_an_int', 'no_warmup', 'negative_eval_steps',
        'dqn_binding_on_rainbow', 'huge_seed', 'missing_gin_import',
        'replay_beyond_memory', 'flag_not_a_bool', 'negative_learning_rate',
        'unclosed_bracket', 'epsilon_above_1', 'epsilon_below_0', 'gamma_above_1',
        'learning_rate_a_string', 'hidden_units_not_a_tuple', 'learning_rate_inf',
        'beta1_above_1', 'value_not_a_literal'])
def test_bad_train_input_is_refused_without_writing(argv, fragments, tmp_path,
                                                    cartpole_runs):
  # A fresh base_dir is not even created ...
  fresh = str(tmp_path / 'fresh')
  code, _, err = _run_cli(['train', '--base_dir', fresh] + argv)
  _assert_usage_error(code, err, *fragments)
  assert not os.path.exists(fresh)
  # ... and an existing run is left exactly as it was.
  existing = _copy_run(cartpole_runs[1], tmp_path)
  before = _snapshot(existing)
  code, _, err = _run_cli(['train', '--base_dir', existing] + argv)
  _assert_usage_error(code, err)
  assert _snapshot(existing) == before


def test_bad_gin_files_are_named_on_one_line(tmp_path):
  loop_a, loop_b = tmp_path / 'a.gin', tmp_path / 'b.gin'
  loop_a.write_text(f"include '{loop_b}'\n")
  loop_b.write_text(f"include 'cartpole_dqn.gin'\ninclude '{loop_a}'\n")
  binary = tmp_path / 'binary.gin'
  binary.write_bytes(b'\xad\xff\x00 not text')
  for path, fragments in ((loop_a, [f'includes of {loop_a}, {loop_b} form a loop']),
                          (binary, [f'{binary} is not UTF-8 text'])):
    fresh = str(tmp_path / 'fresh')
    code, _, err = _run_cli(['train', '--base_dir', fresh, '--gin_files', str(path)])
    _assert_usage_error(code, err, 'bad gin config', *fragments)
    assert not os.path.exists(fresh)
    code, _, err = _run_cli(['params', '--gin_files', str(path)])
    _assert_usage_error(code, err, *fragments)


def test_an_include_loop_names_each_file_once(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where the relative includes are found
  (tmp_path / 'a.gin').write_text("include 'b.gin'\n")
  (tmp_path / 'b.gin').write_text("include 'a.gin'\n")
  code, _, err = _run_cli(['params', '--gin_files', str(tmp_path / 'a.gin')])
  _assert_usage_error(code, err, f'the includes of {tmp_path / "a.gin"}, b.gin form a loop')


def test_eval_refuses_a_dir_without_a_run(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  code, out, err = _run_cli(['eval', '--base_dir', str(empty)])
  _assert_usage_error(code, err, 'not a moerl run')
  assert out == ''
  assert os.listdir(empty) == []
  missing = str(tmp_path / 'missing')
  code, _, err = _run_cli(['eval', '--base_dir', missing, '--episodes', '1'])
  _assert_usage_error(code, err)
  assert not os.path.exists(missing)


# -- moerl params ----------------------------------------------------------------


@pytest.mark.parametrize('config', gin_config.shipped_configs())
def test_params_works_for_every_shipped_config(config):
  code, out, err = _run_cli(['params', '--gin_files', config])
  assert code == 0, err
  total_line = [l for l in out.splitlines() if l.startswith('total')]
  assert len(total_line) == 1, out
  total = int(total_line[0].split()[-1].replace(',', ''))
  assert total > 1000


def test_params_warns_about_a_binding_without_effect(tmp_path):
  # The agent is built in scope 'main': unscoped bindings reach it there, and
  # so do those of its own scope; scope 'other' never happens.
  scoped = tmp_path / 'scoped.gin'
  scoped.write_text("include 'cartpole_dqn.gin'\nRunner.agent = @main/DQNAgent\n")
  code, out, err = _run_cli([
      'params', '--gin_files', str(scoped),
      '--gin_bindings', 'SoftMoE.num_experts = 4',
      '--gin_bindings', 'DensePenultimate.hidden_units = 8',
      '--gin_bindings', 'DQNAgent.gamma = 0.5',
      '--gin_bindings', 'main/DQNAgent.batch_size = 8',
      '--gin_bindings', 'other/DQNAgent.gamma = 0.9',
      # Set by `params` itself; they take effect in `train`.
      '--gin_bindings', 'Runner.num_envs = 4',
      '--gin_bindings', 'Runner.num_actions = 3'])
  assert code == 0, err
  assert err.splitlines() == [
      f"moerl: warning: --gin_bindings '{b}' has no effect: nothing this config "
      'builds uses that parameter.'
      for b in ('SoftMoE.num_experts = 4', 'other/DQNAgent.gamma = 0.9')]
  assert 'softmoe' not in out.lower() and 'total' in out


@pytest.mark.parametrize('argv,fragments', [
    (['--gin_files', 'dqn.gin', '--gin_bindings', 'DQNAgent.gama = 0.9'],
     ['gama']),
    (['--gin_files', 'dqn_softmoe.gin', '--gin_bindings',
      'SoftMoE.num_experts = 0'], ['num_experts']),
    (['--gin_files', 'dqn_topk.gin', '--gin_bindings', 'TopKMoE.k = 9'],
     ['TopKMoE.k']),
    (['--gin_files', 'no_such_config.gin'], ['no_such_config.gin']),
    (['--gin_files', 'dqn.gin', '--num_actions', '0'], ['--num_actions']),
], ids=['unknown_parameter', 'zero_experts', 'k_above_experts',
        'missing_gin_file', 'zero_actions'])
def test_bad_params_input_is_refused(argv, fragments):
  code, out, err = _run_cli(['params'] + argv)
  _assert_usage_error(code, err, *fragments)
  assert out == ''


@pytest.mark.parametrize('config,expected', [('dqn.gin', 4052658),
                                             ('dqn_softmoe.gin', 754482)])
def test_params_json_matches_reference_counts(config, expected):
  code, out, err = _run_cli(['params', '--gin_files', config, '--json'])
  assert code == 0, err
  result = json.loads(out)
  assert result['total'] == expected
  assert result['num_actions'] == 18
  assert sum(result['modules'].values()) == expected


@pytest.mark.parametrize('argv', [
    ['train', '--gin_files', 'dqn.gin'],  # --base_dir missing
    ['train', '--base_dir', 'x', '--gin_files', 'dqn.gin', '--num_seeds', 'abc'],
    ['sweep', 'spec.toml', '--out', 'o', '--backend', 'foo'],
    ['no_such_command'],
], ids=['missing_flag', 'not_an_int', 'bad_choice', 'unknown_command'])
def test_argument_errors_are_one_line_and_exit_2(argv, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, out, err = _run_cli(argv)
  _assert_usage_error(code, err)
  assert out == '' and os.listdir(tmp_path) == []


def test_a_finished_run_is_extended_by_a_larger_num_iterations(tmp_path):
  """As in Dopamine: the same command with more iterations continues the run
  (config.gin then says so); any other change is a different run."""
  base_dir = str(tmp_path / 'run')
  one = [a if a != 'Runner.num_iterations = 2' else 'Runner.num_iterations = 1'
         for a in CARTPOLE_ARGS]
  assert _run_cli(['train', '--base_dir', base_dir] + one)[0] == 0
  first = _read_metrics(base_dir)
  code, _, err = _run_cli(['train', '--base_dir', base_dir] + CARTPOLE_ARGS)
  assert code == 0, err
  rows = _read_metrics(base_dir)
  assert [r['iteration'] for r in rows] == [0, 1]
  assert rows[0] == first[0]  # iteration 0 kept, not retrained
  with open(os.path.join(base_dir, 'config.gin'), encoding='utf-8') as f:
    assert 'Runner.num_iterations = 2' in f.read()
