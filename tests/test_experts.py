"""`moerl experts`: top-k expert subsets of a trained Soft MoE (Chung et al.).

A short CartPole Soft MoE run (4 experts) is trained once for the module; the
analysis runs in-process and through the CLI. Keeping every expert must
reproduce the full network exactly; the measured top-k / random-k numbers are
printed. In this small configuration (4 experts of 2 slots) the combine
weights are close to uniform over experts (the top-1 expert carries ~28% of
the mass against 25% for a random one), so top-k beats random-k only by a
small margin: measured on 500 states, mean agreement over k=1,2,4 about 0.72
against 0.69 (k=1 alone is a tie within noise), mean |dQ| about 26.6 against
27.2. Bad input gets one `moerl: error:` line and exit code 2.
"""

import contextlib
import io
import json
import os
import shutil

import gin
import numpy as np
import pytest

from experiments import experts, gin_config
from experiments.cli import main
from experiments.runner import Runner

KEEP = [1, 2, 4]


def _run_cli(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(argv)
  return code, out.getvalue(), err.getvalue()


def _train(base_dir, gin_file, bindings):
  gin_config.load([gin_file], bindings)
  runner = Runner(base_dir, log_stream=io.StringIO())
  try:
    runner.run_experiment(gin.operative_config_str())
  finally:
    runner.close()
    gin.clear_config()


@pytest.fixture(scope='module')
def softmoe_run(tmp_path_factory):
  base_dir = str(tmp_path_factory.mktemp('experts') / 'run')
  _train(base_dir, 'cartpole_dqn_softmoe.gin',
         ['Runner.num_iterations = 2', 'Runner.training_steps = 4000',
          "Runner.schedule = 'continuous_train'"])
  return base_dir


@pytest.fixture(scope='module')
def analysis(softmoe_run):
  gin_config.load([os.path.join(softmoe_run, 'config.gin')], [])
  runner = Runner(softmoe_run, num_envs=1, log_stream=io.StringIO())
  try:
    iteration = runner.restore_agent()
    result = experts.expert_subset_analysis(
        runner, KEEP, num_states=500, num_episodes=1, seed=0,
        checkpoint_iteration=iteration)
  finally:
    runner.close()
    gin.clear_config()
  print('\n' + experts.format_table(result))
  return result


def test_masks_keep_the_largest_combine_mass():
  scores = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.0, 0.2, 0.4]])
  np.testing.assert_array_equal(experts.topk_masks(scores, 1),
                                [[0, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(experts.topk_masks(scores, 2),
                                [[0, 1, 1, 0], [1, 0, 0, 1]])
  rng = np.random.default_rng(0)
  masks = experts.random_masks(500, 4, 2, rng)
  assert set(masks.sum(axis=1)) == {2.0}
  # Every expert gets drawn (about half the time each).
  assert np.all(np.abs(masks.mean(axis=0) - 0.5) < 0.1)
  assert experts.parse_keep(' 4,1,2,1') == [1, 2, 4]
  with pytest.raises(experts.ExpertAnalysisError):
    experts.parse_keep('a,b')


def test_keeping_every_expert_reproduces_the_full_network(analysis):
  assert analysis['num_experts'] == 4
  assert analysis['num_states'] == 500
  assert [row['k'] for row in analysis['keep']] == KEEP
  full = analysis['keep'][-1]
  assert full['flops_saved'] == 0.0
  for mode in experts.MODES:  # all 4 experts kept: both masks are all ones
    assert full[mode]['agreement'] == 1.0
    assert full[mode]['mean_abs_dq'] < 1e-5
    assert full[mode]['combine_mass'] == pytest.approx(1.0)
    assert full[mode]['returns'] == analysis['full']['returns']
  assert [row['flops_saved'] for row in analysis['keep']] == [0.75, 0.5, 0.0]
  # Fewer experts: the pruned network really changes (the mask is applied).
  assert analysis['keep'][0]['topk']['mean_abs_dq'] > 1e-4


def test_topk_ranking_against_random_subsets(analysis):
  rows = analysis['keep']
  for row in rows:
    # The ranking keeps the experts with the most combine weight: by
    # construction its kept share beats any other subset of the same size.
    assert row['topk']['combine_mass'] >= row['random']['combine_mass'] - 1e-6
    assert len(row['topk']['returns']) == len(row['random']['returns']) == 1
  print('mean agreement', analysis['mean_agreement'],
        'mean |dQ|', analysis['mean_abs_dq'])
  # Chung et al.: the experts chosen by combine weight matter more than
  # random ones, so the top-k network follows the full one more closely.
  assert (analysis['mean_agreement']['topk']
          >= analysis['mean_agreement']['random'])
  assert analysis['mean_abs_dq']['topk'] <= analysis['mean_abs_dq']['random']


def test_cli_writes_json_and_plot(softmoe_run):
  code, out, err = _run_cli(['experts', '--base_dir', softmoe_run, '--keep',
                             '1,2,4', '--states', '200', '--episodes', '1'])
  assert code == 0, err
  with open(os.path.join(softmoe_run, 'experts.json'), encoding='utf-8') as f:
    result = json.load(f)
  assert [row['k'] for row in result['keep']] == KEEP
  assert result['checkpoint_iteration'] == 1
  assert os.path.getsize(os.path.join(softmoe_run, 'experts.png')) > 1000
  assert 'agree top-k' in out and 'experts.json' in out
  assert not [f for f in os.listdir(softmoe_run) if f.startswith('.experts.')]


def test_default_keep_is_the_powers_of_two_below_the_expert_count():
  assert {e: experts.default_keep(e) for e in (1, 2, 3, 4, 8, 9)} == {
      1: [1], 2: [1], 3: [1, 2], 4: [1, 2], 8: [1, 2, 4], 9: [1, 2, 4, 8]}


def test_cli_without_keep_analyses_proper_subsets(softmoe_run, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(softmoe_run, copy)
  code, _, err = _run_cli(['experts', '--base_dir', copy, '--states', '50',
                           '--episodes', '0'])
  assert code == 0, err
  with open(os.path.join(copy, 'experts.json'), encoding='utf-8') as f:
    assert [row['k'] for row in json.load(f)['keep']] == [1, 2]  # of 4 experts


def _assert_usage_error(argv, *fragments):
  code, _, err = _run_cli(argv)
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('moerl: error:'), err
  assert 'Traceback' not in err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_refuses_a_run_without_soft_moe(tmp_path):
  base_dir = str(tmp_path / 'dense')
  _train(base_dir, 'cartpole_dqn.gin',
         ['Runner.num_iterations = 1', 'Runner.training_steps = 300',
          "Runner.schedule = 'continuous_train'"])
  _assert_usage_error(['experts', '--base_dir', base_dir], "'dense'",
                      'softmoe')
  assert not os.path.exists(os.path.join(base_dir, 'experts.json'))


def test_refuses_a_missing_checkpoint_or_config(softmoe_run, tmp_path):
  copy = tmp_path / 'copy'
  copy.mkdir()
  shutil.copy(os.path.join(softmoe_run, 'config.gin'), copy / 'config.gin')
  _assert_usage_error(['experts', '--base_dir', str(copy)], 'no checkpoint')
  assert sorted(os.listdir(copy)) == ['config.gin']
  _assert_usage_error(['experts', '--base_dir', str(tmp_path / 'nothing')],
                      'no config.gin')


@pytest.mark.parametrize('keep, fragment', [
    ('0', 'out of range'), ('1,5', 'out of range'), ('a,b', 'integers')])
def test_refuses_keep_values_out_of_range(softmoe_run, keep, fragment):
  before = os.path.getmtime(os.path.join(softmoe_run, 'config.gin'))
  _assert_usage_error(['experts', '--base_dir', softmoe_run, '--keep', keep],
                      fragment)
  assert os.path.getmtime(os.path.join(softmoe_run, 'config.gin')) == before


def test_run_episodes_refuses_an_unknown_mode():
  # Checked before the runner is touched: a typo never falls through to the
  # random-k baseline.
  with pytest.raises(ValueError, match="'top_k' is unknown"):
    experts.run_episodes(None, 1, seed=0, k=1, mode='top_k')
