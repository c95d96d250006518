"""`moerl representation`: one Soft MoE expert against many at equal parameter
count fitting f(X) = sum_t ||x_t||^2 (Chung et al.).

A single expert with one slot sees one convex mix of the tokens, so its
held-out error stays far above that of 8 smaller experts with the same total
expert parameters (same seed, same data). Measured on this machine at 600
steps: relative held-out MSE 0.666 (1 expert) against 0.079 (8 experts).
"""

import contextlib
import io
import json
import os

import pytest

from experiments import representation
from experiments.cli import main

STEPS = 600


def _run_cli(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(argv)
  return code, out.getvalue(), err.getvalue()


def test_many_small_experts_beat_one_large_expert(tmp_path):
  out_dir = str(tmp_path / 'rep')
  code, out, err = _run_cli(['representation', '--out', out_dir, '--steps',
                             str(STEPS), '--experts', '1,8', '--seed', '0'])
  assert code == 0, err
  print('\n' + out)
  with open(os.path.join(out_dir, 'representation.json'), encoding='utf-8') as f:
    result = json.load(f)
  assert os.path.getsize(os.path.join(out_dir, 'representation.png')) > 1000
  one, many = result['models']
  assert (one['num_experts'], many['num_experts']) == (1, 8)
  assert (one['expert_hidden_units'], many['expert_hidden_units']) == (128, 16)
  # Same expert parameters up to the second-layer biases (E * d each).
  d = result['settings']['token_dim']
  assert many['expert_parameters'] - one['expert_parameters'] == (8 - 1) * d
  assert len(one['train_loss']) == len(many['train_loss']) == STEPS
  assert one['test_loss_steps'][-1] == STEPS
  # The single expert cannot represent f: it stays well above the 8 experts,
  # and far from fitting at all (relative MSE 1.0 is predicting the mean).
  assert one['relative_test_mse'] > 0.3
  assert one['test_mse'] > 3 * many['test_mse']
  # Both learned something: better than predicting the mean (relative 1.0),
  # and better than where they started.
  for m in (one, many):
    assert m['relative_test_mse'] < 0.9
    assert m['test_mse'] < m['train_loss'][0]


def test_bad_input_is_one_line_exit_2(tmp_path):
  for argv, fragment in (
      (['--experts', '1,3'], 'divide'),
      (['--experts', '0,8'], 'out of range'),
      (['--experts', 'x'], 'integers'),
      (['--steps', '0'], 'between 1 and 10,000,000'),
      (['--steps', '2147483648'], 'between 1 and 10,000,000'),
      (['--steps', '99999999999999999999'], 'between 1 and 10,000,000'),
      (['--seed', '-1'], '--seed'),
      (['--seed', str(2**40)], '--seed')):
    code, _, err = _run_cli(['representation', '--out', str(tmp_path / 'r'),
                             *argv])
    assert code == 2, err
    assert err.startswith('moerl: error:') and fragment in err, err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
  assert not os.path.exists(tmp_path / 'r')


def test_an_output_path_taken_by_a_directory_is_refused_before_training(tmp_path):
  (tmp_path / 'r' / 'representation.json').mkdir(parents=True)
  code, out, err = _run_cli(['representation', '--out', str(tmp_path / 'r'),
                             '--steps', '100000'])  # refused long before
  assert code == 2 and out == ''
  assert err.startswith('moerl: error:') and 'is a directory' in err, err
  assert len(err.strip().splitlines()) == 1
  assert os.listdir(tmp_path / 'r') == ['representation.json']


def test_parse_experts():
  assert representation.parse_experts('8, 1,8') == [1, 8]
  with pytest.raises(representation.RepresentationError):
    representation.parse_experts('1,two')


def test_steps_are_honoured_when_not_a_multiple_of_eval_every():
  def run(steps):
    return representation.run_representation(
        None, experts=(2,), steps=steps, eval_every=100, num_test=256)['models'][0]
  model = run(150)
  assert len(model['train_loss']) == 150
  assert model['test_loss_steps'] == [100, 150]
  # 150 steps, not the 200 of two full evaluation blocks.
  assert model['test_mse'] != run(200)['test_mse']
  assert model['test_loss'][-1] == model['test_mse']
