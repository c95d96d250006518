"""Training-time expert metrics: values, ranges, and a short run writing them."""

import json

import gin
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gin_config
from experiments.runner import Runner
from networks import expert_metrics as em


def test_srank_from_gram_matches_svd():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(32, 6)) @ rng.normal(size=(6, 40))  # rank 6
  singular = np.linalg.svd(features, compute_uv=False)
  cumulative = np.cumsum(singular) / singular.sum()
  expected = int(np.sum(cumulative < 0.99) + 1)
  assert em.srank_from_gram(features @ features.T) == expected
  assert 1 <= expected <= 6


def test_dormant_fraction_hand_case():
  # 1 expert, 4 units: mean |activation| 0, 1, 1, 2 -> normalised 0, 1, 1, 2.
  hidden = jnp.array([0.0, 1.0, 1.0, 2.0]).reshape((1, 1, 1, 4))
  assert float(em.dormant_fraction(hidden, 0.0)[0]) == 0.25
  # tau 0.1 also only catches the silent unit; tau 1.0 catches three.
  assert float(em.dormant_fraction(hidden, 0.1)[0]) == 0.25
  assert float(em.dormant_fraction(hidden, 1.0)[0]) == 0.75


@pytest.mark.parametrize('config,extra', [
    ('cartpole_dqn_softmoe.gin', []),
    ('cartpole_dqn_softmoe.gin', ["QNetwork.penultimate = 'topk'",
                                  'TopKMoE.num_experts = 4',
                                  'TopKMoE.expert_hidden_units = 32',
                                  'TopKMoE.capacity_factor = 0.5']),
    ('cartpole_dqn_softmoe.gin', ["QNetwork.penultimate = 'expert_choice'",
                                  'ExpertChoiceMoE.num_experts = 4',
                                  'ExpertChoiceMoE.expert_hidden_units = 32']),
])
def test_short_moe_run_writes_expert_metrics(tmp_path, config, extra):
  gin_config.load([config], [
      'Runner.num_iterations = 1', 'Runner.training_steps = 500',
      "Runner.schedule = 'continuous_train'", 'DQNAgent.min_replay_history = 200',
      *extra])
  runner = Runner(str(tmp_path / 'run'))
  runner.run_experiment(gin.operative_config_str())
  line = json.loads(open(tmp_path / 'run' / 'metrics.jsonl').readline())
  shares = [line[f'moe/expert_share_{i}'] for i in range(4)]
  assert sum(shares) == pytest.approx(1.0, abs=1e-5)
  for key, value in line.items():
    if key.startswith(('moe/expert_share', 'moe/dormant', 'moe/dropped')):
      assert 0.0 <= value <= 1.0, key
  for tau in ('0', '0.1'):
    assert all(f'moe/dormant_{tau}_{i}' in line for i in range(4))
  assert line['moe/router_grad_norm'] > 0
  assert 1 <= line['moe/srank'] <= 128
  if 'topk' in str(extra):
    assert 0.0 < line['moe/dropped_fraction'] < 1.0  # capacity 0.5 overflows
  runner.close()
