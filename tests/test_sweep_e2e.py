"""End to end: `moerl sweep` runs real `moerl train` subprocesses on CartPole,
then `moerl plot` summarises them (local and Ray backends)."""

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import cli
from experiments.checkpoints import Checkpointer
from experiments.logger import read_metrics

SPEC = """
name = "tiny"
gin_files = ["cartpole_dqn_softmoe.gin"]
bindings = [
  "Runner.num_iterations = 2",
  "Runner.training_steps = 300",
  "Runner.schedule = 'continuous_train'",
  "DQNAgent.min_replay_history = 100",
  "DQNAgent.batch_size = 32",
]
game_binding = "create_gym_environment.environment_name"
games = ["CartPole"]
seeds = [0, 1]
name_template = "{template}"
[grid]
"SoftMoE.num_experts" = [1, 2]
{extra}
"""


def _write_spec(tmp_path, extra='', template='e{num_experts}/seed{seed}'):
  path = tmp_path / 'spec.toml'
  path.write_text(SPEC.replace('{extra}', extra).replace('{template}', template))
  return str(path)


def _runs(out):
  return sorted(os.path.relpath(os.path.dirname(os.path.join(d, 'x')), out)
                for d, _, files in os.walk(out) if 'metrics.jsonl' in files)


def test_local_sweep_then_plot(tmp_path, capsys):
  spec, out = _write_spec(tmp_path), str(tmp_path / 'sweep')
  assert cli.main(['sweep', spec, '--out', out, '--workers', '2']) == 0
  assert _runs(out) == ['e1/seed0', 'e1/seed1', 'e2/seed0', 'e2/seed1']
  for run in _runs(out):
    status = json.load(open(os.path.join(out, run, 'status.json')))
    assert status['state'] == 'done'
    metrics = read_metrics(os.path.join(out, run, 'metrics.jsonl'))
    assert [m['iteration'] for m in metrics] == [0, 1]
    assert metrics[0]['num_experts'] == int(run[1])

  # A finished sweep run again does no work: every run is skipped.
  mtimes = {r: os.path.getmtime(os.path.join(out, r, 'metrics.jsonl'))
            for r in _runs(out)}
  capsys.readouterr()
  assert cli.main(['sweep', spec, '--out', out, '--workers', '2']) == 0
  assert 'skipped' in capsys.readouterr().err
  assert mtimes == {r: os.path.getmtime(os.path.join(out, r, 'metrics.jsonl'))
                    for r in _runs(out)}

  # Fewer iterations than the runs hold: `moerl train` would refuse each run, so the
  # sweep refuses up front on one line (a dry run too) and writes nothing, manifest
  # included.
  lowered = open(spec).read().replace('Runner.num_iterations = 2',
                                      'Runner.num_iterations = 1')
  with open(spec, 'w') as f:
    f.write(lowered)
  before = _files(out)
  for flags in (['--dry_run'], []):
    code, stdout, stderr = _run_cli(['sweep', spec, '--out', out, *flags])
    assert code == 2 and stdout == '', (flags, stdout, stderr)
    assert stderr.startswith('moerl: error:') and stderr.count('\n') == 1, stderr
    assert ("holds run 'e1/seed0' with 2 finished iterations, more than its "
            'Runner.num_iterations = 1' in stderr), stderr
  assert _files(out) == before

  plots = str(tmp_path / 'plots')
  assert cli.main(['plot', out, '--out', plots, '--last_n', '1']) == 0
  for name in ('learning_curves', 'scaling'):
    for ext in ('png', 'pdf'):
      assert os.path.getsize(os.path.join(plots, f'{name}.{ext}')) > 1000
  rows = list(csv.DictReader(open(os.path.join(plots, 'summary.csv'))))
  run_rows = [r for r in rows if r['level'] == 'run']
  assert len(run_rows) == 4
  for row in run_rows:
    run = f"e{int(float(row['num_experts']))}/seed{int(float(row['seed']))}"
    metrics = read_metrics(os.path.join(out, run, 'metrics.jsonl'))
    expected = metrics[-1]['train_episode_return_mean']  # last_n = 1
    assert float(row['final_score']) == pytest.approx(expected, rel=1e-6)


def test_failing_run_does_not_stop_the_others(tmp_path, capsys):
  spec, out = _write_spec(tmp_path), str(tmp_path / 'sweep')
  # A foreign file in one run's directory: that run's `moerl train` refuses it.
  os.makedirs(os.path.join(out, 'e2', 'seed1'))
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump({'sweep': 'tiny', 'runs': []}, f)
  with open(os.path.join(out, 'e2', 'seed1', 'notes.txt'), 'w') as f:
    f.write('mine\n')
  code = cli.main(['sweep', spec, '--out', out, '--workers', '2'])
  err = capsys.readouterr().err
  assert code == 1
  states = {r: json.load(open(os.path.join(out, r, 'status.json')))['state']
            for r in _runs(out)}
  assert states == {'e1/seed0': 'done', 'e1/seed1': 'done', 'e2/seed0': 'done'}
  assert 'failed e2/seed1' in err and 'is a foreign directory' in err
  assert open(os.path.join(out, 'e2', 'seed1', 'notes.txt')).read() == 'mine\n'


ALONE = ('name = "x"\nbindings = ["Runner.num_iterations = 1"]\n'
         'gin_files = ["cartpole_dqn.gin"]\n')


@pytest.mark.parametrize('extra,template,fragment', [
    ('[[zip]]\n"SoftMoE.capacity_factor" = [1.0, -1.0]\n',
     'e{num_experts}/cf{capacity_factor}/seed{seed}',
     "run 'e1/cf-1.0/seed0': bad config: SoftMoE.capacity_factor=-1.0 is out of range"),
    ('[[variants]]\nname = "moe"\n[[variants]]\nname = "dense"\n'
     'gin_files = ["cartpole_dqn.gin"]\n', '{variant}/e{num_experts}/seed{seed}',
     "runs 'dense/e1/seed0' and 'dense/e2/seed0' would train the same config: they "
     'differ only in SoftMoE.num_experts'),
    ('[grid]\n"DQNAgent.replay_capacity" = [1000, 1000000000000]\n', None,
     "run 'replay_capacity=1000000000000': out of memory: "),
    ('variant_binding = "Runner.variant"\n[[variants]]\nname = "a"\n'
     '[[variants]]\nname = "b"\n', None,
     "runs 'a' and 'b' would train the same config: variants 'a' and 'b' differ only "
     'in name'),
    ('games = ["Pong", "Breakout"]\n', None,
     "run 'Pong' does not use its game binding"),
], ids=['bad_value', 'axis_without_effect', 'out_of_memory', 'variant_names',
        'game_binding_without_effect'])
@pytest.mark.parametrize('dry_run', [[], ['--dry_run']], ids=['run', 'dry_run'])
def test_configs_are_built_before_any_run_starts(tmp_path, capsys, extra, template,
                                                 fragment, dry_run):
  if template is None:  # a spec of its own, on a dense CartPole config
    spec = str(tmp_path / 'spec.toml')
    with open(spec, 'w') as f:
      f.write(ALONE + extra)
  else:
    spec = _write_spec(tmp_path, extra, template=template)
  out = str(tmp_path / 'sweep')
  assert cli.main(['sweep', spec, '--out', out, *dry_run]) == 2
  err = capsys.readouterr().err
  assert err.startswith('moerl: error:') and err.count('\n') == 1, err
  assert fragment in err
  assert not os.path.exists(out)


def test_bad_axis_parameter_is_refused(tmp_path, capsys):
  spec = _write_spec(tmp_path, '[[zip]]\n"SoftMoE.num_expertz" = [1]\n')
  assert cli.main(['sweep', spec, '--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('moerl: error:') and 'num_expertz' in err
  assert 'Traceback' not in err and not os.path.exists(tmp_path / 'o')


def test_ray_backend(tmp_path):
  ray = pytest.importorskip('ray')
  spec, out = _write_spec(tmp_path), str(tmp_path / 'sweep')
  try:
    assert cli.main(['sweep', spec, '--out', out, '--workers', '2',
                     '--backend', 'ray']) == 0
  finally:
    if ray.is_initialized():
      ray.shutdown()
  assert len(_runs(out)) == 4
  returns = [read_metrics(os.path.join(out, r, 'metrics.jsonl'))[-1]['agent_steps']
             for r in _runs(out)]
  assert np.all(np.array(returns) == 600)


def _closed_port():
  """A local TCP port that nothing listens on."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('flags,fragment', [
    (['--backend', 'ray', '--ray_address', 'localhost:{port}'],
     'cannot reach the Ray cluster at localhost:{port} ('),
    (['--gpus_per_run', '1'], 'gpus_per_run 1.0 applies to the ray backend only'),
    (['--cpus_per_run', '8'], 'cpus_per_run 8.0 applies to the ray backend only'),
], ids=['unreachable_ray_address', 'local_gpus_per_run', 'local_cpus_per_run'])
def test_cli_sweep_refuses_bad_backend_options_on_one_line_without_writing(
    tmp_path, monkeypatch, flags, fragment):
  # Ray must not be started: ray.init on an unreachable address would retry for ever.
  monkeypatch.setitem(sys.modules, 'ray', None)
  port = _closed_port()
  flags = [f.replace('{port}', str(port)) for f in flags]
  spec, out = _write_spec(tmp_path), str(tmp_path / 'sweep')
  for dry_run in (['--dry_run'], []):
    code, stdout, stderr = _run_cli(['sweep', spec, '--out', out, *flags, *dry_run])
    assert code == 2 and stdout == '', (dry_run, stdout, stderr)
    assert stderr.startswith('moerl: error:') and stderr.count('\n') == 1, stderr
    assert fragment.replace('{port}', str(port)) in stderr, stderr
  assert not os.path.exists(out)


def test_seeds_per_process(tmp_path):
  spec, out = _write_spec(tmp_path), str(tmp_path / 'sweep')
  assert cli.main(['sweep', spec, '--out', out, '--workers', '2',
                   '--seeds_per_process']) == 0
  assert _runs(out) == ['e1/seed0', 'e1/seed1', 'e2/seed0', 'e2/seed1']
  # One process per expert count: its log sits above the seed directories.
  for group in ('e1', 'e2'):
    log = open(os.path.join(out, group, 'sweep.log')).read()
    assert '--num_seeds 2' in log
    assert not os.path.exists(os.path.join(out, group, 'seed0', 'sweep.log'))
  for run in _runs(out):
    metrics = read_metrics(os.path.join(out, run, 'metrics.jsonl'))
    assert [m['seed'] for m in metrics] == [int(run[-1])] * 2


def _files(root):
  return {os.path.relpath(os.path.join(d, f), root):
          (open(os.path.join(d, f), 'rb').read(),
           os.stat(os.path.join(d, f)).st_mtime_ns)
          for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize('text,flags,fragment', [
    (None, ['--seeds_per_process'], "needs run names ending in '/seed{seed}'"),
    ('name = "x"\ngin_files = ["dqn.gin"]\ngames = ["NotAGame"]\n', [],
     "unknown Atari game 'NotAGame'"),
    ('name = "x"\ngin_files = ["dqn.gin"]\nseeds = [-1]\n', [],
     'seeds must be non-negative'),
    ('name = "x"\ngin_files = ["dqn.gin"]\nbindings = ["DQNAgent.gamma = float(\'nan\')"]\n',
     [], "bad binding 'DQNAgent.gamma': a value must be a literal"),
    ('name = "x"\ngin_files = ["dqn.gin"]\nbindings = ["DQNAgent.gama = 0.9"]\n', [],
     "bad binding 'DQNAgent.gama'"),
], ids=['ungroupable_seeds', 'unknown_game', 'negative_seed', 'value_not_a_literal',
        'unknown_parameter'])
@pytest.mark.parametrize('dry_run', [[], ['--dry_run']], ids=['run', 'dry_run'])
def test_bad_sweep_is_refused_on_one_line_without_writing(tmp_path, capsys, text,
                                                          flags, fragment, dry_run):
  if text is None:
    spec = _write_spec(tmp_path, template='e{num_experts}-s{seed}')
  else:
    spec = str(tmp_path / 'spec.toml')
    with open(spec, 'w') as f:
      f.write(text)
  fresh, existing = str(tmp_path / 'fresh'), str(tmp_path / 'existing')
  os.makedirs(existing)
  with open(os.path.join(existing, 'manifest.json'), 'w') as f:
    json.dump({'sweep': 'tiny' if text is None else 'x', 'runs': []}, f)
  before = _files(existing)
  for out in (fresh, existing):
    capsys.readouterr()
    assert cli.main(['sweep', spec, '--out', out, *flags, *dry_run]) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err.startswith('moerl: error:') and fragment in captured.err
    assert captured.err.count('\n') == 1
  assert not os.path.exists(fresh) and _files(existing) == before


def _run_cli(argv):
  """cli.main(argv) with stdout and stderr captured: (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, out.getvalue(), err.getvalue()


def _read_json(path):
  """The JSON object in path, or None while it is missing or unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _wait_for(condition, proc, what, timeout=600):
  """Polls condition() until it is true; fails if proc exits first or on timeout."""
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, f'the sweep exited ({proc.returncode}) before {what}'
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)


def _kill_group(proc):
  """SIGKILLs proc's process group (the sweep and its trainer) and reaps proc."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()
  # The trainer is reparented when the sweep dies; wait (bounded) until it is gone.
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    try:
      os.killpg(proc.pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.05)


KILL_ITERATIONS = 5


def test_killed_sweep_rerun_skips_done_runs_and_resumes_the_killed_one(tmp_path):
  spec = _write_spec(tmp_path, template='seed{seed}')
  text = open(spec).read()
  for old, new in (('Runner.num_iterations = 2',
                    f'Runner.num_iterations = {KILL_ITERATIONS}'),
                   ('Runner.training_steps = 300', 'Runner.training_steps = 600'),
                   ('seeds = [0, 1]', 'seeds = [0, 1, 2]'),
                   ('"SoftMoE.num_experts" = [1, 2]', '"SoftMoE.num_experts" = [2]')):
    assert old in text
    text = text.replace(old, new)
  with open(spec, 'w') as f:
    f.write(text)
  out = str(tmp_path / 'sweep')
  first, killed, last = (os.path.join(out, f'seed{s}') for s in range(3))
  command = [sys.executable, '-m', 'experiments.cli', 'sweep', spec, '--out', out,
             '--workers', '1']

  with open(tmp_path / 'first_sweep.log', 'wb') as log:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
  try:
    # Kill once the first run is done and the second has checkpointed an iteration,
    # so that a resume (not a restart) is observable.
    def second_run_checkpointed():
      status = _read_json(os.path.join(killed, 'status.json')) or {}
      return status.get('state') == 'running' and status.get('iteration', 0) >= 1
    _wait_for(second_run_checkpointed, proc, 'the second run checkpointed')
    assert (_read_json(os.path.join(first, 'status.json')) or {}).get('state') == 'done'
  finally:
    _kill_group(proc)
  assert proc.returncode == -signal.SIGKILL

  # The state the kill left behind.
  assert _read_json(os.path.join(killed, 'status.json'))['state'] == 'running'
  assert not os.path.exists(last)
  first_files = _files(first)
  assert 'metrics.jsonl' in first_files
  assert any(f.startswith('checkpoints' + os.sep) for f in first_files)
  kept = Checkpointer(os.path.join(killed, 'checkpoints')).latest_iteration()
  assert kept is not None and kept < KILL_ITERATIONS - 1
  with open(os.path.join(killed, 'metrics.jsonl'), 'rb') as f:
    killed_lines = f.read().split(b'\n')[:kept + 1]

  rerun = subprocess.run(command, capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
  assert rerun.returncode == 0, rerun.stderr
  assert '3 run(s), 1 already done, 2 to run' in rerun.stderr

  for run in (first, killed, last):
    status = _read_json(os.path.join(run, 'status.json'))
    assert status['state'] == 'done' and status['iteration'] == KILL_ITERATIONS
    with open(os.path.join(run, 'metrics.jsonl'), 'rb') as f:
      data = f.read()
    assert data.endswith(b'\n')
    records = [json.loads(line) for line in data.decode().splitlines()]  # no torn line
    assert [r['iteration'] for r in records] == list(range(KILL_ITERATIONS))

  # The finished run was not touched: same bytes, same mtimes.
  assert _files(first) == first_files

  # The killed run resumed from its checkpoint: the iterations it had checkpointed
  # keep their bytes (train_seconds differs on a retrain) and are not retrained.
  with open(os.path.join(killed, 'metrics.jsonl'), 'rb') as f:
    assert f.read().split(b'\n')[:kept + 1] == killed_lines
  sections = open(os.path.join(killed, 'sweep.log')).read().split('=== sweep ')
  assert len(sections) == 3  # '' before the first header, then one per start
  for i in range(KILL_ITERATIONS):
    assert (f'iteration {i}:' in sections[2]) == (i > kept), (i, kept)


TINY = """
name = "tiny"
gin_files = ["cartpole_dqn_softmoe.gin"]
bindings = ["Runner.num_iterations = 1", "Runner.training_steps = 200"]
game_binding = "create_gym_environment.environment_name"
games = ["CartPole"]
"""


@pytest.mark.parametrize('text,fragment', [
    (TINY + 'seeds = [0\n[grid]\n', 'is not valid TOML'),
    (TINY + '[grid]\n"Runner.num_iterationz" = [1, 2]\n', 'num_iterationz'),
    (TINY + '[grid]\n', '[grid]'),
    (TINY + '[grid]\n"SoftMoE.num_experts" = []\n', 'empty list'),
], ids=['malformed_toml', 'unknown_axis', 'empty_grid_table', 'empty_axis_list'])
def test_cli_sweep_refuses_bad_spec_on_one_line_without_writing(tmp_path, text,
                                                                  fragment):
  spec = tmp_path / 'spec.toml'
  spec.write_text(text)
  fresh, existing = str(tmp_path / 'fresh'), str(tmp_path / 'existing')
  os.makedirs(existing)
  with open(os.path.join(existing, 'manifest.json'), 'w') as f:
    json.dump({'sweep': 'tiny', 'runs': []}, f)
  before = _files(existing)
  # The dry run first: a spec wrongly accepted then trains nothing.
  for flags in (['--dry_run'], []):
    for out in (fresh, existing):
      code, stdout, stderr = _run_cli(['sweep', str(spec), '--out', out, *flags])
      assert code == 2, (flags, out, stdout, stderr)
      assert stdout == ''
      assert stderr.startswith('moerl: error:') and stderr.count('\n') == 1, stderr
      assert fragment in stderr and 'Traceback' not in stderr
  assert not os.path.exists(fresh)
  assert _files(existing) == before and os.listdir(existing) == ['manifest.json']


def _tree(root):
  """Every directory under root, and every file with its bytes and mtime."""
  return sorted(os.path.relpath(d, root) for d, _, _ in os.walk(root)), _files(root)


@pytest.mark.parametrize('case,fragment', [
    ('no_runs', 'no metrics.jsonl found'),
    ('missing', 'does not exist'),
    ('file', 'is a file'),
])
@pytest.mark.parametrize('out_flag', [[], ['--out']], ids=['default_out', 'out'])
def test_cli_plot_refuses_bad_dir_on_one_line_without_writing(tmp_path, case, fragment,
                                                              out_flag):
  runs = tmp_path / 'runs'
  if case == 'no_runs':
    (runs / 'empty_subdir').mkdir(parents=True)
    (runs / 'notes.txt').write_text('not a run\n')
  elif case == 'file':
    runs.write_text('not a run\n')
  before = _tree(runs) if runs.exists() else None
  plots = tmp_path / 'plots'
  argv = ['plot', str(runs)] + ([out_flag[0], str(plots)] if out_flag else [])
  code, stdout, stderr = _run_cli(argv)
  assert code == 2, (stdout, stderr)
  assert stdout == ''
  assert stderr.startswith('moerl: error:') and stderr.count('\n') == 1, stderr
  assert fragment in stderr and 'Traceback' not in stderr
  assert not plots.exists()
  assert (_tree(runs) if runs.exists() else None) == before
