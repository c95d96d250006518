"""End to end: `moerl sweep` runs real `moerl train` subprocesses on CartPole,
then `moerl plot` summarises them (local and Ray backends)."""

import csv
import json
import os

import numpy as np
import pytest

from experiments import cli
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
  extra = '[[zip]]\n"SoftMoE.capacity_factor" = [1.0, -1.0]\n'
  spec = _write_spec(tmp_path, extra,
                     template='e{num_experts}/cf{capacity_factor}/seed{seed}')
  out = str(tmp_path / 'sweep')
  code = cli.main(['sweep', spec, '--out', out, '--workers', '2'])
  err = capsys.readouterr().err
  assert code == 1
  done = [r for r in _runs(out)
          if json.load(open(os.path.join(out, r, 'status.json')))['state'] == 'done']
  assert len(done) == 4  # the capacity_factor=1.0 half
  assert 'capacity_factor=-1.0 is out of range' in err


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
], ids=['ungroupable_seeds', 'unknown_game', 'negative_seed'])
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
